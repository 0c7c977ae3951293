//! The `sitegate` subcommands, one module each with its own options and `run()`; here what
//! they share: output that survives a closed pipe, logging, the runtime, and asking the
//! running gateway (or its registry when it is stopped).

pub(crate) mod ca;
pub(crate) mod config;
pub(crate) mod demo;
pub(crate) mod device;
pub(crate) mod downlink;
pub(crate) mod greengrass;
pub(crate) mod rules;
pub(crate) mod run;
pub(crate) mod simulate;
pub(crate) mod spool;

use anyhow::{bail, Context, Result};
use sitegate::config::Config;
use sitegate::daemon;
use sitegate::ops::admin::{self, AdminClientError, AdminRequest, AdminResponse, DeviceView};

/// `println!` that reports a failed write (a closed pipe, as under `| head`) as an error
/// instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}
pub(crate) use {out, outln};

/// rumqttd logs every link and subscription at info; the gateway logs what matters of those.
pub(crate) const DEFAULT_LOG: &str = "info,rumqttd=warn";

pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    // Colour codes only for a person at a terminal, never into a journal or a log file.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Asks the running gateway; when none runs, works on the registry directly.
pub(crate) async fn ask_gateway(config: &Config, request: &AdminRequest) -> Result<AdminResponse> {
    match admin::request(&config.admin_socket(), request).await {
        Ok(r) => Ok(r),
        Err(AdminClientError::NotRunning(_)) => daemon::offline(config, vec![request.clone()])
            .await?
            .pop()
            .context("no answer from the registry"),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn print_response(response: AdminResponse, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(());
    }
    match response {
        AdminResponse::Error { message } => bail!(message),
        AdminResponse::Device { device } => print_devices(&[device])?,
        AdminResponse::Devices { devices } => print_devices(&devices)?,
        AdminResponse::Status { stats } => outln!("{}", serde_json::to_string_pretty(&stats)?),
        AdminResponse::Synced { report } => outln!(
            "registry synced: {} certificates checked, {} changed",
            report.checked,
            report.changed
        ),
        AdminResponse::Spool { spool } => out!("{}", sitegate::spool::status::render(&spool)),
        AdminResponse::Downlinks { status } => out!("{}", downlink::render(&status)),
        AdminResponse::Rules { rules } => {
            outln!(
                "{:<24} {:>10} {:>10} {:>8} {:>6}  SINKS",
                "RULE",
                "ROWS IN",
                "ROWS OUT",
                "ERRORS",
                "LATE"
            );
            for r in &rules.rules {
                outln!(
                    "{:<24} {:>10} {:>10} {:>8} {:>6}  {}",
                    r.name,
                    r.rows_in,
                    r.rows_out,
                    r.errors,
                    r.late_events,
                    r.sinks.join(",")
                );
            }
            for (name, why) in &rules.refused {
                outln!("refused {name}: {why}");
            }
        }
    }
    Ok(())
}

fn print_devices(devices: &[DeviceView]) -> Result<()> {
    outln!(
        "{:<24} {:<9} {:<10} {:<28} CERTIFICATES",
        "THING",
        "STATE",
        "CONNECTED",
        "GROUPS"
    );
    for d in devices {
        // Each certificate's id (its first 16 digits) and its own state; the reason a
        // verifier gave, if any, after it.
        let certs: Vec<String> = d
            .certs
            .iter()
            .map(|c| {
                let mut s = format!("{}:{}", &c.id[..c.id.len().min(16)], c.state);
                if let Some(r) = &c.reason {
                    s.push_str(&format!(" ({})", sitegate::escape::Escaped(r)));
                }
                s
            })
            .collect();
        outln!(
            "{:<24} {:<9} {:<10} {:<28} {}",
            d.thing,
            d.state.to_string(),
            if d.connected { "yes" } else { "no" },
            d.groups.join(","),
            certs.join(",")
        );
    }
    Ok(())
}
