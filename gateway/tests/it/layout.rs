//! The `gateway` crate's layout holds: its parts depend one way, in the order `lib.rs` and
//! ARCHITECTURE.md give, and no two files of one part import each other.
//!
//! A dependency is any `crate::part` path in code (comments are skipped), `use crate::{a, b}`
//! groups included. The binary's `main.rs` and `cli/` sit above every part and are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The parts, lowest first; a part may use only parts of earlier layers.
const LAYERS: &[&[&str]] = &[
    &[
        "clock", "disk", "escape", "invalid", "metrics", "secret", "topic",
    ],
    &["identity"],
    &["auth"],
    &["spool"],
    &["pipeline"],
    &["delivery"],
    &["edge"],
    &["downlink"],
    &["ops"],
    &["config"],
    &["control"],
    &["daemon"],
    &["fleet"],
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file of the library, by its module path (`edge/session/mod.rs` → `edge::session`).
fn library_files() -> BTreeMap<Vec<String>, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let mut p = prefix.to_vec();
                if name != "mod" {
                    p.push(name);
                }
                out.insert(p, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out.retain(|path, _| {
        !matches!(
            path.first().map(String::as_str),
            Some("main") | Some("cli") | Some("lib")
        ) && !path.is_empty()
    });
    out
}

/// Code without `//` comments (doc comments name other parts in prose and links).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first segments of every path that starts with `prefix` (`crate::`, `super::`),
/// `use prefix{a::b, c}` groups included.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    out.push(segments(&item));
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            out.push(segments(rest));
        }
    }
    out
}

fn segments(path: &str) -> Vec<String> {
    path.trim()
        .split("::")
        .map(|s| ident_at(s.trim()))
        .take_while(|s| !s.is_empty())
        .take(2)
        .collect()
}

fn layer_of(part: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&part))
}

#[test]
fn parts_depend_one_way() {
    let files = library_files();
    let mut wrong = BTreeSet::new();
    for (path, text) in &files {
        let part = &path[0];
        let Some(layer) = layer_of(part) else {
            wrong.insert(format!("{part}: not in LAYERS (nor in lib.rs's layout)"));
            continue;
        };
        for used in paths_after(&code(text), "crate::") {
            let Some(target) = used.first() else { continue };
            // The root re-exports name the config and the daemon: checked as those parts.
            let target = match target.as_str() {
                "Config" => "config",
                "Gateway" | "run" | "Listeners" | "RunError" => "daemon",
                other => other,
            };
            if target == part {
                continue;
            }
            match layer_of(target) {
                Some(t) if t < layer => {}
                _ => {
                    wrong.insert(format!("{} uses crate::{target}", path.join("::")));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependencies against the layering (a part may use only parts below it):\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_two_files_of_a_part_import_each_other() {
    let files = library_files();
    // Edges between sibling files (children of one folder, not the folder's own mod.rs).
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (path, text) in &files {
        if path.len() < 2 {
            continue;
        }
        let parent = &path[..path.len() - 1];
        let code = code(text);
        let mut targets = Vec::new();
        for used in paths_after(&code, "super::") {
            if let Some(first) = used.first() {
                let mut t = parent.to_vec();
                t.push(first.clone());
                targets.push(t);
            }
        }
        for used in paths_after(&code, "crate::") {
            if used.len() == 2 && used[0] == parent[0] && parent.len() == 1 {
                targets.push(used.clone());
            }
        }
        for t in targets {
            if &t != path && files.contains_key(&t) && t[..t.len() - 1] == *parent {
                edges.entry(path.clone()).or_default().insert(t);
            }
        }
    }
    let mut cycles = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("{} <-> {}", a.join("::"), b.join("::")));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "files that import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_check_sees_grouped_imports_and_skips_comments() {
    let text = "use crate::{edge::Fabric, spool};\n// crate::daemon in a comment\nlet x = crate::clock::now_ms();";
    let found = paths_after(&code(text), "crate::");
    let firsts: Vec<&str> = found.iter().map(|p| p[0].as_str()).collect();
    assert_eq!(firsts, ["edge", "spool", "clock"]);
}

#[test]
fn lib_and_architecture_name_every_part() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let arch =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"))
            .unwrap();
    for part in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            lib.contains(&format!("mod {part};")),
            "lib.rs declares no `{part}`"
        );
        assert!(
            lib.contains(&format!("`{part}`")),
            "lib.rs's layout does not name `{part}`"
        );
        assert!(
            arch.contains(&format!("`{part}`")),
            "ARCHITECTURE.md does not name `{part}`"
        );
    }
}
