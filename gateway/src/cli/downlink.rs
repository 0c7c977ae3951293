//! `sitegate downlink status`: the running gateway's cloud links and downlinks.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use sitegate::config::Config;
use sitegate::downlink::Status;
use sitegate::ops::admin::{self, AdminRequest};

use super::{print_response, runtime};

#[derive(clap::Subcommand)]
pub(crate) enum DownlinkCommand {
    /// Each cloud link (connected, reconnects, filters, refusals) and each downlink's counts
    /// (delivered, queued for away devices, heard by no one, refused at the edge). Asks the running gateway.
    Status {
        /// The gateway's config (its admin socket).
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: DownlinkCommand) -> Result<()> {
    match command {
        DownlinkCommand::Status { config, json } => {
            let config = Config::load(&config)?;
            let response = runtime()?.block_on(admin::request(
                &config.admin_socket(),
                &AdminRequest::DownlinkStatus,
            ))?;
            print_response(response, json)
        }
    }
}

/// The status as two tables.
pub(crate) fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:>11} {:>12} {:>10}  LAST ERROR",
        "LINK (SINK)", "STATE", "CONNECTIONS", "RELAYED DOWN", "UNMATCHED"
    );
    for (sink, l) in &status.links {
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:>11} {:>12} {:>10}  {}",
            sink,
            if l.link.connected {
                "connected"
            } else {
                "down"
            },
            l.link.connections,
            l.relayed_down,
            l.unmatched,
            l.link.last_error.as_deref().unwrap_or("-")
        );
        for f in &l.link.refused {
            let _ = writeln!(out, "  refused by the cloud: {f}");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:<28} {:<20} {:>10} {:>8} {:>13} {:>8}",
        "DOWNLINK", "FROM", "TO", "DELIVERED", "QUEUED", "NO SUBSCRIBER", "REFUSED"
    );
    for (name, d) in &status.downlinks {
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<20} {:>10} {:>8} {:>13} {:>8}",
            name,
            d.from,
            d.to.as_deref().unwrap_or("(same)"),
            d.counts.delivered,
            d.counts.queued,
            d.counts.no_subscriber,
            d.counts.refused
        );
    }
    out
}
