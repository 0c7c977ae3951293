//! The device registry: one record per thing in sled under `data_dir`, tree `things`.
//!
//! A record holds the thing's certificates, each with its own state (pending until an operator
//! or a verifier vouches for it, as AWS IoT tracks status per certificate), the groups an
//! operator assigned, and whether the thing as a whole is revoked. A connection is judged by
//! its certificate: a second certificate for an approved thing is pending, and approving a
//! thing again never reinstates a revoked certificate. Writes of decisions are flushed before
//! they are reported done, so an approval or revocation survives a crash that follows it.
//!
//! On disk each record is its JSON. Format 2 (`"format": 2`) holds `certs`; a record written
//! before it (with `state` and `cert_ids`) is rewritten in format 2 when the registry opens:
//! its certificates take the thing's old state, so an approved fleet stays approved.

use serde::{Deserialize, Serialize};

const TREE: &str = "things";
/// The record format this registry writes.
const FORMAT: u32 = 2;

/// Where a thing, or a connection's certificate, stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Chains to the site CA but nobody vouched for it yet: provisioning topic only.
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

/// One certificate of a thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRecord {
    /// SHA-256 of the DER, lowercase hex (AWS IoT's certificate id).
    pub id: String,
    pub state: DeviceState,
    /// Why it is pending or revoked, when something said so (a verifier's finding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Milliseconds since the epoch; `None` for a certificate approved before it was seen.
    #[serde(default)]
    pub first_seen_ms: Option<u64>,
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// Its issuer DN and serial (lowercase hex), once seen: what a revocation list names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Who approved it (meaningful while approved).
    #[serde(default)]
    pub voucher: Voucher,
    /// When the AWS IoT registry last answered for it (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_ms: Option<u64>,
    /// Signed here by in-band enrollment: the SHA-256 (lowercase hex) of the public key it was
    /// signed for, which the AWS IoT registry may vouch for through the thing's attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_key: Option<String>,
}

/// What the AWS IoT registry says of a thing (`[auth.registry]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cloud {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub thing_groups: Vec<String>,
}

/// What the AWS IoT registry said of one certificate (`auth::verifier` asks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// ACTIVE and attached to the thing its CN names.
    Approved(Cloud),
    /// The registry knows the certificate and says no (not ACTIVE, or another thing's).
    Refused(String),
    /// REVOKED in the registry.
    Revoked(String),
    /// The registry does not know the certificate.
    Unknown(String),
}

/// Who approved a certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Voucher {
    /// `device approve` (or a registry written before verifiers).
    #[default]
    Operator,
    /// The AWS IoT registry: it stands while the registry keeps saying so.
    Registry,
}

/// Why the registry revoked a certificate a revocation list names.
pub const LISTED_IN_CRL: &str = "listed in a certificate revocation list (listener.crl)";

/// What a connection's certificate is called, besides its id, by a revocation list.
#[derive(Debug, Clone, Copy)]
pub struct Listing<'a> {
    pub issuer: &'a str,
    pub serial: &'a str,
}

/// What the registry knows of one thing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub thing: String,
    /// `device revoke THING`: every connection refused, whatever its certificate, until the
    /// thing is approved again.
    #[serde(default)]
    pub revoked: bool,
    /// `device approve THING` before the thing ever connected: the first certificate seen for
    /// it is approved (then this turns false).
    #[serde(default)]
    pub approve_next: bool,
    /// Groups assigned by `device approve --group`, on top of those whose selection rule matches.
    pub groups: Vec<String>,
    /// Every certificate seen or decided on for this thing, oldest first.
    #[serde(default)]
    pub certs: Vec<CertRecord>,
    /// What the AWS IoT registry said of the thing when it last vouched for a certificate of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<Cloud>,
    /// Milliseconds since the epoch.
    pub first_seen_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub updated_ms: u64,
}

