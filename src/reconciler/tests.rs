use std::collections::BTreeSet;

use super::{same_parameter_value, used_beyond};
use crate::kmod::{InitState, LiveModule, ModName};

fn n(s: &str) -> ModName {
    ModName::parse(s).unwrap()
}

fn live(refcount: i32, holders: &[&str]) -> LiveModule {
    LiveModule {
        state: InitState::Live,
        refcount,
        holders: holders.iter().map(|h| n(h)).collect(),
    }
}

#[test]
fn in_use_counts_foreign_holders_and_plain_references() {
    let ours: BTreeSet<_> = [n("a"), n("b")].into();
    assert!(!used_beyond(&live(0, &[]), &ours));
    assert!(!used_beyond(&live(2, &["a", "b"]), &ours));
    assert!(used_beyond(&live(1, &["c"]), &ours));
    assert!(used_beyond(&live(2, &["a", "c"]), &ours));
    // One reference more than the holders account for: an open device, say.
    assert!(used_beyond(&live(2, &["a"]), &ours));
}

#[test]
fn parameter_values_compare_as_sysfs_shows_them() {
    assert!(same_parameter_value("7", "7"));
    assert!(same_parameter_value("two words", "\"two words\""));
    assert!(same_parameter_value("Y", "1"));
    assert!(same_parameter_value("N", "off"));
    assert!(!same_parameter_value("Y", "0"));
    assert!(!same_parameter_value("1", "7"));
}
