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
//! - `registry`: the sled-backed device registry (pending, approved, revoked).

mod config;
pub mod policy;
mod registry;

use tokio::sync::watch;

pub use config::{AuthConfig, DeviceGroupConfig, StatementConfig};
pub use policy::{Operation, Permissions, PolicySet, PROVISIONING_GROUP};
pub use registry::{DeviceRecord, DeviceState, Registry, RegistryError};

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
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Policies plus registry plus the change epoch that sessions watch.
pub struct Authority {
    policies: PolicySet,
    registry: Registry,
    epoch: watch::Sender<u64>,
}

impl Authority {
    pub fn new(policies: PolicySet, registry: Registry) -> Authority {
        let (epoch, _) = watch::channel(0);
        Authority {
            policies,
            registry,
            epoch,
        }
    }

    /// A receiver that changes whenever an approval or revocation happens.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Records a connecting device and returns what it may do now.
    pub fn admit(&self, thing: &str, cert_id: &str) -> Result<Grant, RegistryError> {
        let record = self.registry.observe(thing, cert_id)?;
        Ok(self.grant_from(thing, Some(&record)))
    }

    /// What `thing` may do now, read again from the registry (after an epoch change).
    pub fn current_grant(&self, thing: &str) -> Result<Grant, RegistryError> {
        let record = self.registry.get(thing)?;
        Ok(self.grant_from(thing, record.as_ref()))
    }

    fn grant_from(&self, thing: &str, record: Option<&DeviceRecord>) -> Grant {
        let state = record.map_or(DeviceState::Pending, |r| r.state);
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
                let mut groups = self.policies.groups_matching(thing);
                for g in record.map(|r| r.groups.as_slice()).unwrap_or_default() {
                    if !groups.contains(g) && self.policies.has_group(g) {
                        groups.push(g.clone());
                    }
                }
                let permissions = self.policies.permissions(thing, &groups);
                Grant {
                    state,
                    groups,
                    permissions,
                }
            }
        }
    }

    /// Approves `thing`, adding `groups`; live sessions pick it up at their next packet.
    pub fn approve(&self, thing: &str, groups: &[String]) -> Result<DeviceRecord, AdminError> {
        if !crate::identity::valid_thing_name(thing) {
            return Err(AdminError::InvalidThing(thing.to_owned()));
        }
        if let Some(unknown) = groups.iter().find(|g| !self.policies.has_group(g)) {
            return Err(AdminError::UnknownGroup(unknown.clone()));
        }
        let record = self.registry.approve(thing, groups)?;
        self.epoch.send_modify(|e| *e += 1);
        Ok(record)
    }

    /// Revokes `thing`; the caller also disconnects its live session.
    pub fn revoke(&self, thing: &str) -> Result<DeviceRecord, AdminError> {
        if !crate::identity::valid_thing_name(thing) {
            return Err(AdminError::InvalidThing(thing.to_owned()));
        }
        // A thing never seen may be revoked ahead of time: it is then refused at its first CONNECT.
        let record = self.registry.revoke(thing)?;
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
