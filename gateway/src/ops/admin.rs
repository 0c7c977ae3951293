//! The local administration endpoint: JSON lines over a Unix socket (mode 0600) in `data_dir`.
//!
//! One request per connection: `{"op":"approve","thing":"pump-1","groups":["pumps"]}` (with
//! `"cert"` for one certificate), `{"op":"revoke","thing":"pump-1"}` (or `"cert"`),
//! `{"op":"list"}` or `{"op":"status"}`; one JSON line back.
//! File permissions are the access control: only the gateway's user (and root) can connect.
//! When no gateway is running the CLI opens the registry itself and uses the same
//! [`AdminService`], so approving ahead of the first start works too.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::auth::{Authority, CertRecord, DeviceState};
use crate::edge::{EndReason, SessionTable};
use crate::metrics::{Stats, StatsSnapshot};
use crate::pipeline::RulesReport;
use crate::spool::{Spool, SpoolStatus};

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Time a client has to send its request, and the CLI to get its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A request to the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Approve {
        thing: String,
        /// One certificate id (approved even before it connects); none: the pending ones.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert: Option<String>,
        #[serde(default)]
        groups: Vec<String>,
    },
    Revoke {
        /// The thing (all its certificates); may be left out with `cert`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thing: Option<String>,
        /// One certificate id only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert: Option<String>,
    },
    List,
    /// Ask the AWS IoT registry about every certificate now (`[auth.registry]`).
    Sync,
    Status,
    /// Depth and health of every spool queue.
    SpoolStatus,
    /// Loaded rules, their counters, and refused rule files.
    RulesStatus,
    /// The cloud links and each downlink's counts.
    DownlinkStatus,
}

/// One device as `device list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceView {
    pub thing: String,
    pub state: DeviceState,
    /// Groups in force: configured groups whose rule matches, plus assigned ones (or `provisioning`).
    pub groups: Vec<String>,
    /// Each certificate and its own state.
    pub certs: Vec<CertRecord>,
    pub connected: bool,
    pub last_seen_ms: Option<u64>,
}

/// The gateway's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Device { device: DeviceView },
    Devices { devices: Vec<DeviceView> },
    Status { stats: Box<StatsSnapshot> },
    Spool { spool: SpoolStatus },
    Rules { rules: RulesReport },
    Synced { report: crate::auth::SyncReport },
    Downlinks { status: crate::downlink::Status },
    Error { message: String },
}

/// Carries out admin requests against an authority and the live sessions.
pub struct AdminService {
    pub authority: Arc<Authority>,
    pub sessions: Arc<SessionTable>,
    pub stats: Arc<Stats>,
    /// The live spool; `None` when the CLI works on a stopped gateway's registry.
    pub spool: Option<Arc<Spool>>,
    /// The rules report the committer keeps current.
    pub rules: Arc<std::sync::Mutex<RulesReport>>,
    /// The running downlinks; `None` when the CLI works on a stopped gateway.
    pub downlinks: Option<Arc<crate::downlink::Downlinks>>,
}

impl AdminService {
    pub async fn handle(&self, request: AdminRequest) -> AdminResponse {
        match self.try_handle(request).await {
            Ok(r) => r,
            Err(message) => AdminResponse::Error { message },
        }
    }

    async fn try_handle(&self, request: AdminRequest) -> Result<AdminResponse, String> {
        match request {
            AdminRequest::Approve {
                thing,
                cert,
                groups,
            } => {
                self.authority
                    .approve(&thing, cert.as_deref(), &groups)
                    .map_err(|e| e.to_string())?;
                info!(%thing, cert = ?cert, ?groups, "device approved");
                Ok(AdminResponse::Device {
                    device: self.view(&thing)?,
                })
            }
            AdminRequest::Revoke { thing, cert } => {
                let record = self
                    .authority
                    .revoke(thing.as_deref(), cert.as_deref())
                    .map_err(|e| e.to_string())?;
                // One certificate: its session, if live, ends on the epoch change by itself.
                let was_connected =
                    cert.is_none() && self.sessions.end(&record.thing, EndReason::Revoked);
                info!(thing = %record.thing, cert = ?cert, was_connected, "device revoked");
                Ok(AdminResponse::Device {
                    device: self.view(&record.thing)?,
                })
            }
            AdminRequest::List => {
                let records = self
                    .authority
                    .registry()
                    .list()
                    .map_err(|e| e.to_string())?;
                let devices = records
                    .iter()
                    .map(|r| self.view(&r.thing))
                    .collect::<Result<_, _>>()?;
                Ok(AdminResponse::Devices { devices })
            }
            AdminRequest::Sync => {
                let verifier = self.authority.verifier().ok_or(
                    "no registry to sync with: [auth.registry] is not configured (or no gateway is running)",
                )?;
                let report = verifier
                    .sync(&self.authority)
                    .await
                    .map_err(|e| e.to_string())?;
                info!(
                    checked = report.checked,
                    changed = report.changed,
                    "registry synced"
                );
                Ok(AdminResponse::Synced { report })
            }
            AdminRequest::Status => Ok(AdminResponse::Status {
                stats: Box::new(self.stats.snapshot()),
            }),
            AdminRequest::SpoolStatus => match &self.spool {
                Some(spool) => Ok(AdminResponse::Spool {
                    spool: spool.status().await,
                }),
                None => Err("no spool open here".into()),
            },
            AdminRequest::RulesStatus => Ok(AdminResponse::Rules {
                rules: self.rules.lock().map(|r| r.clone()).unwrap_or_default(),
            }),
            AdminRequest::DownlinkStatus => match &self.downlinks {
                Some(d) => Ok(AdminResponse::Downlinks { status: d.status() }),
                None => Err("no gateway is running to ask about its downlinks".into()),
            },
        }
    }

    fn view(&self, thing: &str) -> Result<DeviceView, String> {
        let record = self
            .authority
            .registry()
            .get(thing)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no device named {thing:?}"))?;
        Ok(DeviceView {
            groups: self.authority.groups_of(&record),
            state: record.state(),
            thing: record.thing,
            certs: record.certs,
            connected: self.sessions.is_connected(thing),
            last_seen_ms: record.last_seen_ms,
        })
    }
}

/// Binds the admin socket, replacing a stale one, readable and writable by the owner only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: is another sitegate running on this data_dir?",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        // Usually data_dir itself, which only its owner may read (see `daemon::private_dir`).
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves admin requests until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    service: Arc<AdminService>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let service = Arc::clone(&service);
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &service).await {
                        warn!(error = %e, "admin request failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, service: &AdminService) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "admin request timed out")
        })??;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(request) => service.handle(request).await,
        Err(e) => AdminResponse::Error {
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Why the CLI could not get an answer from a running gateway.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// No gateway listens on the socket; the caller may work on the registry directly.
    #[error("no gateway is running at {0}")]
    NotRunning(String),
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("admin answer unreadable: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request to the gateway listening on `socket`.
pub async fn request(
    socket: &Path,
    request: &AdminRequest,
) -> Result<AdminResponse, AdminClientError> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AdminClientError::NotRunning(socket.display().to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let exchange = async {
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        write.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(read).read_line(&mut answer).await?;
        Ok::<_, AdminClientError>(serde_json::from_str(&answer)?)
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "gateway did not answer"))?
}
