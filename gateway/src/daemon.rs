//! The daemon: everything `sitegate run` starts, behind a testable entry point.
//!
//! [`run`] takes a validated config, listeners the caller already bound (tests bind port 0),
//! and a shutdown future; it returns once the gateway has stopped cleanly. [`Gateway`] is the
//! same thing in two steps, for callers that want the counters or the bound address meanwhile.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::admin::{self, AdminService};
use crate::auth::{Authority, PolicySet, Registry, RegistryError};
use crate::broker::Fabric;
use crate::config::{Config, ConfigError};
use crate::session::{EdgeContext, Limits};
use crate::sessions::{EndReason, SessionTable};
use crate::stats::Stats;
use crate::tls::{self, TlsSetupError};

/// How long shutdown waits for sessions to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
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
    #[error(
        "cannot open the store in {path}: {source} (is another sitegate using this data_dir?)"
    )]
    Store { path: PathBuf, source: sled::Error },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The sockets the gateway serves; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub mqtts: TcpListener,
    pub admin: UnixListener,
}

impl Listeners {
    /// Binds `[listener] mqtts` and the admin socket named by the config.
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let mqtts = TcpListener::bind(&config.listener.mqtts)
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
        Ok(Listeners { mqtts, admin })
    }
}

/// Opens the gateway's sled database under `data_dir`.
pub fn open_store(config: &Config) -> Result<sled::Db, RunError> {
    let path = config.data_dir.join("db");
    sled::Config::new()
        .path(&path)
        .open()
        .map_err(|source| RunError::Store { path, source })
}

/// A started gateway.
pub struct Gateway {
    local_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    sessions: Arc<SessionTable>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    db: sled::Db,
}

impl Gateway {
    /// Builds every part and starts serving on `listeners`.
    pub fn start(config: Config, listeners: Listeners) -> Result<Gateway, RunError> {
        config.validate()?;
        let acceptor = tls::acceptor(&config.listener)?;
        let db = open_store(&config)?;
        let policies = PolicySet::compile(&config.auth).map_err(ConfigError::from)?;
        let authority = Arc::new(Authority::new(policies, Registry::open(&db)?));
        let stats = Arc::new(Stats::default());
        let sessions = Arc::new(SessionTable::default());
        let l = &config.listener;
        let fabric = Arc::new(Fabric::start(
            l.max_connections + INTERNAL_LINKS,
            l.max_inflight,
        ));
        let ctx = Arc::new(EdgeContext {
            authority: Arc::clone(&authority),
            fabric,
            sessions: Arc::clone(&sessions),
            stats: Arc::clone(&stats),
            limits: Limits {
                max_packet_size: usize::try_from(l.max_packet_size.0).unwrap_or(usize::MAX),
                max_inflight: l.max_inflight,
                connect_timeout: l.connect_timeout(),
                write_timeout: l.write_timeout(),
                max_keep_alive_secs: l.max_keep_alive_secs,
            },
        });
        let (stop, stopped) = watch::channel(false);
        let local_addr = listeners.mqtts.local_addr().ok();
        let admin_service = Arc::new(AdminService {
            authority,
            sessions: Arc::clone(&sessions),
            stats: Arc::clone(&stats),
        });
        let tasks = vec![
            tokio::spawn(crate::listener::serve(
                listeners.mqtts,
                acceptor,
                ctx,
                l.handshake_timeout(),
                l.max_connections,
                stopped.clone(),
            )),
            tokio::spawn(admin::serve(listeners.admin, admin_service, stopped)),
        ];
        info!(
            site = %config.site_name(),
            mqtts = ?local_addr,
            admin = %config.admin_socket().display(),
            data_dir = %config.data_dir.display(),
            "sitegate started"
        );
        Ok(Gateway {
            local_addr,
            stats,
            sessions,
            stop,
            tasks,
            db,
        })
    }

    /// The address devices connect to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Serves until `shutdown` completes, then stops.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.stop().await;
    }

    /// Stops accepting, ends every session (MQTT 5 devices hear "server shutting down"),
    /// and flushes the store.
    pub async fn stop(self) {
        info!("sitegate stopping");
        self.stop.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.sessions
            .end_all(EndReason::Shutdown, SHUTDOWN_GRACE)
            .await;
        let _ = self.db.flush_async().await;
        info!("sitegate stopped");
    }
}

/// Starts the gateway on `listeners` and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    Gateway::start(config, listeners)?.run_until(shutdown).await;
    Ok(())
}
