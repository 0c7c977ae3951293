//! The device registry: one record per thing in sled under `data_dir`.
//!
//! A record holds the thing's state (pending until an operator approves it), the groups an
//! operator assigned, and every certificate id seen for it. Writes are flushed before they are
//! reported done, so an approval or revocation survives a crash that follows it.

use serde::{Deserialize, Serialize};

const TREE: &str = "things";

/// Where a thing stands with the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Chains to the site CA but nobody approved it yet: provisioning topic only.
    Pending,
    /// Approved: gets its configured and assigned groups.
    Approved,
    /// Refused at connect and disconnected if connected.
    Revoked,
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceState::Pending => "pending",
            DeviceState::Approved => "approved",
            DeviceState::Revoked => "revoked",
        })
    }
}

/// What the registry knows of one thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub thing: String,
    pub state: DeviceState,
    /// Groups assigned by `device approve --group`, on top of those whose selection rule matches.
    pub groups: Vec<String>,
    /// Certificate ids (SHA-256 of the DER, lowercase hex) this thing has connected with.
    pub cert_ids: Vec<String>,
    /// Milliseconds since the epoch.
    pub first_seen_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub updated_ms: u64,
}

impl DeviceRecord {
    fn new(thing: &str) -> DeviceRecord {
        DeviceRecord {
            thing: thing.to_owned(),
            state: DeviceState::Pending,
            groups: Vec::new(),
            cert_ids: Vec::new(),
            first_seen_ms: None,
            last_seen_ms: None,
            updated_ms: crate::clock::now_ms(),
        }
    }
}

