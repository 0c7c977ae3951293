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
        /// Check the rules as this config's gateway runs them: every INSERT INTO names one of
        /// its sinks, with the sinks' template expressions and `[rules] account_id`.
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
        /// Run the rule as this config's gateway would: with its sinks' template expressions
        /// (shown as each row's "templates" in --json) and `[rules] account_id`.
        #[arg(long, short)]
        config: Option<PathBuf>,
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
            let ctx = match config {
                Some(c) => Config::load(&c)?.rules_context(),
                None => sitegate_rules::Context::default(),
            };
            let files = sitegate_rules::dir::scan(&dir)
                .with_context(|| format!("reading {}", dir.display()))?;
            if files.is_empty() {
                bail!("no *.sql rule files in {}", dir.display());
            }
            let errors = runtime()?.block_on(async {
                let mut errors = Vec::new();
                for (name, (path, text)) in &files {
                    match sitegate_rules::check(name, &path.display().to_string(), text, &ctx).await
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
            config,
        } => {
            let ctx = match config {
                Some(c) => Config::load(&c)?.rules_context(),
                None => sitegate_rules::Context::default(),
            };
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
                    sitegate_rules::check(&name, &file.display().to_string(), &text, &ctx).await?;
                anyhow::Ok(sitegate_rules::sample::run(spec, &samples, None, until).await)
            })?;
            if json {
                for o in &outputs {
                    let row: serde_json::Value = serde_json::from_slice(&o.payload)?;
                    let mut line =
                        serde_json::json!({"sink": o.sink, "thing": o.thing, "row": row});
                    if !o.template_values.is_empty() {
                        line["templates"] = serde_json::json!(o.template_values);
                    }
                    outln!("{line}");
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
