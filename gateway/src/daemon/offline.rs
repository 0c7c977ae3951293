//! A stopped gateway's state, worked on by the CLI: the registry behind `sitegate device …`,
//! the spool behind `sitegate spool status` and `recover`. Each opens the store the way the
//! daemon does ([`super::open_store`]) but never sets damage aside (`OnDamage::Fail`): a tool
//! reports what it found and leaves repair to the daemon.

use std::path::Path;
use std::sync::Arc;

use super::{open_store, RunError};
use crate::auth::{Authority, PolicySet, Registry, RegistryError};
use crate::config::{Config, ConfigError};
use crate::disk::DiskGuard;
use crate::edge::SessionTable;
use crate::metrics::Stats;
use crate::ops::admin::{AdminRequest, AdminResponse, AdminService};
use crate::spool::store::{OnDamage, STORE_DIR};
use crate::spool::{salvage, Spool, SpoolError, SpoolStatus};

/// Carries out `requests` on a stopped gateway's registry, opened once for all of them.
pub async fn offline(
    config: &Config,
    requests: Vec<AdminRequest>,
) -> Result<Vec<AdminResponse>, RunError> {
    let db = open_store(&config.data_dir, OnDamage::Fail)?;
    let policies = PolicySet::compile(&config.auth).map_err(ConfigError::from)?;
    let service = AdminService {
        authority: Arc::new(Authority::new(
            policies,
            Registry::open(&db, DiskGuard::off())?,
        )),
        sessions: Arc::new(SessionTable::default()),
        stats: Arc::new(Stats::default()),
        spool: None,
        rules: Arc::default(),
        downlinks: None,
    };
    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        responses.push(service.handle(request).await);
    }
    db.flush().map_err(RegistryError::from)?;
    Ok(responses)
}

/// Depth and health per sink, read from a stopped gateway's `data_dir`.
pub fn offline_spool_status(data_dir: &Path) -> Result<SpoolStatus, RunError> {
    let path = data_dir.join(STORE_DIR);
    if !path.exists() {
        return Err(RunError::NoSpool(path));
    }
    let db = open_store(data_dir, OnDamage::Fail)?;
    crate::spool::status::offline(&db, data_dir).map_err(|e| SpoolError::from(e).into())
}

/// `sitegate spool recover`: opens the stopped gateway's spool and salvages into it the
/// records the ledger lists as lost, from the damaged store at `damaged`.
pub async fn recover(config: &Config, damaged: &Path) -> Result<salvage::Report, RunError> {
    config.validate()?;
    let db = open_store(&config.data_dir, OnDamage::Fail)?;
    let spool = Spool::open(
        db,
        &config.spool,
        &config.data_dir,
        config.sinks.keys().cloned(),
    )
    .await?;
    let report = salvage::recover(&spool, damaged).await?;
    spool.settle().await?;
    Ok(report)
}
