//! Ordering module configs by `after`.

use std::collections::{BTreeMap, BTreeSet};

/// Orders `names` so that each comes after the configs its `after` lists that
/// are also in `names`; otherwise the given order is kept. `after` gives each
/// name's predecessors. Configs are validated cycle-free, and a cycle here
/// simply stops the walk.
pub fn load_order(names: &[String], after: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    fn visit(
        n: &String,
        wanted: &BTreeSet<&String>,
        after: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(n.clone()) {
            return;
        }
        for a in after.get(n).into_iter().flatten() {
            if wanted.contains(a) {
                visit(a, wanted, after, seen, out);
            }
        }
        out.push(n.clone());
    }
    let wanted: BTreeSet<&String> = names.iter().collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for n in names {
        visit(n, &wanted, after, &mut seen, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn predecessors_first_otherwise_stable() {
        let after = BTreeMap::from([
            ("c".to_owned(), s(&["a"])),
            ("a".to_owned(), s(&["b", "z"])),
        ]);
        assert_eq!(
            load_order(&s(&["c", "a", "b", "d"]), &after),
            s(&["b", "a", "c", "d"])
        );
        // Predecessors not asked for are not added (they must already be loaded).
        assert_eq!(load_order(&s(&["c"]), &after), s(&["c"]));
        assert_eq!(load_order(&s(&["d", "d"]), &after), s(&["d"]));
    }

    #[test]
    fn cycles_terminate() {
        let after = BTreeMap::from([("a".to_owned(), s(&["b"])), ("b".to_owned(), s(&["a"]))]);
        assert_eq!(load_order(&s(&["a", "b"]), &after), s(&["b", "a"]));
    }
}