impl DeviceRecord {
    fn new(thing: &str) -> DeviceRecord {
        DeviceRecord {
            thing: thing.to_owned(),
            revoked: false,
            approve_next: false,
            groups: Vec::new(),
            certs: Vec::new(),
            cloud: None,
            first_seen_ms: None,
            last_seen_ms: None,
            updated_ms: crate::clock::now_ms(),
        }
    }

    /// The state of a connection made with `cert_id`.
    pub fn cert_state(&self, cert_id: &str) -> DeviceState {
        self.cert_state_at(cert_id, None)
    }

    /// [`DeviceRecord::cert_state`], where a certificate only the AWS IoT registry approved is
    /// pending once its last answer is older than `trust` (`(now, trust_for)`, in ms).
    pub fn cert_state_at(&self, cert_id: &str, trust: Option<(u64, u64)>) -> DeviceState {
        if self.revoked {
            return DeviceState::Revoked;
        }
        let Some(c) = self.cert(cert_id) else {
            return DeviceState::Pending;
        };
        let expired = trust.is_some_and(|(now, trust_ms)| {
            c.state == DeviceState::Approved
                && c.voucher == Voucher::Registry
                && c.checked_ms
                    .is_none_or(|at| now.saturating_sub(at) > trust_ms)
        });
        if expired {
            DeviceState::Pending
        } else {
            c.state
        }
    }

    /// The thing's state as `device list` summarizes it: revoked when the thing is, approved
    /// when a certificate of it is (or its first one will be), else pending.
    pub fn state(&self) -> DeviceState {
        if self.revoked {
            DeviceState::Revoked
        } else if self.approve_next || self.certs.iter().any(|c| c.state == DeviceState::Approved) {
            DeviceState::Approved
        } else {
            DeviceState::Pending
        }
    }

    /// What the thing's groups and policy variables are chosen by.
    pub fn facts(&self) -> crate::auth::Facts {
        let cloud = self.cloud.clone().unwrap_or_default();
        crate::auth::Facts {
            thing: self.thing.clone(),
            thing_type: cloud.thing_type,
            attributes: cloud.attributes,
            thing_groups: cloud.thing_groups,
        }
    }

    pub fn cert(&self, cert_id: &str) -> Option<&CertRecord> {
        self.certs.iter().find(|c| c.id == cert_id)
    }

    fn cert_mut(&mut self, cert_id: &str) -> &mut CertRecord {
        let at = match self.certs.iter().position(|c| c.id == cert_id) {
            Some(i) => i,
            None => {
                self.certs.push(CertRecord {
                    id: cert_id.to_owned(),
                    state: DeviceState::Pending,
                    reason: None,
                    first_seen_ms: None,
                    last_seen_ms: None,
                    issuer: None,
                    serial: None,
                    voucher: Voucher::Operator,
                    checked_ms: None,
                    enrolled_key: None,
                });
                self.certs.len() - 1
            }
        };
        &mut self.certs[at]
    }
}

/// A record as stored: format 2, or the format before it (one state per thing, `cert_ids`).
#[derive(Deserialize)]
struct Stored {
    #[serde(default)]
    format: u32,
    #[serde(flatten)]
    record: DeviceRecord,
    /// Format 1.
    #[serde(default)]
    state: Option<DeviceState>,
    #[serde(default)]
    cert_ids: Vec<String>,
}

#[derive(Serialize)]
struct StoredRef<'a> {
    format: u32,
    #[serde(flatten)]
    record: &'a DeviceRecord,
}

