//! `sitegate rules check|test|status`: rule files offline, on samples, and in the running
//! gateway.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sitegate::config::Config;
use sitegate::ops::admin::{self, AdminRequest};

use super::{outln, print_response, runtime};

#[derive(clap::Subcommand)]
pub(crate) enum RulesCommand {
    /// Validate every `*.sql` file in DIR offline; exit 1 listing each error with file, line
    /// and column.
    Check {
        dir: PathBuf,
        /// Also check that every INSERT INTO names a sink of this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run one rule over sample messages (JSON lines: {"topic", "thing", "payload", "ts"}) and
    /// print what it would send, as a table.
    Test {
        file: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Close windows as of this time (Unix ms); default: an hour after the last message.
        #[arg(long)]
        until: Option<i64>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Loaded rules with their counters, and rule files refused, from the running gateway.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: RulesCommand) -> Result<()> {
    match command {
        RulesCommand::Check { dir, config } => {
            let sinks: Option<Vec<String>> = match config {
                Some(c) => Some(Config::load(&c)?.sinks.keys().cloned().collect()),
                None => None,
            };
            let files = sitegate_rules::dir::scan(&dir)
                .with_context(|| format!("reading {}", dir.display()))?;
            if files.is_empty() {
                bail!("no *.sql rule files in {}", dir.display());
            }
            let errors = runtime()?.block_on(async {
                let mut errors = Vec::new();
                for (name, (path, text)) in &files {
                    match sitegate_rules::check(
                        name,
                        &path.display().to_string(),
                        text,
                        sinks.as_deref(),
                    )
                    .await
                    {
                        Ok(spec) => outln!(
                            "{}: ok ({} statement(s))",
                            path.display(),
                            spec.statements.len()
                        ),
                        Err(e) => errors.push(e),
                    }
                }
                Ok::<_, anyhow::Error>(errors)
            })?;
            for e in &errors {
                eprintln!("{e}");
            }
            if !errors.is_empty() {
                bail!("{} of {} rule files refused", errors.len(), files.len());
            }
            Ok(())
        }
        RulesCommand::Test {
            file,
            input,
            until,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let name = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("rule")
                .to_string();
            let samples_text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let samples = sitegate_rules::sample::parse_samples(&samples_text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let outputs = runtime()?.block_on(async {
                let spec =
                    sitegate_rules::check(&name, &file.display().to_string(), &text, None).await?;
                anyhow::Ok(sitegate_rules::sample::run(spec, &samples, None, until).await)
            })?;
            if json {
                for o in &outputs {
                    let row: serde_json::Value = serde_json::from_slice(&o.payload)?;
                    outln!(
                        "{}",
                        serde_json::json!({"sink": o.sink, "thing": o.thing, "row": row})
                    );
                }
            } else {
                print!("{}", sitegate_rules::sample::table(&outputs));
            }
            Ok(())
        }
        RulesCommand::Status { config, json } => {
            let config = Config::load(&config)?;
            let response = runtime()?.block_on(admin::request(
                &config.admin_socket(),
                &AdminRequest::RulesStatus,
            ))?;
            print_response(response, json)
        }
    }
}
