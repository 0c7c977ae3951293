//! The daemon: everything `sitegate run` starts, behind a testable entry point.
//!
//! [`run`] takes a validated config, listeners the caller already bound (tests bind port 0),
//! and a shutdown future; it returns once the gateway has stopped cleanly. [`Gateway`] is the
//! same thing in two steps, for callers that want the counters or the bound address meanwhile.
//!
//! Layout:
//! - here: binding, [`Gateway::start`] (state, edge, delivery, pipeline, serving), the stop.
//! - `offline`: the same state worked on while no daemon runs (registry requests, spool status
//!   and recovery), for the CLI.

mod offline;

pub use offline::{offline, offline_spool_status, recover};

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::auth::{Authority, PolicySet, Registry, RegistryError};
use crate::config::{Config, ConfigError};
use crate::control::Live;
use crate::delivery::SinkSet;
use crate::edge::{
    EdgeContext, EndReason, Fabric, FabricLimits, Limits, Republisher, SessionTable,
};
use crate::identity::tls::TlsSetupError;
use crate::metrics::Stats;
use crate::ops::admin::{self, AdminService};
use crate::pipeline::{self, CommitSettings, PipelineError};
use crate::spool::store::{OnDamage, StoreError};
use crate::spool::{Spool, SpoolError};
use sitegate_plugins::nucleus::{IpcError, Nucleus};

/// How long shutdown waits for sessions to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The whole of a stop at most (well inside systemd's and the nucleus's SIGTERM timeouts);
/// past it the gateway gives up on a clean stop and reports it.
pub const STOP_DEADLINE: Duration = Duration::from_secs(25);
/// Router links beyond the device limit, for the gateway's own links.
const INTERNAL_LINKS: usize = 16;

/// Why the gateway could not start. None of these is fixed by retrying without a change,
/// except `Bind` when another process is about to release the address.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("cannot start the rules: {0}")]
    Rules(#[from] PipelineError),
    #[error("cannot start sink `{name}`: {source}")]
    Sink {
        name: String,
        source: sitegate_plugins::SinkError,
    },
    #[error("greengrass.ipc: {0}")]
    Nucleus(#[from] IpcError),
    #[error(transparent)]
    Enrollment(#[from] crate::auth::enrollment::EnrollSetupError),
    #[error("cannot start the downlinks: {0}")]
    Downlink(#[from] crate::downlink::DownlinkError),
    /// An offline tool found no spool where the config says one is.
    #[error("no spool in {} (no such directory)", .0.display())]
    NoSpool(PathBuf),
    #[error(transparent)]
    Salvage(#[from] crate::spool::salvage::SalvageError),
    /// The store failed while running, or the stop ran out of time. Restarting can help:
    /// sled recovers its files at the next open.
    #[error("stopped because {0}; exiting non-zero so that the supervisor restarts the gateway")]
    Stopped(String),
}

/// The sockets the gateway serves; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub mqtts: TcpListener,
    pub admin: UnixListener,
    /// The Prometheus endpoint (`[admin] metrics`), when served.
    pub metrics: Option<TcpListener>,
    /// The Greengrass nucleus's IPC connection (`[greengrass] ipc = true`).
    pub nucleus: Option<Arc<Nucleus>>,
}

impl Listeners {
    /// Binds `[listener] mqtts` and the admin socket named by the config.
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let mqtts = crate::edge::bind(&config.listener.mqtts)
            .await
            .map_err(|source| RunError::Bind {
                what: "listener.mqtts",
                addr: config.listener.mqtts.clone(),
                source,
            })?;
        let socket = config.admin_socket();
        let admin = admin::bind(&socket).map_err(|source| RunError::Bind {
            what: "admin socket",
            addr: socket.display().to_string(),
            source,
        })?;
        let metrics = match &config.admin.metrics {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::Bind {
                        what: "admin.metrics",
                        addr: addr.clone(),
                        source,
                    })?,
            ),
        };
        let nucleus = if config.greengrass.ipc {
            Some(Arc::new(Nucleus::from_env().await?))
        } else {
            None
        };
        Ok(Listeners {
            mqtts,
            admin,
            metrics,
            nucleus,
        })
    }
}

