//! Running and watching the gateway: the local admin socket, the Prometheus endpoint, and the
//! settings of how it sits in a Greengrass nucleus.
//!
//! Layout:
//! - `admin`: JSON lines on a 0600 Unix socket behind `sitegate device …` and `spool status`;
//!   [`AdminService`] answers both for the daemon and, with no daemon, for the CLI itself.
//! - `prometheus`: `/metrics` on a loopback port; the exporter is the only code that reads
//!   every part's counters.
//! - here: the `[admin]` and `[greengrass]` sections.

pub mod admin;
pub mod prometheus;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

pub use admin::AdminService;

/// `[admin]`: the local endpoint that `sitegate device approve|revoke|list` talk to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket path (mode 0600). Defaults to `<data_dir>/admin.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://<this>/metrics`, e.g. "127.0.0.1:9464". A loopback
    /// address only: the endpoint has no authentication. Off when absent.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// `[greengrass]`: what sitegate does with the nucleus when it runs as a component.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GreengrassConfig {
    /// Talk to the nucleus over Greengrass IPC: follow component configuration updates (sinks,
    /// routes and rules reload live) and let `iotcore` sinks publish with `via = "nucleus"`.
    /// Needs the component's IPC environment (`SVCUID`, the nucleus socket).
    #[serde(default)]
    pub ipc: bool,
}

impl AdminConfig {
    /// The metrics address must be a loopback host:port; the error names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(metrics) = &self.metrics {
            let addr = metrics.parse::<SocketAddr>().map_err(|e| {
                Invalid::new(
                    "admin.metrics",
                    format!("{e}: expected host:port such as \"127.0.0.1:9464\""),
                )
            })?;
            if !addr.ip().is_loopback() {
                return Err(Invalid::new(
                    "admin.metrics",
                    format!("{addr} is not a loopback address; the metrics endpoint has no authentication, so it serves 127.0.0.1 or ::1 only"),
                ));
            }
        }
        Ok(())
    }
}
