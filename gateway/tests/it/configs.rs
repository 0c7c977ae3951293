//! Every example config in the repository parses and validates; every invalid fixture is
//! refused with an error naming what is wrong (the fixture's first line says what).

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

/// Every key of the config tree (one sink of each type, every optional section filled) appears
/// in README's configuration reference, so the reference cannot fall behind the code.
#[test]
fn readme_reference_names_every_config_key() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find("## Configuration reference")
        .expect("a configuration reference section");
    let end = readme[start + 3..]
        .find("\n## ")
        .map(|i| start + 3 + i)
        .unwrap_or(readme.len());
    let reference = &readme[start..end];
    let text = r##"
site = "s"
[listener]
ca = "ca.pem"
cert = "c.pem"
key = "k.pem"
[admin]
socket = "a.sock"
[auth.device_groups.NAME]
selection_rule = "thingName: a"
policy = "NAME"
[auth.policies.NAME.STATEMENT]
description = "d"
operations = ["mqtt:connect"]
resources = ["*"]
[auth.enrollment]
claim_ca = "c"
ca_dir = "d"
[sinks.k]
type = "kinesis"
stream = "s"
endpoint = "http://127.0.0.1:1"
region = "r"
[sinks.i]
type = "iotcore"
endpoint = "h:8883"
cert = "c"
key = "k"
ca = "a"
client_id = "c"
[sinks.r]
type = "republish"
topic = "t"
[sinks.f]
type = "file"
path = "p"
[sinks.l]
type = "log"
[routes.NAME]
from = "#"
to = "f"
[sinks.n]
type = "iotcore"
via = "nucleus"
[rules]
error_sink = "f"
account_id = "123456789012"
[rules.sql]
NAME = "INSERT INTO f SELECT * FROM '#'"
[greengrass]
ipc = true
[downlinks.NAME]
sink = "i"
from = "cmd/${site}/#"
to = "cmd/#"
[relay]
sink = "i"
[spool.sinks.f]
max_bytes = "1MiB"
max_age = "1d"
when_full = "block"
[spool.encryption]
kms_key_id = "k"
endpoint = "http://127.0.0.1:1"
region = "r"
key_file = "k"
"##;
    let config = Config::from_toml_str(text, "reference").unwrap();
    config.validate().unwrap();
    let tree = serde_json::to_value(&config).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    fn walk(v: &serde_json::Value, keys: &mut std::collections::BTreeSet<String>) {
        if let serde_json::Value::Object(map) = v {
            for (k, child) in map {
                keys.insert(k.clone());
                walk(child, keys);
            }
        }
    }
    walk(&tree, &mut keys);
    assert!(
        keys.len() > 50,
        "the sample config should touch every section: {keys:?}"
    );
    // Names the example chose (sink names), not keys of the schema.
    let chosen = ["k", "i", "n", "r", "f", "l"];
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !chosen.contains(&k.as_str()))
        .filter(|k| !reference.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README's configuration reference lacks {missing:?}"
    );
}