/// Why the registry could not answer. Storage errors may pass (disk full, I/O); a corrupt
/// record will not.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device registry storage: {0}")]
    Storage(#[from] sled::Error),
    /// A new device is not registered while the disk is below its reserve.
    #[error("device registry: {0}")]
    DiskLow(#[from] crate::disk::DiskLow),
    #[error("device registry record for {thing:?} is unreadable: {reason}")]
    Corrupt { thing: String, reason: String },
}

impl RegistryError {
    /// True when trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, RegistryError::Storage(_) | RegistryError::DiskLow(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// On disk before the call returns: operator decisions.
    Flushed,
    /// Written out by sled's background flush.
    Lazy,
}

/// The registry, over a tree of the gateway's sled database.
#[derive(Clone)]
pub struct Registry {
    tree: sled::Tree,
    disk: crate::disk::DiskGuard,
}

impl Registry {
    /// The registry in `db`; devices' own writes keep `disk`'s reserve free.
    pub fn open(db: &sled::Db, disk: crate::disk::DiskGuard) -> Result<Registry, RegistryError> {
        Ok(Registry {
            tree: db.open_tree(TREE)?,
            disk,
        })
    }

    pub fn get(&self, thing: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.tree
            .get(thing.as_bytes())?
            .map(|bytes| decode(thing, &bytes))
            .transpose()
    }

    /// Records a connection attempt by `thing` with `cert_id`; creates a pending record for a
    /// thing never seen before.
    ///
    /// Below the disk reserve a known device's sighting is not written (its record is
    /// returned as it is) and an unknown device is refused for now, so that a flood of new
    /// certificates cannot fill the disk the spool needs.
    pub fn observe(&self, thing: &str, cert_id: &str) -> Result<DeviceRecord, RegistryError> {
        if let Err(low) = self.disk.check(0) {
            return match self.get(thing)? {
                Some(record) => Ok(record),
                None => Err(low.into()),
            };
        }
        // Not flushed here: a sighting lost to a crash costs nothing, and a reconnect storm must
        // not wait on one fsync per device. sled writes it out within its flush interval.
        self.update(thing, Durability::Lazy, |r| {
            let now = crate::clock::now_ms();
            r.first_seen_ms.get_or_insert(now);
            r.last_seen_ms = Some(now);
            if !r.cert_ids.iter().any(|c| c == cert_id) {
                r.cert_ids.push(cert_id.to_owned());
            }
        })
    }

    /// Approves `thing` (known or not yet seen) and adds `groups` to its assigned groups.
    pub fn approve(&self, thing: &str, groups: &[String]) -> Result<DeviceRecord, RegistryError> {
        self.update(thing, Durability::Flushed, |r| {
            r.state = DeviceState::Approved;
            for g in groups {
                if !r.groups.contains(g) {
                    r.groups.push(g.clone());
                }
            }
            r.updated_ms = crate::clock::now_ms();
        })
    }

    /// Revokes `thing`: refused from now on, until approved again.
    pub fn revoke(&self, thing: &str) -> Result<DeviceRecord, RegistryError> {
        self.update(thing, Durability::Flushed, |r| {
            r.state = DeviceState::Revoked;
            r.updated_ms = crate::clock::now_ms();
        })
    }

    pub fn list(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.tree
            .iter()
            .map(|item| {
                let (key, value) = item?;
                decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    fn update(
        &self,
        thing: &str,
        durability: Durability,
        change: impl Fn(&mut DeviceRecord),
    ) -> Result<DeviceRecord, RegistryError> {
        let mut result = None;
        let mut corrupt = None;
        self.tree.update_and_fetch(thing.as_bytes(), |old| {
            let mut record = match old.map(|b| decode(thing, b)) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    corrupt = Some(e);
                    return old.map(|b| b.to_vec());
                }
                None => DeviceRecord::new(thing),
            };
            change(&mut record);
            let bytes = serde_json::to_vec(&record).ok();
            result = Some(record);
            bytes.or_else(|| old.map(|b| b.to_vec()))
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        if durability == Durability::Flushed {
            self.tree.flush()?;
        }
        result.ok_or_else(|| RegistryError::Corrupt {
            thing: thing.to_owned(),
            reason: "update produced no record".into(),
        })
    }
}

fn decode(thing: &str, bytes: &[u8]) -> Result<DeviceRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        thing: thing.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        (
            dir,
            Registry::open(&db, crate::disk::DiskGuard::off()).unwrap(),
        )
    }

    #[test]
    fn new_things_are_pending_and_collect_cert_ids() {
        let (_d, r) = registry();
        let rec = r.observe("pump-1", "aa").unwrap();
        assert_eq!(rec.state, DeviceState::Pending);
        r.observe("pump-1", "bb").unwrap();
        let rec = r.observe("pump-1", "aa").unwrap();
        assert_eq!(rec.cert_ids, vec!["aa", "bb"]);
    }

    #[test]
    fn below_the_disk_reserve_new_devices_wait_and_known_ones_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        Registry::open(&db, crate::disk::DiskGuard::off())
            .unwrap()
            .approve("pump-1", &["pumps".into()])
            .unwrap();
        let full = crate::disk::DiskGuard::new(dir.path(), u64::MAX / 4);
        let r = Registry::open(&db, full).unwrap();
        let err = r.observe("stranger-1", "cc").unwrap_err();
        assert!(matches!(err, RegistryError::DiskLow(_)), "{err}");
        assert!(err.retryable(), "a CONNECT refused now may succeed later");
        assert!(r.get("stranger-1").unwrap().is_none(), "nothing written");
        let known = r.observe("pump-1", "dd").unwrap();
        assert_eq!(known.state, DeviceState::Approved);
        assert!(known.cert_ids.is_empty(), "the sighting is not written");
        // An operator's decision still goes through: it is small, and the reserve is for it.
        r.approve("stranger-1", &[]).unwrap();
    }

    #[test]
    fn approve_then_revoke_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            let r = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
            r.approve("pump-1", &["pumps".into()]).unwrap();
            r.approve("pump-1", &["pumps".into(), "extra".into()])
                .unwrap();
            r.approve("door-1", &[]).unwrap();
            r.revoke("door-1").unwrap();
        }
        let db = sled::open(dir.path().join("db")).unwrap();
        let r = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
        let pump = r.get("pump-1").unwrap().unwrap();
        assert_eq!(pump.state, DeviceState::Approved);
        assert_eq!(pump.groups, vec!["pumps", "extra"]);
        assert_eq!(
            r.get("door-1").unwrap().unwrap().state,
            DeviceState::Revoked
        );
        assert_eq!(r.list().unwrap().len(), 2);
        assert!(r.get("nobody").unwrap().is_none());
    }
}
