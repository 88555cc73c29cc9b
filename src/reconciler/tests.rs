use super::same_parameter_value;

#[test]
fn parameter_values_compare_as_sysfs_shows_them() {
    assert!(same_parameter_value("7", "7"));
    assert!(same_parameter_value("two words", "\"two words\""));
    assert!(same_parameter_value("Y", "1"));
    assert!(same_parameter_value("N", "off"));
    assert!(!same_parameter_value("Y", "0"));
    assert!(!same_parameter_value("1", "7"));
}