/// Raises this process's open-file limit to its hard limit (each device connection is a
/// descriptor; the soft limit is often 1024); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// Raises the open-file limit and warns when it is still below `connections` (plus the
/// gateway's own files); `setting` names what asks for that many.
pub fn check_fd_limit(connections: usize, setting: &str) {
    let limit = raise_fd_limit();
    if (limit as usize) < connections + 64 {
        tracing::warn!(
            open_files = limit,
            needed = connections + 64,
            "the open-file limit is below what {setting} needs: raise LimitNOFILE in the unit, or `ulimit -n` (and the hard limit in /etc/security/limits.conf)"
        );
    }
}

/// Creates `dir` readable by its owner only (the registry names every device, and sled writes
/// its files 0644); an existing one that others may read is reported, not changed.
pub fn private_dir(dir: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    let io = |source| RunError::DataDir {
        path: dir.to_owned(),
        source,
    };
    made.map_err(io)?;
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(data_dir = %dir.display(), mode = format!("{mode:o}"), "data_dir can be read by other users (the device registry and store are inside); chmod 700 it");
    }
    Ok(())
}

/// Opens the gateway's sled database under `data_dir`. The daemon sets a damaged store aside
/// and starts on a fresh one (`OnDamage::SetAside`); offline tools report it (`Fail`).
pub fn open_store(data_dir: &Path, on_damage: OnDamage) -> Result<sled::Db, RunError> {
    private_dir(data_dir)?;
    Ok(crate::spool::store::open(data_dir, on_damage)?.0)
}

/// A started gateway.
pub struct Gateway {
    local_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    sessions: Arc<SessionTable>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    committer: JoinHandle<()>,
    sinks: Arc<tokio::sync::Mutex<SinkSet>>,
    background: Vec<JoinHandle<()>>,
    spool: Arc<Spool>,
    live: Arc<Live>,
    db: sled::Db,
    /// The device edge, for keeping persistent sessions at the stop.
    edge: Arc<EdgeContext>,
}

/// Builds every configured sink and starts its drain.
async fn start_sinks(
    config: &Config,
    spool: &Arc<Spool>,
    fabric: &Arc<Fabric>,
    nucleus: &Option<Arc<Nucleus>>,
    stats: &Arc<Stats>,
) -> Result<SinkSet, RunError> {
    let mut sink_set = SinkSet::new(
        Arc::clone(spool),
        Arc::new(Republisher::new(
            Arc::clone(fabric),
            config.listener.topic_limits(),
        )),
        nucleus.clone(),
        Arc::clone(stats),
        config.site_name(),
        config.rules.error_sink.clone(),
    );
    for (name, sink_config) in &config.sinks {
        let sink = sink_set
            .build(name, sink_config)
            .await
            .map_err(|source| RunError::Sink {
                name: name.clone(),
                source,
            })?;
        sink_set.spawn(name, sink_config.linger(), sink);
    }
    Ok(sink_set)
}

/// Starts serving on the bound listeners: devices, the admin socket, and metrics if bound.
fn serve(
    listeners: Listeners,
    acceptor: watch::Receiver<tokio_rustls::TlsAcceptor>,
    ctx: Arc<EdgeContext>,
    admin_service: Arc<AdminService>,
    sources: crate::ops::prometheus::Sources,
    budget: crate::edge::Budget,
    stopped: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(listener) = listeners.metrics {
        tasks.push(tokio::spawn(crate::ops::prometheus::serve(
            listener,
            sources,
            stopped.clone(),
        )));
    }
    tasks.extend([
        tokio::spawn(crate::edge::serve(
            listeners.mqtts,
            acceptor,
            ctx,
            budget,
            stopped.clone(),
        )),
        tokio::spawn(admin::serve(listeners.admin, admin_service, stopped)),
    ]);
    tasks
}

