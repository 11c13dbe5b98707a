//! The test layout cannot forget a suite: every `tests/*.rs` file of the repository is
//! registered as a `[[test]]` of exactly one workspace crate (they are registered by hand,
//! because the suites live outside the crates' own folders), and every registered path exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// The workspace members named in the root `Cargo.toml` (`members = [...]`).
fn members(root: &Path) -> Vec<PathBuf> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let list = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("a members list in the root Cargo.toml")
        .0;
    list.split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root.join(m))
        .collect()
}

#[test]
fn every_suite_in_tests_is_registered_once_and_every_registration_exists() {
    let root = repository();
    let mut registered: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for member in members(&root) {
        let manifest = std::fs::read_to_string(member.join("Cargo.toml")).unwrap();
        for line in manifest.lines() {
            let Some(path) = line
                .trim()
                .strip_prefix("path = \"")
                .and_then(|p| p.strip_suffix('"'))
            else {
                continue;
            };
            if !path.contains("tests/") {
                continue;
            }
            let file = member.join(path);
            assert!(
                file.is_file(),
                "{} registers {path}, which does not exist",
                member.display()
            );
            registered
                .entry(file.canonicalize().unwrap())
                .or_default()
                .push(member.display().to_string());
        }
    }
    let mut suites = 0;
    for entry in std::fs::read_dir(root.join("tests")).unwrap() {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        suites += 1;
        let by = registered.get(&file.canonicalize().unwrap());
        assert!(
            by.is_some_and(|b| b.len() == 1),
            "{} must be a [[test]] of exactly one crate (path = \"../../tests/...\"), is of {:?}",
            file.display(),
            by
        );
    }
    println!("{suites} suites in tests/, each registered once");
    assert!(
        suites >= 15,
        "only {suites} suites found: is this the repository's tests/?"
    );
}
