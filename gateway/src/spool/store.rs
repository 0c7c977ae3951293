//! Opening the gateway's sled store (`<data_dir>/db`), and what happens when it is damaged.
//!
//! sled 0.34 panics or returns misleading errors on damaged files (a flipped bit in the log,
//! a bad `conf` checksum). A gateway that cannot start serves no device, so damage is met
//! in steps, each logged with its cause, nothing deleted:
//!
//! 1. The lock is checked first: a store another process holds is an error, never "damage".
//! 2. A `conf` file whose checksum fails is moved aside: it holds only settings the gateway
//!    always sets the same way, and sled writes it again.
//! 3. If sled still cannot open the store (error or panic), its snapshot files (`snap.*`, an
//!    index sled can rebuild from its log) are moved aside and the open is tried again.
//! 4. If that fails too, the whole store is renamed to `db.damaged-<unix ms>` and a fresh one
//!    is made. Its sealed blocks can be salvaged later with `sitegate spool recover` (see
//!    [`super::salvage`]); the spool's ledger (kept outside the store) counts what is missing.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

/// sled's page cache. Its default (1 GiB) fills with freshly written spool blocks under load;
/// drains read what was just written, which the OS page cache holds anyway.
const STORE_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// The store's folder under data_dir.
pub const STORE_DIR: &str = "db";

/// What to do with a store sled cannot open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Repair what can be rebuilt, else set the store aside and start a fresh one (the daemon).
    SetAside,
    /// Report and stop (offline tools, which must not move a gateway's data).
    Fail,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store in {path} is in use by another process (is another sitegate running on this data_dir?)")]
    Locked { path: PathBuf },
    #[error("cannot open the store in {path}: {cause}")]
    Damaged { path: PathBuf, cause: String },
    #[error("cannot set the damaged store {path} aside: {source}")]
    SetAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`open`] did to get a store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repairs {
    /// Files or folders renamed aside, with why.
    pub set_aside: Vec<(PathBuf, String)>,
    /// The store was replaced by a fresh one; the old one is here.
    pub replaced_by_fresh: Option<PathBuf>,
}

/// Opens (or creates) `<data_dir>/db`, meeting damage as the module says.
pub fn open(data_dir: &Path, on_damage: OnDamage) -> Result<(sled::Db, Repairs), StoreError> {
    let path = data_dir.join(STORE_DIR);
    let mut repairs = Repairs::default();
    if held_by_another(&path) {
        return Err(StoreError::Locked { path });
    }
    if on_damage == OnDamage::SetAside {
        let conf = path.join("conf");
        if conf_is_damaged(&conf) {
            let to = aside(
                &conf,
                &mut repairs,
                "checksum of sled's settings file failed",
            )?;
            tracing::error!(file = %conf.display(), moved_to = %to.display(), "the store's settings file is damaged; moved aside, sled writes it again");
        }
    }
    let first = try_open(&path);
    let cause = match first {
        Ok(db) => return Ok((db, repairs)),
        Err(cause) if on_damage == OnDamage::Fail => {
            return Err(StoreError::Damaged { path, cause });
        }
        Err(cause) => cause,
    };
    if held_by_another(&path) {
        return Err(StoreError::Locked { path });
    }
    tracing::error!(store = %path.display(), %cause, "sled cannot open the store; trying again without its snapshot");
    let snaps: Vec<PathBuf> = std::fs::read_dir(&path)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("snap."))
                })
                .collect()
        })
        .unwrap_or_default();
    for snap in &snaps {
        aside(snap, &mut repairs, &cause)?;
    }
    let cause = if snaps.is_empty() {
        cause
    } else {
        match try_open(&path) {
            Ok(db) => {
                tracing::warn!(store = %path.display(), "store opened after its snapshot was set aside (sled rebuilt it from the log)");
                return Ok((db, repairs));
            }
            Err(again) => again,
        }
    };
    let to = aside(&path, &mut repairs, &cause)?;
    repairs.replaced_by_fresh = Some(to.clone());
    tracing::error!(
        store = %path.display(),
        moved_to = %to.display(),
        %cause,
        "the store is damaged beyond what sled can open: set aside, starting on a fresh store; \
         salvage its records with `sitegate spool recover {}`",
        to.display()
    );
    try_open(&path)
        .map(|db| (db, repairs))
        .map_err(|cause| StoreError::Damaged { path, cause })
}

fn try_open(path: &Path) -> Result<sled::Db, String> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(STORE_CACHE_BYTES);
    match std::panic::catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "sled panicked reading it: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    }
}

/// Whether another process holds sled's lock on the store.
fn held_by_another(path: &Path) -> bool {
    use fs2::FileExt as _;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path.join("db"))
    else {
        return false;
    };
    match file.try_lock_exclusive() {
        Ok(()) => {
            let _ = fs2::FileExt::unlock(&file);
            false
        }
        Err(_) => true,
    }
}

/// sled's `conf`: text settings followed by their CRC-32 (little-endian).
fn conf_is_damaged(conf: &Path) -> bool {
    let Ok(bytes) = std::fs::read(conf) else {
        return false;
    };
    if bytes.len() <= 8 {
        return true;
    }
    let (text, crc) = bytes.split_at(bytes.len() - 4);
    let mut arr = [0u8; 4];
    arr.copy_from_slice(crc);
    crc32fast::hash(text) != u32::from_le_bytes(arr)
}

/// Renames `path` to `<path>.damaged-<unix ms>`; never deletes.
fn aside(path: &Path, repairs: &mut Repairs, why: &str) -> Result<PathBuf, StoreError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".damaged-{}", crate::clock::now_ms()));
    let to = path.with_file_name(name);
    std::fs::rename(path, &to).map_err(|source| StoreError::SetAside {
        path: path.to_owned(),
        source,
    })?;
    repairs.set_aside.push((to.clone(), why.to_string()));
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_in_use_is_reported_as_in_use_not_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = open(dir.path(), OnDamage::SetAside).unwrap();
        let err = open(dir.path(), OnDamage::SetAside).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another sitegate"), "{err}");
        drop(db);
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("damaged")));
    }

    #[test]
    fn a_damaged_conf_is_set_aside_and_the_data_stays() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, _) = open(dir.path(), OnDamage::SetAside).unwrap();
            db.insert(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        let conf = dir.path().join("db/conf");
        let mut bytes = std::fs::read(&conf).unwrap();
        bytes[15] ^= 0x04;
        std::fs::write(&conf, bytes).unwrap();
        assert!(conf_is_damaged(&conf));
        let (db, repairs) = open(dir.path(), OnDamage::SetAside).unwrap();
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(repairs.set_aside.len(), 1);
        assert!(repairs.replaced_by_fresh.is_none());
        assert!(!conf_is_damaged(&conf));
    }
}