impl Gateway {
    /// Builds every part and starts serving on `listeners`.
    pub async fn start(config: Config, listeners: Listeners) -> Result<Gateway, RunError> {
        config.validate()?;
        let claim_ca = config.auth.enrollment.as_ref().map(|e| e.claim_ca.clone());
        let acceptor = config.listener.acceptor(claim_ca.as_deref())?;
        let db = open_store(&config.data_dir, OnDamage::SetAside)?;
        let enrollment = match &config.auth.enrollment {
            Some(e) => Some(Arc::new(crate::auth::Enrollment::open(
                e,
                &config.listener.ca,
                &db,
            )?)),
            None => None,
        };
        let policies = PolicySet::compile(&config.auth).map_err(ConfigError::from)?;
        let disk = crate::disk::DiskGuard::new(&config.data_dir, config.spool.disk_reserve.0);
        let mut authority = Authority::new(policies, Registry::open(&db, disk)?);
        if let Some(registry) = &config.auth.registry {
            let verifier = Arc::new(crate::auth::Verifier::new(registry).await);
            authority = authority.with_verifier(verifier);
        }
        let authority = Arc::new(authority);
        let stats = Arc::new(Stats::default());
        let sessions = Arc::new(SessionTable::default());
        let (stop, stopped) = watch::channel(false);
        let spool = Arc::new(
            Spool::open(
                db.clone(),
                &config.spool,
                &config.data_dir,
                config.sinks.keys().cloned(),
            )
            .await?,
        );
        let l = &config.listener;
        let fabric = Arc::new(Fabric::start(
            FabricLimits::of(l, INTERNAL_LINKS),
            Arc::clone(&stats),
        ));
        // Weak, so a connection still closing after a stop does not hold the store open.
        fabric.offline().attach(Arc::downgrade(&spool));
        let sink_set = start_sinks(&config, &spool, &fabric, &listeners.nucleus, &stats).await?;
        let sinks = Arc::new(tokio::sync::Mutex::new(sink_set));
        let mut background = vec![
            tokio::spawn(Arc::clone(&fabric).watchdog(stopped.clone())),
            tokio::spawn(expire_periodically(Arc::clone(&spool), stopped.clone())),
            tokio::spawn(crate::ops::prometheus::upkeep(stopped.clone())),
        ];
        let started = pipeline::start(
            config.pipeline_update(),
            CommitSettings::of(&config.spool),
            Arc::clone(&spool),
            Arc::clone(&stats),
            stopped.clone(),
        )
        .await?;
        let rules = started.report;
        let live = Arc::new(Live::new(
            config.clone(),
            Arc::clone(&sinks),
            started.control,
            Arc::clone(&spool),
            Arc::clone(&stats),
        ));
        if let Some(nucleus) = &listeners.nucleus {
            background.push(tokio::spawn(
                crate::control::greengrass::follow_configuration(
                    Arc::clone(nucleus),
                    Arc::clone(&live),
                    stopped.clone(),
                ),
            ));
        }
        let mut downlinks = crate::downlink::start(
            &config.downlinks,
            config.relay.as_ref(),
            &config.sinks,
            &config.site_name(),
            listeners.nucleus.as_ref(),
            stopped.clone(),
        )?;
        let ctx = Arc::new(EdgeContext {
            authority: Arc::clone(&authority),
            fabric: Arc::clone(&fabric),
            sessions: Arc::clone(&sessions),
            stats: Arc::clone(&stats),
            limits: Limits::of(l),
            ingest: Some(started.ingest),
            enrollment,
            relay: downlinks.relay.clone(),
        });
        crate::edge::restore_sessions(&ctx).await;
        // After the restore, so a message for an away session is queued for it.
        background.extend(downlinks.run(
            &fabric,
            &sessions,
            l.topic_limits(),
            &stats,
            stopped.clone(),
        ));
        let downlinks = Arc::new(downlinks);
        background.push(tokio::spawn(crate::edge::expire_sessions(
            Arc::clone(&ctx),
            stopped.clone(),
        )));
        if let Some(verifier) = authority.verifier() {
            background.push(tokio::spawn(
                Arc::clone(verifier).run(Arc::clone(&authority), stopped.clone()),
            ));
        }
        let (acceptor_tx, acceptor) = watch::channel(acceptor);
        background.push(tokio::spawn(crate::edge::follow_crls(
            l.clone(),
            claim_ca,
            acceptor_tx,
            Arc::clone(&ctx),
            stopped.clone(),
        )));
        let edge = Arc::clone(&ctx);
        let local_addr = listeners.mqtts.local_addr().ok();
        let metrics_addr = listeners.metrics.as_ref().and_then(|l| l.local_addr().ok());
        let admin_service = Arc::new(AdminService {
            authority,
            sessions: Arc::clone(&sessions),
            stats: Arc::clone(&stats),
            spool: Some(Arc::clone(&spool)),
            rules: Arc::clone(&rules),
            downlinks: Some(downlinks),
        });
        let tasks = serve(
            listeners,
            acceptor,
            ctx,
            admin_service,
            crate::ops::prometheus::Sources {
                stats: Arc::clone(&stats),
                spool: Arc::clone(&spool),
                rules,
            },
            crate::edge::Budget::of(l),
            stopped,
        );
        info!(
            site = %config.site_name(),
            mqtts = ?local_addr,
            metrics = ?metrics_addr,
            admin = %config.admin_socket().display(),
            data_dir = %config.data_dir.display(),
            "sitegate started"
        );
        Ok(Gateway {
            local_addr,
            metrics_addr,
            stats,
            sessions,
            stop,
            tasks,
            committer: started.task,
            sinks,
            background,
            spool,
            live,
            db,
            edge,
        })
    }