impl Stored {
    /// The record in format 2: a format 1 thing's certificates take its state.
    fn upgrade(self) -> (DeviceRecord, bool) {
        let mut record = self.record;
        if self.format >= FORMAT {
            return (record, false);
        }
        let state = self.state.unwrap_or(DeviceState::Pending);
        record.revoked = state == DeviceState::Revoked;
        record.approve_next = state == DeviceState::Approved && self.cert_ids.is_empty();
        let (first, last) = (record.first_seen_ms, record.last_seen_ms);
        for id in self.cert_ids {
            let cert = record.cert_mut(&id);
            cert.state = state;
            cert.first_seen_ms = first;
            cert.last_seen_ms = last;
        }
        (record, true)
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
    /// The registry in `db`; devices' own writes keep `disk`'s reserve free. Records of an
    /// older format are rewritten in the current one first (flushed).
    pub fn open(db: &sled::Db, disk: crate::disk::DiskGuard) -> Result<Registry, RegistryError> {
        let registry = Registry {
            tree: db.open_tree(TREE)?,
            disk,
        };
        registry.migrate()?;
        Ok(registry)
    }

    fn migrate(&self) -> Result<(), RegistryError> {
        let mut upgraded = 0usize;
        for item in self.tree.iter() {
            let (key, value) = item?;
            let thing = String::from_utf8_lossy(&key).into_owned();
            let (record, changed) = stored(&thing, &value)?.upgrade();
            if changed {
                self.tree.insert(key, encode(&record)?)?;
                upgraded += 1;
            }
        }
        if upgraded > 0 {
            self.tree.flush()?;
            tracing::info!(
                records = upgraded,
                format = FORMAT,
                "device registry upgraded"
            );
        }
        Ok(())
    }

    pub fn get(&self, thing: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.tree
            .get(thing.as_bytes())?
            .map(|bytes| decode(thing, &bytes))
            .transpose()
    }

    /// Records a connection attempt by `thing` with `cert_id`; creates a pending record for a
    /// thing never seen before, and a pending certificate for one not seen before (approved
    /// instead when the thing was approved ahead of its first certificate).
    ///
    /// Below the disk reserve a known device's sighting is not written (its record is
    /// returned as it is) and an unknown device is refused for now, so that a flood of new
    /// certificates cannot fill the disk the spool needs.
    pub fn observe(
        &self,
        thing: &str,
        cert_id: &str,
        listing: Option<Listing<'_>>,
    ) -> Result<DeviceRecord, RegistryError> {
        if let Err(low) = self.disk.check(0) {
            return match self.get(thing)? {
                Some(record) => Ok(record),
                None => Err(low.into()),
            };
        }
        let known = self
            .get(thing)?
            .is_some_and(|r| r.cert(cert_id).is_some() && !r.approve_next);
        // A known certificate's sighting is not flushed: lost to a crash it costs nothing, and
        // a reconnect storm must not wait on one fsync per device. A new certificate, which
        // may take an approval given ahead, is.
        let durability = if known {
            Durability::Lazy
        } else {
            Durability::Flushed
        };
        self.update(thing, durability, |r| {
            let now = crate::clock::now_ms();
            r.first_seen_ms.get_or_insert(now);
            r.last_seen_ms = Some(now);
            let approve = r.approve_next && r.cert(cert_id).is_none();
            let cert = r.cert_mut(cert_id);
            cert.first_seen_ms.get_or_insert(now);
            cert.last_seen_ms = Some(now);
            if let Some(l) = listing {
                cert.issuer.get_or_insert_with(|| l.issuer.to_owned());
                cert.serial.get_or_insert_with(|| l.serial.to_owned());
            }
            if approve {
                cert.state = DeviceState::Approved;
                r.approve_next = false;
            }
        })
    }

    /// Approves `thing` (known or not yet seen) and adds `groups` to its assigned groups.
    /// With `cert`, that certificate is approved (even before it is seen); without, every
    /// pending certificate is, or for a thing never seen the first one it connects with. A
    /// revoked certificate stays revoked.
    pub fn approve(
        &self,
        thing: &str,
        cert: Option<&str>,
        groups: &[String],
    ) -> Result<DeviceRecord, RegistryError> {
        self.update(thing, Durability::Flushed, |r| {
            r.revoked = false;
            match cert {
                Some(id) => {
                    let c = r.cert_mut(id);
                    if c.state != DeviceState::Revoked {
                        c.state = DeviceState::Approved;
                        c.voucher = Voucher::Operator;
                        c.reason = None;
                    }
                }
                None => {
                    for c in &mut r.certs {
                        if c.state == DeviceState::Pending {
                            c.state = DeviceState::Approved;
                            c.voucher = Voucher::Operator;
                            c.reason = None;
                        }
                    }
                    // Ahead of its first connection only: a thing that had certificates
                    // gets a new one approved by id, or once it is seen (pending).
                    r.approve_next = r.certs.is_empty();
                }
            }
            for g in groups {
                if !r.groups.contains(g) {
                    r.groups.push(g.clone());
                }
            }
            r.updated_ms = crate::clock::now_ms();
        })
    }

    /// Records `cert_id`, just signed for `thing` by enrollment for the key whose SHA-256 is
    /// `key_digest`, as pending with `reason`, or approved when an operator approved the thing
    /// ahead of its first certificate. The caller has checked the thing may enroll (not
    /// revoked, no approved certificate).
    pub fn enroll(
        &self,
        thing: &str,
        cert_id: &str,
        key_digest: &str,
        reason: &str,
    ) -> Result<DeviceRecord, RegistryError> {
        self.disk.check(0)?;
        self.update(thing, Durability::Flushed, |r| {
            let approve = r.approve_next;
            let cert = r.cert_mut(cert_id);
            cert.enrolled_key = Some(key_digest.to_owned());
            if approve {
                cert.state = DeviceState::Approved;
                cert.voucher = Voucher::Operator;
            } else {
                cert.reason = Some(reason.to_owned());
            }
            r.approve_next = false;
            r.updated_ms = crate::clock::now_ms();
        })
    }

    /// Revokes `thing` (every certificate of it, and any it connects with until approved
    /// again), or with `cert` only that certificate, for good.
    pub fn revoke(&self, thing: &str, cert: Option<&str>) -> Result<DeviceRecord, RegistryError> {
        self.update(thing, Durability::Flushed, |r| {
            match cert {
                Some(id) => r.cert_mut(id).state = DeviceState::Revoked,
                None => {
                    r.revoked = true;
                    r.approve_next = false;
                    for c in &mut r.certs {
                        c.state = DeviceState::Revoked;
                    }
                }
            }
            r.updated_ms = crate::clock::now_ms();
        })
    }

    /// Revokes every certificate seen whose (issuer, serial) is in `listed`, giving
    /// [`LISTED_IN_CRL`] as the reason; returns the (thing, certificate id) pairs it revoked.
    pub fn revoke_listed(
        &self,
        listed: &std::collections::HashSet<(String, String)>,
    ) -> Result<Vec<(String, String)>, RegistryError> {
        let mut revoked = Vec::new();
        for record in self.list()? {
            for c in &record.certs {
                let (Some(issuer), Some(serial)) = (&c.issuer, &c.serial) else {
                    continue;
                };
                if c.state == DeviceState::Revoked
                    || !listed.contains(&(issuer.clone(), serial.clone()))
                {
                    continue;
                }
                self.update(&record.thing, Durability::Flushed, |r| {
                    let cert = r.cert_mut(&c.id);
                    cert.state = DeviceState::Revoked;
                    cert.reason = Some(LISTED_IN_CRL.to_owned());
                    r.updated_ms = crate::clock::now_ms();
                })?;
                revoked.push((record.thing.clone(), c.id.clone()));
            }
        }
        Ok(revoked)
    }

    /// Records what the AWS IoT registry said of `cert_id` at `now` (see `auth::verifier` for
    /// what each answer does); true when the record changed in a way a grant can see.
    pub fn record_finding(
        &self,
        thing: &str,
        cert_id: &str,
        finding: &Finding,
        now: u64,
    ) -> Result<bool, RegistryError> {
        let before = self.get(thing)?;
        // Flushed only when the answer changed something: a sync that finds every certificate
        // as it was (the usual round) must not cost one fsync per certificate.
        let record = self.update(thing, Durability::Lazy, |r| {
            let cert = r.cert_mut(cert_id);
            match finding {
                Finding::Approved(_) => {
                    cert.checked_ms = Some(now);
                    if cert.state == DeviceState::Pending {
                        cert.state = DeviceState::Approved;
                        cert.voucher = Voucher::Registry;
                    }
                    if cert.state == DeviceState::Approved {
                        cert.reason = None;
                    }
                }
                Finding::Revoked(why) => {
                    cert.checked_ms = Some(now);
                    cert.state = DeviceState::Revoked;
                    cert.reason = Some(why.clone());
                }
                Finding::Refused(why) => {
                    cert.checked_ms = Some(now);
                    if cert.state != DeviceState::Revoked {
                        cert.state = DeviceState::Pending;
                        cert.reason = Some(why.clone());
                    }
                }
                Finding::Unknown(why) => {
                    cert.checked_ms = Some(now);
                    let by_registry = cert.voucher == Voucher::Registry;
                    if cert.state == DeviceState::Pending
                        || (cert.state == DeviceState::Approved && by_registry)
                    {
                        cert.state = DeviceState::Pending;
                        cert.reason = Some(why.clone());
                    }
                }
            }
            if let Finding::Approved(cloud) = finding {
                r.cloud = Some(cloud.clone());
            }
        })?;
        let seen = |r: &DeviceRecord| {
            let c = r.cert(cert_id);
            (
                c.map(|c| (c.state, c.reason.clone(), c.voucher)),
                r.cloud.clone(),
            )
        };
        let changed = before.as_ref().map(seen) != Some(seen(&record));
        if changed {
            self.tree.flush()?;
        }
        Ok(changed)
    }

    /// The thing holding certificate `cert_id`, if the registry knows it.
    pub fn thing_of_cert(&self, cert_id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        Ok(self.list()?.into_iter().find(|r| r.cert(cert_id).is_some()))
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
        let mut failed = None;
        self.tree.update_and_fetch(thing.as_bytes(), |old| {
            let mut record = match old.map(|b| decode(thing, b)) {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    failed = Some(e);
                    return old.map(|b| b.to_vec());
                }
                None => DeviceRecord::new(thing),
            };
            change(&mut record);
            match encode(&record) {
                Ok(bytes) => {
                    result = Some(record);
                    Some(bytes)
                }
                Err(e) => {
                    failed = Some(e);
                    old.map(|b| b.to_vec())
                }
            }
        })?;
        if let Some(e) = failed {
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

fn stored(thing: &str, bytes: &[u8]) -> Result<Stored, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        thing: thing.to_owned(),
        reason: e.to_string(),
    })
}

