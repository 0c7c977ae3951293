//! The rules directory: one rule per `*.sql` file, named by its stem. [`Watcher::poll`] reports
//! what changed since the last look (by content, so an editor's rewrite of the same text is no
//! change); the gateway polls a few times a second and applies the changes between batches.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// A change in the rules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new or edited file.
    Upsert {
        name: String,
        file: PathBuf,
        text: String,
    },
    /// A deleted file.
    Removed { name: String },
}

/// Every rule file in `dir`: name → (path, text).
pub fn scan(dir: &Path) -> std::io::Result<BTreeMap<String, (PathBuf, String)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sql") && path.is_file() {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            // Editors' temp files (".#rule.sql") are not rules.
            if name.starts_with('.') {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            out.insert(name.to_string(), (path, text));
        }
    }
    Ok(out)
}

fn digest(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Remembers what the directory held.
#[derive(Debug)]
pub struct Watcher {
    dir: PathBuf,
    seen: BTreeMap<String, u64>,
}

impl Watcher {
    pub fn new(dir: &Path) -> Self {
        Watcher {
            dir: dir.to_path_buf(),
            seen: BTreeMap::new(),
        }
    }

    /// What changed since the last call (everything, the first time).
    pub fn poll(&mut self) -> std::io::Result<Vec<Change>> {
        let now = scan(&self.dir)?;
        let mut changes = Vec::new();
        for (name, (file, text)) in &now {
            let d = digest(text);
            if self.seen.get(name) != Some(&d) {
                self.seen.insert(name.clone(), d);
                changes.push(Change::Upsert {
                    name: name.clone(),
                    file: file.clone(),
                    text: text.clone(),
                });
            }
        }
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.seen.remove(&name);
            changes.push(Change::Removed { name });
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reports_additions_edits_and_deletions_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(dir.path());
        std::fs::write(dir.path().join("a.sql"), "x").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(w.poll().unwrap().len(), 1);
        assert!(w.poll().unwrap().is_empty());
        std::fs::write(dir.path().join("a.sql"), "y").unwrap();
        assert!(matches!(&w.poll().unwrap()[..], [Change::Upsert { text, .. }] if text == "y"));
        std::fs::remove_file(dir.path().join("a.sql")).unwrap();
        assert_eq!(
            w.poll().unwrap(),
            vec![Change::Removed { name: "a".into() }]
        );
    }
}