    /// The address devices connect to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The spool (depth, status).
    pub fn spool(&self) -> Arc<Spool> {
        Arc::clone(&self.spool)
    }

    /// The running configuration and live reconfiguration.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Serves until `shutdown` completes or the store fails, then stops.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Stopped {
        let mut failed = self.spool.failed();
        tokio::select! {
            _ = shutdown => {}
            _ = failed.wait_for(|f| f.is_some()) => {}
        }
        self.stop().await
    }

    /// Stops accepting, ends every session (MQTT 5 devices hear "server shutting down"),
    /// and flushes the store; all within [`STOP_DEADLINE`].
    pub async fn stop(self) -> Stopped {
        let failure = self.spool.failed();
        let keep = (self.db.clone(), Arc::clone(&self.spool));
        let in_time = tokio::time::timeout(STOP_DEADLINE, self.stop_parts())
            .await
            .is_ok();
        let mut reason = failure.borrow().clone();
        if !in_time && reason.is_none() {
            reason = Some(format!("the gateway did not stop within {STOP_DEADLINE:?}"));
        }
        match &reason {
            Some(r) => tracing::error!(reason = %r, "sitegate stopped without a clean store"),
            None => info!("sitegate stopped"),
        }
        Stopped {
            failure: reason,
            store: Some(keep),
        }
    }

    async fn stop_parts(self) {
        info!("sitegate stopping");
        self.stop.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.sessions
            .end_all(EndReason::Shutdown, SHUTDOWN_GRACE)
            .await;
        // The edge holds the pipeline's intake, which must close for the committer to end.
        drop(self.edge);
        for task in self.background {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
        }
        // Sessions are gone, so the committer's channel closes once it has written what it holds.
        if tokio::time::timeout(SHUTDOWN_GRACE, self.committer)
            .await
            .is_err()
        {
            tracing::warn!("spool committer did not finish in time");
        }
        self.sinks.lock().await.stop_all().await;
        if let Err(e) = self.spool.settle().await {
            tracing::error!(error = %e, "final spool flush failed");
        }
    }
}

/// A stopped gateway. When the store failed (or the stop ran out of time), dropping this
/// leaves the store alone: sled's handles flush when dropped, and a failed sled can block
/// there for good, so the process must exit without it (see [`Stopped::failure`]).
pub struct Stopped {
    /// Why the gateway stopped uncleanly: the process should exit non-zero so that systemd or
    /// the Greengrass nucleus restarts it.
    pub failure: Option<String>,
    store: Option<(sled::Db, Arc<Spool>)>,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.failure.is_some() {
            std::mem::forget(self.store.take());
        }
    }
}

/// How often queues are checked against `max_age`.
const EXPIRY_CHECK: Duration = Duration::from_secs(10);

async fn expire_periodically(spool: Arc<Spool>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXPIRY_CHECK) => {}
            _ = stopped.changed() => return,
        }
        if let Err(e) = spool.expire() {
            tracing::error!(error = %e, "spool expiry failed");
        }
    }
}

/// Starts the gateway on `listeners` and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let stopped = Gateway::start(config, listeners)
        .await?
        .run_until(shutdown)
        .await;
    match stopped.failure.clone() {
        Some(reason) => Err(RunError::Stopped(reason)),
        None => Ok(()),
    }
}
