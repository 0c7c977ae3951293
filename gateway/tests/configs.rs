//! Every example config in the repository parses and validates; every invalid fixture is
//! refused with an error naming what is wrong (the fixture's first line says what).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use sitegate::config::Config;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every `*.toml` under `dir`, recursively, skipping build output.
fn tomls(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" {
                tomls(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "toml")
            && name != "Cargo.toml"
            && name != "rustfmt.toml"
            && name != "config.toml"
        {
            out.push(p);
        }
    }
}

/// Where the repository keeps sitegate configs (tool configs such as Cargo.toml live elsewhere).
const CONFIG_HOMES: &[&str] = &["examples", "docker", "gateway/greengrass"];

#[test]
fn every_example_config_in_the_repo_is_valid() {
    let root = repo_root();
    let mut examples = Vec::new();
    for home in CONFIG_HOMES {
        tomls(&root.join(home), &mut examples);
    }
    assert!(
        examples.len() >= 2,
        "expected example configs, found {examples:?}"
    );
    for path in examples {
        Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn invalid_configs_name_what_is_wrong() {
    let dir = repo_root().join("gateway/tests/fixtures/invalid");
    let mut files = Vec::new();
    tomls(&dir, &mut files);
    assert!(files.len() >= 5);
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# error: "))
            .unwrap_or_else(|| {
                panic!(
                    "{} must start with `# error: <expected text>`",
                    path.display()
                )
            });
        let err = Config::load(&path)
            .expect_err(&path.display().to_string())
            .to_string();
        assert!(
            err.contains(expected),
            "{}: expected {expected:?} in {err:?}",
            path.display()
        );
    }
}
