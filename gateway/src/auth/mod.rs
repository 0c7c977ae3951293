//! Who a device is allowed to be and what it may do, decided server-side for every packet.
//!
//! [`Authority`] joins the compiled policies of the config with the device registry: at CONNECT
//! it records the device and hands the session a [`Grant`]; when an operator approves or
//! revokes a thing it bumps an epoch that live sessions watch, so the change reaches a live
//! connection at its next packet without a reconnect.
//!
//! Layout:
//! - `config`: the `[auth]` section (groups, policies, statements).
//! - `policy`: selection rules, resource patterns, [`Permissions`] per device.
//! - `registry`: the sled-backed device registry (things, and each one's certificates:
//!   pending, approved, revoked).
//! - `verifier`: the AWS IoT registry vouching for certificates (`[auth.registry]`).
//! - `enrollment`: devices with a claim certificate asking for their own
//!   (`[auth.enrollment]`): signing, the pending enrollments, their answers.

mod config;
pub mod enrollment;
pub mod policy;
mod registry;
pub mod verifier;

use tokio::sync::watch;

pub use config::{
    AuthConfig, DeviceGroupConfig, EnrollmentConfig, RegistryConfig, StatementConfig,
    DEFAULT_CLAIM_SESSION_LIMIT, DEFAULT_ENROLLED_CERT_DAYS, DEFAULT_ENROLL_REQUESTS_PER_MINUTE,
    DEFAULT_MAX_CLAIM_SESSIONS, DEFAULT_MAX_PENDING_ENROLLMENTS, DEFAULT_SYNC_INTERVAL,
    DEFAULT_TRUST_FOR,
};
pub use enrollment::Enrollment;
pub use policy::{Facts, Operation, Permissions, PolicySet, PROVISIONING_GROUP};
pub use registry::{
    CertRecord, Cloud, DeviceRecord, DeviceState, Listing, Registry, RegistryError, Voucher,
    LISTED_IN_CRL,
};
pub use verifier::{SyncReport, Verifier};

/// What a connected device currently holds.
#[derive(Debug, Clone)]
pub struct Grant {
    pub state: DeviceState,
    pub groups: Vec<String>,
    pub permissions: Permissions,
}

/// Why an operator command on the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("unknown group {0:?}: define it under [auth.device_groups] first")]
    UnknownGroup(String),
    #[error("{0:?} is not a valid thing name (1-128 of letters, digits, : _ -)")]
    InvalidThing(String),
    #[error("{0:?} is not a certificate id (64 lowercase hex digits: the SHA-256 of its DER)")]
    InvalidCertId(String),
    #[error("no thing has certificate {0:?}")]
    UnknownCert(String),
    #[error("name the thing to revoke, or a certificate with --cert")]
    NothingNamed,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Policies plus registry plus the change epoch that sessions watch.
pub struct Authority {
    policies: PolicySet,
    registry: Registry,
    epoch: watch::Sender<u64>,
    verifier: Option<std::sync::Arc<Verifier>>,
}

impl Authority {
    pub fn new(policies: PolicySet, registry: Registry) -> Authority {
        let (epoch, _) = watch::channel(0);
        Authority {
            policies,
            registry,
            epoch,
            verifier: None,
        }
    }

    /// The authority with a registry that vouches for undecided certificates.
    pub fn with_verifier(mut self, verifier: std::sync::Arc<Verifier>) -> Authority {
        self.verifier = Some(verifier);
        self
    }

    pub fn verifier(&self) -> Option<&std::sync::Arc<Verifier>> {
        self.verifier.as_ref()
    }

