//! The SQL rules as the committer runs them: files from `[rules] dir`, polled between batches,
//! and rules given inline in `[rules] sql`. A changed file is checked before it replaces the
//! running version; a refused one leaves the previous version running and is reported.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sitegate_rules::dir::{Change, Watcher};
use sitegate_rules::{Engine, ErrorRouting};

use super::{PipelineError, PipelineUpdate, RulesReport};

/// The rules as the committer runs them: files from `dir` and rules given inline in the config.
pub(super) struct Rules {
    pub(super) engine: Engine,
    pub(super) watcher: Option<Watcher>,
    pub(super) dir: Option<PathBuf>,
    pub(super) inline: BTreeMap<String, String>,
    /// What rules are checked against (sinks, their template expressions, the account).
    pub(super) context: sitegate_rules::Context,
    pub(super) refused: BTreeMap<String, String>,
    pub(super) report: Arc<Mutex<RulesReport>>,
}

/// How an inline rule is named in messages, where a file rule shows its path.
pub(super) fn inline_label(name: &str) -> PathBuf {
    PathBuf::from(format!("rules.sql.{name}"))
}

impl Rules {
    pub(super) fn new(
        dir: Option<PathBuf>,
        error_sink: Option<String>,
        context: sitegate_rules::Context,
        report: Arc<Mutex<RulesReport>>,
    ) -> Rules {
        Rules {
            engine: Engine::new(ErrorRouting {
                default_sink: error_sink,
            }),
            watcher: dir.as_deref().map(Watcher::new),
            dir,
            inline: BTreeMap::new(),
            context,
            refused: BTreeMap::new(),
            report,
        }
    }

    /// Apply what changed in the directory; returns whether the set of rules changed.
    pub(super) async fn reload(&mut self) -> bool {
        let Some(watcher) = self.watcher.as_mut() else {
            return false;
        };
        let changes = match watcher.poll() {
            Ok(c) => c,
            Err(e) => {
                let dir = self.dir.as_deref().unwrap_or(std::path::Path::new(""));
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the rules directory");
                return false;
            }
        };
        let mut changed = false;
        for change in changes {
            match change {
                Change::Upsert { name, file, .. } if self.inline.contains_key(&name) => {
                    let reason = format!(
                        "{}: a rule named `{name}` is given in rules.sql; rename the file",
                        file.display()
                    );
                    tracing::error!(rule = %name, %reason, "rule file refused");
                    self.refused.insert(name, reason);
                }
                Change::Removed { name } if self.inline.contains_key(&name) => {
                    self.refused.remove(&name);
                }
                change => changed |= self.apply(change).await,
            }
        }
        changed
    }

    /// Checks and installs one new or edited rule, or removes one; returns whether the set of
    /// running rules changed.
    pub(super) async fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Upsert { name, file, text } => {
                let shown = file.display().to_string();
                let checked = sitegate_rules::check(&name, &shown, &text, &self.context).await;
                self.install_checked(name, &shown, checked)
            }
            Change::Removed { name } => {
                self.refused.remove(&name);
                let removed = self.engine.remove(&name);
                if removed {
                    tracing::info!(rule = %name, "rule removed");
                }
                removed
            }
        }
    }

    /// Installs a checked rule, or records why it was refused (the previous version, if any,
    /// keeps running); returns whether the running rules changed.
    pub(super) fn install_checked(
        &mut self,
        name: String,
        shown: &str,
        checked: Result<sitegate_rules::RuleSpec, sitegate_rules::RuleError>,
    ) -> bool {
        match checked {
            Ok(spec) => {
                tracing::info!(rule = %name, file = %shown, statements = spec.statements.len(), "rule loaded");
                self.engine.install(spec);
                self.refused.remove(&name);
                true
            }
            Err(e) => {
                tracing::error!(rule = %name, error = %e, "rule refused; the previous version, if any, keeps running");
                self.engine.refused(&name, &e);
                self.refused.insert(name, e.to_string());
                false
            }
        }
    }

    /// Applies a live reconfiguration: new sinks and error sink, inline rules added, changed
    /// or removed, a new rules folder. Checked before anything changes: a rule that would keep
    /// running (untouched, or its new version refused) must not lose a sink it writes to.
    pub(super) async fn reconfigure(
        &mut self,
        update: &PipelineUpdate,
    ) -> Result<(), PipelineError> {
        // New template expressions or a new account change what every rule computes: all of
        // them are read again.
        let reread = update.context.templates != self.context.templates
            || update.context.account_id != self.context.account_id;
        let dir_changes = update.dir != self.dir;
        let mut upserts = Vec::new();
        for (name, text) in &update.inline {
            if reread || self.inline.get(name) != Some(text) {
                let label = inline_label(name).display().to_string();
                let checked = sitegate_rules::check(name, &label, text, &update.context).await;
                upserts.push((name.clone(), text.clone(), checked));
            }
        }
        let mut removals: Vec<String> = self
            .inline
            .keys()
            .filter(|name| !update.inline.contains_key(*name))
            .cloned()
            .collect();
        if dir_changes {
            // Rules from the old folder go; the new folder's files come in at the next poll.
            removals.extend(
                self.engine
                    .names()
                    .into_iter()
                    .filter(|name| !self.inline.contains_key(name)),
            );
        }
        let mut after = self.engine.sinks_by_rule();
        for name in &removals {
            after.remove(name);
        }
        for (name, _, checked) in &upserts {
            if let Ok(spec) = checked {
                after.insert(name.clone(), sitegate_rules::engine::spec_sinks(spec));
            }
        }
        for (rule, sinks) in &after {
            if let Some(missing) = sinks.iter().find(|s| !update.sinks().contains(s)) {
                return Err(PipelineError::SinkInUse {
                    rule: rule.clone(),
                    sink: missing.clone(),
                });
            }
        }
        self.context = update.context.clone();
        self.engine.set_errors(ErrorRouting {
            default_sink: update.error_sink.clone(),
        });
        for name in removals {
            self.apply(Change::Removed { name }).await;
        }
        for (name, text, checked) in upserts {
            let shown = inline_label(&name).display().to_string();
            self.install_checked(name.clone(), &shown, checked);
            self.inline.insert(name, text);
        }
        self.inline
            .retain(|name, _| update.inline.contains_key(name));
        if dir_changes || reread {
            // A new watcher reports every file of the folder as new, so each is checked again.
            self.dir = update.dir.clone();
            self.watcher = self.dir.as_deref().map(Watcher::new);
            if let Ok(mut r) = self.report.lock() {
                r.dir = self.dir.clone();
            }
            self.reload().await;
        }
        Ok(())
    }

    pub(super) fn publish_report(&self) {
        if let Ok(mut r) = self.report.lock() {
            r.rules = self.engine.status();
            r.refused = self.refused.clone();
        }
    }
}
