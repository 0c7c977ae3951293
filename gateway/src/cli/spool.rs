//! `sitegate spool status|recover|keygen`: the store-and-forward spool, live or stopped.

use std::path::PathBuf;

use anyhow::{bail, Result};
use sitegate::config::Config;
use sitegate::daemon;
use sitegate::ops::admin::{self, AdminClientError, AdminRequest, AdminResponse};
use sitegate::spool;

use super::{init_logging, out, outln, runtime};

#[derive(clap::Subcommand)]
pub(crate) enum SpoolCommand {
    /// Per sink: records and bytes waiting, oldest age, blocks quarantined, the data key.
    /// Asks the running gateway, or reads the data directory of a stopped one.
    Status {
        /// The gateway's config (its admin socket and data_dir).
        #[arg(
            long,
            short,
            conflicts_with = "data_dir",
            required_unless_present = "data_dir"
        )]
        config: Option<PathBuf>,
        /// A stopped gateway's data_dir, read directly.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Salvage records from a damaged store the gateway set aside (`<data_dir>/db.damaged-…`)
    /// into the live spool: the records the ledger lists as lost, each checked by its
    /// authentication tag. Run it while the gateway is stopped.
    Recover {
        /// The gateway's config (its data_dir, sinks and spool keys).
        #[arg(long, short)]
        config: PathBuf,
        /// The damaged store's folder.
        damaged: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create a local key-encryption key file (32 random bytes, mode 0600) for `[spool.encryption] key_file`.
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn run(command: SpoolCommand) -> Result<()> {
    match command {
        SpoolCommand::Status {
            config,
            data_dir,
            json,
        } => {
            let status = match (config, data_dir) {
                (Some(config), _) => {
                    let config = Config::load(&config)?;
                    match runtime()?.block_on(admin::request(
                        &config.admin_socket(),
                        &AdminRequest::SpoolStatus,
                    )) {
                        Ok(AdminResponse::Spool { spool }) => spool,
                        Ok(AdminResponse::Error { message }) => bail!(message),
                        Ok(other) => bail!("unexpected answer from the gateway: {other:?}"),
                        Err(AdminClientError::NotRunning(_)) => {
                            daemon::offline_spool_status(&config.data_dir)?
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                (None, Some(dir)) => daemon::offline_spool_status(&dir)?,
                (None, None) => bail!("give --config or --data-dir"),
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                out!("{}", spool::status::render(&status));
            }
            Ok(())
        }
        SpoolCommand::Recover {
            config,
            damaged,
            json,
        } => {
            init_logging("warn");
            let config = Config::load(&config)?;
            let report = runtime()?.block_on(daemon::recover(&config, &damaged))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            outln!(
                "read {} files: {} block headers, {} blocks authenticated",
                report.files,
                report.candidates,
                report.blocks
            );
            for (sink, n) in &report.recovered {
                outln!("{sink}: {n} records recovered");
            }
            if report.recovered.is_empty() {
                outln!("no lost record was found in {}", damaged.display());
            }
            for (sink, n) in &report.still_lost {
                outln!("{sink}: {n} records still lost");
            }
            Ok(())
        }
        SpoolCommand::Keygen { out } => {
            spool::keys::generate_kek(&out)?;
            outln!("spool key file (0600): {}", out.display());
            Ok(())
        }
    }
}