    /// Tells live sessions to re-read their grants.
    pub(crate) fn bump(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// The state of `cert_id` in `record`, with the registry's answers subject to their trust.
    fn state_of(&self, record: &DeviceRecord, cert_id: &str) -> DeviceState {
        let trust = self.verifier.as_ref().map(|v| {
            let ms = u64::try_from(v.trust_for().as_millis()).unwrap_or(u64::MAX);
            (crate::clock::now_ms(), ms)
        });
        record.cert_state_at(cert_id, trust)
    }

    /// A receiver that changes whenever an approval or revocation happens.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Records a connecting device and returns what it may do now: what its certificate's
    /// state allows.
    pub fn admit(
        &self,
        thing: &str,
        cert_id: &str,
        listing: Option<Listing<'_>>,
    ) -> Result<Grant, RegistryError> {
        let record = self.registry.observe(thing, cert_id, listing)?;
        Ok(self.grant_from(thing, self.state_of(&record, cert_id), Some(&record)))
    }

    /// Records a certificate just signed for an enrolling `thing` (pending with `reason`, or
    /// approved when the thing was approved ahead); sessions re-read their grants.
    pub fn enrolled(
        &self,
        thing: &str,
        cert_id: &str,
        key_digest: &str,
        reason: &str,
    ) -> Result<DeviceRecord, RegistryError> {
        let record = self.registry.enroll(thing, cert_id, key_digest, reason)?;
        self.bump();
        Ok(record)
    }

    /// Revokes the certificates seen that a revocation list now names (`listed`: issuer DN
    /// and serial); their live sessions end at once. Returns (thing, certificate id) of each.
    pub fn revoke_listed(
        &self,
        listed: &std::collections::HashSet<(String, String)>,
    ) -> Result<Vec<(String, String)>, RegistryError> {
        let revoked = self.registry.revoke_listed(listed)?;
        if !revoked.is_empty() {
            self.epoch.send_modify(|e| *e += 1);
        }
        Ok(revoked)
    }

    /// What `thing` connected with `cert_id` may do now, read again from the registry (after
    /// an epoch change).
    pub fn current_grant(&self, thing: &str, cert_id: &str) -> Result<Grant, RegistryError> {
        let record = self.registry.get(thing)?;
        let state = record
            .as_ref()
            .map_or(DeviceState::Pending, |r| self.state_of(r, cert_id));
        Ok(self.grant_from(thing, state, record.as_ref()))
    }

    /// The groups `thing` holds when approved, for `device list`.
    pub fn groups_of(&self, record: &DeviceRecord) -> Vec<String> {
        self.grant_from(&record.thing, record.state(), Some(record))
            .groups
    }

    fn grant_from(&self, thing: &str, state: DeviceState, record: Option<&DeviceRecord>) -> Grant {
        match state {
            DeviceState::Revoked => Grant {
                state,
                groups: Vec::new(),
                permissions: Permissions::none(),
            },
            DeviceState::Pending => Grant {
                state,
                groups: vec![PROVISIONING_GROUP.to_owned()],
                permissions: self.policies.provisioning_permissions(thing),
            },
            DeviceState::Approved => {
                let facts = record.map_or_else(|| Facts::named(thing), DeviceRecord::facts);
                let mut groups = self.policies.groups_matching(&facts);
                for g in record.map(|r| r.groups.as_slice()).unwrap_or_default() {
                    if !groups.contains(g) && self.policies.has_group(g) {
                        groups.push(g.clone());
                    }
                }
                let permissions = self.policies.permissions(&facts, &groups);
                Grant {
                    state,
                    groups,
                    permissions,
                }
            }
        }
    }

    /// Approves `thing`'s pending certificates (or with `cert` that one, even before it is
    /// seen), adding `groups`; live sessions pick it up at once.
    pub fn approve(
        &self,
        thing: &str,
        cert: Option<&str>,
        groups: &[String],
    ) -> Result<DeviceRecord, AdminError> {
        if !crate::identity::valid_thing_name(thing) {
            return Err(AdminError::InvalidThing(thing.to_owned()));
        }
        if let Some(c) = cert.filter(|c| !valid_cert_id(c)) {
            return Err(AdminError::InvalidCertId(c.to_owned()));
        }
        if let Some(unknown) = groups.iter().find(|g| !self.policies.has_group(g)) {
            return Err(AdminError::UnknownGroup(unknown.clone()));
        }
        let record = self.registry.approve(thing, cert, groups)?;
        self.epoch.send_modify(|e| *e += 1);
        Ok(record)
    }

    /// Revokes `thing` (all its certificates), or with `cert` only that certificate (`thing`
    /// then may be `None`: the thing holding it). A live session on a revoked certificate
    /// ends at once (it watches the epoch); the caller also ends the thing's session.
    pub fn revoke(
        &self,
        thing: Option<&str>,
        cert: Option<&str>,
    ) -> Result<DeviceRecord, AdminError> {
        if let Some(c) = cert.filter(|c| !valid_cert_id(c)) {
            return Err(AdminError::InvalidCertId(c.to_owned()));
        }
        let thing = match (thing, cert) {
            (Some(t), _) => t.to_owned(),
            (None, Some(c)) => self
                .registry
                .thing_of_cert(c)?
                .map(|r| r.thing)
                .ok_or_else(|| AdminError::UnknownCert(c.to_owned()))?,
            (None, None) => return Err(AdminError::NothingNamed),
        };
        if !crate::identity::valid_thing_name(&thing) {
            return Err(AdminError::InvalidThing(thing));
        }
        // A thing never seen may be revoked ahead of time: it is then refused at its first CONNECT.
        let record = self.registry.revoke(&thing, cert)?;
        self.epoch.send_modify(|e| *e += 1);
        Ok(record)
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }
}

/// Whether `id` is a certificate id as the gateway names certificates: the SHA-256 of the DER
/// as 64 lowercase hex digits.
pub fn valid_cert_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