fn encode(record: &DeviceRecord) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(&StoredRef {
        format: FORMAT,
        record,
    })
    .map_err(|e| RegistryError::Corrupt {
        thing: record.thing.clone(),
        reason: e.to_string(),
    })
}

/// A stored record in the current format (an older one is upgraded on the fly: `open` has
/// rewritten them all, so this is for a record written by an older gateway since).
fn decode(thing: &str, bytes: &[u8]) -> Result<DeviceRecord, RegistryError> {
    Ok(stored(thing, bytes)?.upgrade().0)
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
    fn new_things_are_pending_and_collect_their_certificates() {
        let (_d, r) = registry();
        let rec = r.observe("pump-1", "aa", None).unwrap();
        assert_eq!(rec.state(), DeviceState::Pending);
        r.observe("pump-1", "bb", None).unwrap();
        let rec = r.observe("pump-1", "aa", None).unwrap();
        let ids: Vec<&str> = rec.certs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, vec!["aa", "bb"]);
        assert_eq!(rec.cert_state("aa"), DeviceState::Pending);
    }

    /// The stolen-certificate case: a second certificate for an approved thing waits, and
    /// re-approving the thing after a revocation never brings a revoked certificate back.
    #[test]
    fn status_is_per_certificate() {
        let (_d, r) = registry();
        r.observe("pump-1", "good", None).unwrap();
        let rec = r.approve("pump-1", None, &[]).unwrap();
        assert_eq!(rec.cert_state("good"), DeviceState::Approved);
        let rec = r.observe("pump-1", "stolen", None).unwrap();
        assert_eq!(
            rec.cert_state("stolen"),
            DeviceState::Pending,
            "a new certificate waits"
        );
        assert_eq!(rec.cert_state("good"), DeviceState::Approved);
        assert_eq!(rec.state(), DeviceState::Approved);

        // Revoked one by one: the other keeps working.
        let rec = r.revoke("pump-1", Some("stolen")).unwrap();
        assert_eq!(rec.cert_state("stolen"), DeviceState::Revoked);
        assert_eq!(rec.cert_state("good"), DeviceState::Approved);
        let rec = r.approve("pump-1", None, &[]).unwrap();
        assert_eq!(
            rec.cert_state("stolen"),
            DeviceState::Revoked,
            "never reinstated"
        );
        let rec = r.approve("pump-1", Some("stolen"), &[]).unwrap();
        assert_eq!(
            rec.cert_state("stolen"),
            DeviceState::Revoked,
            "not even by id"
        );

        // The whole thing: every certificate, and any new one, until approved again.
        let rec = r.revoke("pump-1", None).unwrap();
        assert_eq!(rec.cert_state("good"), DeviceState::Revoked);
        assert_eq!(rec.cert_state("brand-new"), DeviceState::Revoked);
        let rec = r.approve("pump-1", None, &[]).unwrap();
        assert_eq!(rec.state(), DeviceState::Pending, "nothing left to approve");
        assert_eq!(rec.cert_state("good"), DeviceState::Revoked);
        // A certificate made for it since is approved by id, before it ever connects.
        let rec = r.approve("pump-1", Some("reissued"), &[]).unwrap();
        assert_eq!(rec.cert_state("reissued"), DeviceState::Approved);
        assert_eq!(rec.cert("reissued").unwrap().first_seen_ms, None);
    }

    #[test]
    fn approval_ahead_of_the_first_connection_takes_the_first_certificate_only() {
        let (_d, r) = registry();
        let rec = r.approve("door-1", None, &["doors".into()]).unwrap();
        assert!(rec.approve_next);
        assert_eq!(rec.state(), DeviceState::Approved);
        let rec = r.observe("door-1", "first", None).unwrap();
        assert_eq!(rec.cert_state("first"), DeviceState::Approved);
        assert!(!rec.approve_next);
        let rec = r.observe("door-1", "second", None).unwrap();
        assert_eq!(rec.cert_state("second"), DeviceState::Pending);
        assert_eq!(rec.groups, vec!["doors"]);
    }

    #[test]
    fn below_the_disk_reserve_new_devices_wait_and_known_ones_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        {
            let r = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
            r.observe("pump-1", "aa", None).unwrap();
            r.approve("pump-1", None, &["pumps".into()]).unwrap();
        }
        let full = crate::disk::DiskGuard::new(dir.path(), u64::MAX / 4);
        let r = Registry::open(&db, full).unwrap();
        let err = r.observe("stranger-1", "cc", None).unwrap_err();
        assert!(matches!(err, RegistryError::DiskLow(_)), "{err}");
        assert!(err.retryable(), "a CONNECT refused now may succeed later");
        assert!(r.get("stranger-1").unwrap().is_none(), "nothing written");
        let known = r.observe("pump-1", "aa", None).unwrap();
        assert_eq!(known.cert_state("aa"), DeviceState::Approved);
        let other = r.observe("pump-1", "dd", None).unwrap();
        assert!(other.cert("dd").is_none(), "the sighting is not written");
        // An operator's decision still goes through: it is small, and the reserve is for it.
        r.approve("stranger-1", None, &[]).unwrap();
    }

    #[test]
    fn approve_then_revoke_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            let r = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
            r.observe("pump-1", "p1", None).unwrap();
            r.approve("pump-1", None, &["pumps".into()]).unwrap();
            r.approve("pump-1", None, &["pumps".into(), "extra".into()])
                .unwrap();
            r.approve("door-1", None, &[]).unwrap();
            r.revoke("door-1", None).unwrap();
        }
        let db = sled::open(dir.path().join("db")).unwrap();
        let r = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
        let pump = r.get("pump-1").unwrap().unwrap();
        assert_eq!(pump.cert_state("p1"), DeviceState::Approved);
        assert_eq!(pump.groups, vec!["pumps", "extra"]);
        assert_eq!(
            r.get("door-1").unwrap().unwrap().state(),
            DeviceState::Revoked
        );
        assert_eq!(r.list().unwrap().len(), 2);
        assert!(r.get("nobody").unwrap().is_none());
        assert_eq!(r.thing_of_cert("p1").unwrap().unwrap().thing, "pump-1");
    }

    /// A registry written by the gateway before per-certificate status (one state per thing,
    /// `cert_ids`), as those records were stored, is upgraded when it opens.
    #[test]
    fn a_format_1_registry_is_upgraded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let tree = db.open_tree(TREE).unwrap();
        let old = |thing: &str, state: &str, certs: &[&str]| {
            serde_json::json!({
                "thing": thing, "state": state, "groups": ["pumps"], "cert_ids": certs,
                "first_seen_ms": 5, "last_seen_ms": 9, "updated_ms": 9
            })
            .to_string()
        };
        tree.insert(
            "pump-1",
            old("pump-1", "approved", &["a1", "a2"]).as_bytes(),
        )
        .unwrap();
        tree.insert("door-1", old("door-1", "revoked", &["d1"]).as_bytes())
            .unwrap();
        tree.insert("kiosk-1", old("kiosk-1", "pending", &["k1"]).as_bytes())
            .unwrap();
        tree.insert("early-1", old("early-1", "approved", &[]).as_bytes())
            .unwrap();
        drop(tree);
        let r = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
        let pump = r.get("pump-1").unwrap().unwrap();
        assert_eq!(pump.cert_state("a1"), DeviceState::Approved);
        assert_eq!(pump.cert_state("a2"), DeviceState::Approved);
        assert_eq!(pump.cert_state("new"), DeviceState::Pending);
        assert_eq!(pump.groups, vec!["pumps"]);
        assert_eq!(pump.cert("a1").unwrap().first_seen_ms, Some(5));
        let door = r.get("door-1").unwrap().unwrap();
        assert_eq!(door.cert_state("d1"), DeviceState::Revoked);
        assert_eq!(door.cert_state("other"), DeviceState::Revoked);
        let kiosk = r.get("kiosk-1").unwrap().unwrap();
        assert_eq!(kiosk.cert_state("k1"), DeviceState::Pending);
        assert!(r.get("early-1").unwrap().unwrap().approve_next);
        // Rewritten in the new format, not upgraded again on every read.
        let raw: serde_json::Value =
            serde_json::from_slice(&db.open_tree(TREE).unwrap().get("pump-1").unwrap().unwrap())
                .unwrap();
        assert_eq!(raw["format"], 2);
        assert!(
            raw.get("cert_ids").is_none() && raw.get("state").is_none(),
            "{raw}"
        );
        // Opening again changes nothing.
        let again = Registry::open(&db, crate::disk::DiskGuard::off()).unwrap();
        assert_eq!(again.get("pump-1").unwrap().unwrap(), pump);
    }
}
