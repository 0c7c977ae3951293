//! `sitegate config check`: a configuration as `run` would take it, TLS files included.

use std::path::PathBuf;

use anyhow::Result;
use sitegate::config::Config;

use super::outln;

#[derive(clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate a config file; exit 1 naming the wrong key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

pub(crate) fn run(command: ConfigCommand) -> Result<()> {
    let ConfigCommand::Check { config } = command;
    let c = Config::load(&config)?;
    // `run` loads these too: a config whose TLS files are missing or do not match is
    // not valid, whatever its TOML says.
    let enrollment = c.auth.enrollment.as_ref();
    c.listener
        .acceptor(enrollment.map(|e| e.claim_ca.as_path()))?;
    if let Some(e) = enrollment {
        sitegate::auth::Enrollment::check(e, &c.listener.ca)?;
    }
    outln!(
        "{}: valid ({} device groups, {} policies)",
        config.display(),
        c.auth.device_groups.len(),
        c.auth.policies.len()
    );
    Ok(())
}
