//! `sitegate run`: load the configuration, bind, serve until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sitegate::config::Config;
use sitegate::control::greengrass;
use sitegate::daemon::{self, Listeners};

use super::{init_logging, runtime, DEFAULT_LOG};

/// `sitegate run`: the gateway, from a TOML file or a JSON component configuration.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// TOML config file; relative paths are taken from its folder.
    #[arg(long, short, required_unless_present_any = ["config_json", "config_env"])]
    config: Option<PathBuf>,
    /// The config as JSON (the Greengrass component configuration), instead of a file.
    #[arg(long, conflicts_with_all = ["config", "config_env"])]
    config_json: Option<String>,
    /// Read the JSON config from the SITEGATE_CONFIG_JSON environment variable (how the
    /// Greengrass recipe passes `{configuration:/sitegate}`).
    #[arg(long, conflicts_with = "config")]
    config_env: bool,
    /// Folder that relative paths in a JSON config are taken from (the component's work
    /// folder); default the current folder.
    #[arg(long)]
    base_dir: Option<PathBuf>,
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    let RunArgs {
        config,
        config_json,
        config_env,
        base_dir,
    } = args;
    init_logging(DEFAULT_LOG);
    let config = match (config, config_json, config_env) {
        (Some(path), _, _) => Config::load(&path)?,
        (None, json, from_env) => {
            let text = match (json, from_env) {
                (Some(text), _) => text,
                (None, true) => std::env::var(greengrass::CONFIG_ENV).with_context(|| {
                    format!("--config-env: {} is not set", greengrass::CONFIG_ENV)
                })?,
                (None, false) => bail!("give --config, --config-json or --config-env"),
            };
            let base = match base_dir {
                Some(dir) => dir,
                None => std::env::current_dir()?,
            };
            greengrass::config_from_json(&text, &base)?
        }
    };
    daemon::check_fd_limit(config.listener.max_connections, "listener.max_connections");
    runtime()?.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        daemon::run(config, listeners, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM (how Greengrass stops a component).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
