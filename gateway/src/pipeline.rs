//! Ingest: device messages in, records durable in the spool out, with group commit.
//!
//! Sessions submit the allowed publishes of one socket read as one [`Submission`]. A single
//! committer task gathers submissions for up to `commit_interval` or `commit_records` (this is
//! also the rules' micro-batch), turns the messages into records for each sink through the
//! routes and the SQL rules, writes one block per sink and flushes once. Then every waiting
//! session learns its messages are durable and sends its PUBACKs. Between batches the committer
//! closes due windows and applies rule-file changes, so a reload never splits a batch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sitegate_rules::dir::{Change, Watcher};
use sitegate_rules::{Engine, ErrorRouting, RuleStatus};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, RouteConfig};
use crate::spool::{Draft, Spool, SpoolError};
use crate::stats::Stats;

/// How often the committer looks at the rules directory and closes due windows.
pub const RULES_POLL: Duration = Duration::from_millis(250);

/// One allowed device publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub thing: Arc<str>,
    pub cert_id: Arc<str>,
    pub qos: u8,
    pub received_at_ms: u64,
    /// When the PUBLISH was read, for the receive → durable histogram.
    pub received: std::time::Instant,
}

/// Resolves when the submitted messages are durable, or with the reason they are not.
pub type Receipt = oneshot::Receiver<Result<(), String>>;

struct Submission {
    messages: Vec<Message>,
    done: oneshot::Sender<Result<(), String>>,
}

/// A compiled direct route.
#[derive(Debug, Clone)]
struct Route {
    name: String,
    from: String,
    to: String,
}

/// The sessions' handle into the pipeline.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Submission>,
    /// Topic filters of every route and rule statement; updated on rule reloads.
    filters: Arc<RwLock<Vec<String>>>,
}

impl Ingest {
    /// Whether any route or rule takes messages on `topic` (others need no spooling).
    pub fn wants(&self, topic: &str) -> bool {
        self.filters
            .read()
            .map(|f| {
                f.iter()
                    .any(|filter| sitegate_plugins::topic::filter_matches(filter, topic))
            })
            .unwrap_or(true)
    }

    /// Hand over messages; waits only when the committer is `max_pending` behind.
    pub async fn submit(&self, messages: Vec<Message>) -> Receipt {
        let (done, receipt) = oneshot::channel();
        if let Err(mpsc::error::SendError(s)) = self.tx.send(Submission { messages, done }).await {
            let _ = s.done.send(Err("gateway is shutting down".into()));
        }
        receipt
    }
}

/// Settings of the committer.
#[derive(Debug, Clone, Copy)]
pub struct CommitSettings {
    pub interval: Duration,
    pub max_records: usize,
    pub max_pending: usize,
}

/// What `sitegate rules status` shows: loaded rules with their counters, and files refused.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RulesReport {
    pub dir: Option<PathBuf>,
    pub rules: Vec<RuleStatus>,
    /// Rule name → why its current file is refused (the previous version, if any, runs).
    pub refused: BTreeMap<String, String>,
}

/// The rules as the committer runs them: files from `dir` and rules given inline in the config.
struct Rules {
    engine: Engine,
    watcher: Option<Watcher>,
    dir: Option<PathBuf>,
    inline: BTreeMap<String, String>,
    sinks: Vec<String>,
    refused: BTreeMap<String, String>,
    report: Arc<Mutex<RulesReport>>,
}

/// What a live reconfiguration changes in the pipeline (from the component configuration).
#[derive(Debug, Clone)]
pub struct PipelineUpdate {
    routes: Vec<Route>,
    dir: Option<PathBuf>,
    inline: BTreeMap<String, String>,
    error_sink: Option<String>,
    sinks: Vec<String>,
}

impl PipelineUpdate {
    pub fn of(config: &Config) -> PipelineUpdate {
        PipelineUpdate {
            routes: routes_of(config),
            dir: config.rules.dir.clone(),
            inline: config.rules.sql.clone(),
            error_sink: config.rules.error_sink.clone(),
            sinks: config.sinks.keys().cloned().collect(),
        }
    }
}

/// Hands live reconfigurations to the committer, which applies them between batches.
#[derive(Clone)]
pub struct PipelineControl {
    tx: mpsc::Sender<(PipelineUpdate, oneshot::Sender<Result<(), String>>)>,
}

impl PipelineControl {
    /// Applies `update`; refused as a whole (nothing changes) when a rule that stays would
    /// write to a sink the update removes.
    pub async fn reconfigure(&self, update: PipelineUpdate) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((update, reply))
            .await
            .map_err(|_| "the pipeline has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the pipeline has stopped".to_string())?
    }
}

fn routes_of(config: &Config) -> Vec<Route> {
    config
        .routes
        .iter()
        .map(|(name, RouteConfig { from, to })| Route {
            name: name.clone(),
            from: from.clone(),
            to: to.clone(),
        })
        .collect()
}

/// How an inline rule is named in messages, where a file rule shows its path.
fn inline_label(name: &str) -> PathBuf {
    PathBuf::from(format!("rules.sql.{name}"))
}

impl Rules {
    fn new(
        dir: Option<PathBuf>,
        error_sink: Option<String>,
        sinks: Vec<String>,
        report: Arc<Mutex<RulesReport>>,
    ) -> Rules {
        Rules {
            engine: Engine::new(ErrorRouting {
                default_sink: error_sink,
            }),
            watcher: dir.as_deref().map(Watcher::new),
            dir,
            inline: BTreeMap::new(),
            sinks,
            refused: BTreeMap::new(),
            report,
        }
    }

    /// Apply what changed in the directory; returns whether the set of rules changed.
    async fn reload(&mut self) -> bool {
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
    async fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Upsert { name, file, text } => {
                let shown = file.display().to_string();
                let checked = sitegate_rules::check(&name, &shown, &text, Some(&self.sinks)).await;
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
    fn install_checked(
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
    async fn reconfigure(&mut self, update: &PipelineUpdate) -> Result<(), String> {
        let dir_changes = update.dir != self.dir;
        let mut upserts = Vec::new();
        for (name, text) in &update.inline {
            if self.inline.get(name) != Some(text) {
                let label = inline_label(name).display().to_string();
                let checked = sitegate_rules::check(name, &label, text, Some(&update.sinks)).await;
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
            if let Some(missing) = sinks.iter().find(|s| !update.sinks.contains(s)) {
                return Err(format!(
                    "rule `{rule}` writes to sink `{missing}`, which the update removes; change or remove the rule in the same update"
                ));
            }
        }
        self.sinks = update.sinks.clone();
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
        if dir_changes {
            self.dir = update.dir.clone();
            self.watcher = self.dir.as_deref().map(Watcher::new);
            if let Ok(mut r) = self.report.lock() {
                r.dir = self.dir.clone();
            }
            self.reload().await;
        }
        Ok(())
    }

    fn publish_report(&self) {
        if let Ok(mut r) = self.report.lock() {
            r.rules = self.engine.status();
            r.refused = self.refused.clone();
        }
    }
}

/// The handles [`start`] returns.
pub struct Started {
    pub ingest: Ingest,
    pub control: PipelineControl,
    pub task: tokio::task::JoinHandle<()>,
    pub report: Arc<Mutex<RulesReport>>,
}

/// Start the committer.
pub async fn start(
    config: &Config,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) -> Result<Started, String> {
    let routes = routes_of(config);
    let settings = CommitSettings {
        interval: config.spool.commit_interval.0,
        max_records: config.spool.commit_records,
        max_pending: config.spool.max_pending,
    };
    let report = Arc::new(Mutex::new(RulesReport {
        dir: config.rules.dir.clone(),
        ..RulesReport::default()
    }));
    if let Some(dir) = &config.rules.dir {
        if !dir.is_dir() {
            return Err(format!("rules.dir {} is not a directory", dir.display()));
        }
    }
    let mut rules = None;
    if config.rules.dir.is_some() || !config.rules.sql.is_empty() {
        let mut r = Rules::new(
            config.rules.dir.clone(),
            config.rules.error_sink.clone(),
            config.sinks.keys().cloned().collect(),
            report.clone(),
        );
        for (name, text) in &config.rules.sql {
            r.inline.insert(name.clone(), text.clone());
            r.apply(Change::Upsert {
                name: name.clone(),
                file: inline_label(name),
                text: text.clone(),
            })
            .await;
        }
        r.reload().await;
        r.publish_report();
        rules = Some(r);
    }
    let filters = Arc::new(RwLock::new(filters_of(&routes, rules.as_ref())));
    // The channel counts submissions, not messages; one read is rarely more than a few dozen.
    let (tx, rx) = mpsc::channel(settings.max_pending.div_ceil(16).max(16));
    let (control_tx, control_rx) = mpsc::channel(4);
    let task_filters = filters.clone();
    let task_report = report.clone();
    let task = tokio::spawn(async move {
        committer(
            rx,
            control_rx,
            routes,
            rules,
            task_filters,
            task_report,
            settings,
            spool,
            stats,
            shutdown,
        )
        .await
    });
    Ok(Started {
        ingest: Ingest { tx, filters },
        control: PipelineControl { tx: control_tx },
        task,
        report,
    })
}

fn filters_of(routes: &[Route], rules: Option<&Rules>) -> Vec<String> {
    let mut f: Vec<String> = routes.iter().map(|r| r.from.clone()).collect();
    if let Some(r) = rules {
        f.extend(r.engine.sources());
    }
    f.sort();
    f.dedup();
    f
}

/// How often a commit held by a low disk looks at the free space again.
const DISK_RECHECK: Duration = Duration::from_millis(500);

/// Commit, waiting while a `block` queue is full; the error text goes to the sessions.
async fn commit(
    spool: &Spool,
    batches: &[(String, Vec<Draft>)],
    stats: &Stats,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    loop {
        match spool.commit(batches).await {
            Err(SpoolError::Full {
                sink,
                bytes,
                max_bytes,
            }) => {
                stats.spool_full_waits.fetch_add(1, Relaxed);
                tracing::warn!(
                    sink,
                    bytes,
                    max_bytes,
                    "spool full: holding PUBACKs until the sink drains"
                );
                tokio::select! {
                    _ = spool.space.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Err("gateway is shutting down".to_string());
                }
            }
            Err(SpoolError::DiskLow(low)) => {
                stats.spool_full_waits.fetch_add(1, Relaxed);
                tracing::warn!(
                    free = low.free,
                    reserve = low.reserve,
                    "disk below the spool's reserve: holding PUBACKs until space returns"
                );
                tokio::select! {
                    _ = tokio::time::sleep(DISK_RECHECK) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Err("gateway is shutting down".to_string());
                }
            }
            Err(e) => {
                stats.spool_errors.fetch_add(1, Relaxed);
                return Err(e.to_string());
            }
            Ok(()) => {
                stats.spool_commits.fetch_add(1, Relaxed);
                return Ok(());
            }
        }
    }
}

/// Add rule outputs to the per-sink batches.
fn add_outputs(
    batches: &mut Vec<(String, Vec<Draft>)>,
    outputs: Vec<sitegate_rules::Output>,
    stats: &Stats,
) {
    for o in outputs {
        stats.rule_rows_out.fetch_add(1, Relaxed);
        let draft = Draft {
            received_at_ms: u64::try_from(o.received_at_ms).unwrap_or(0),
            thing_name: o.thing,
            cert_id: o.cert_id,
            topic: o.topic,
            rule: o.rule,
            payload: Bytes::from(o.payload),
        };
        match batches.iter_mut().find(|(sink, _)| *sink == o.sink) {
            Some((_, drafts)) => drafts.push(draft),
            None => batches.push((o.sink, vec![draft])),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn committer(
    mut rx: mpsc::Receiver<Submission>,
    mut control: mpsc::Receiver<(PipelineUpdate, oneshot::Sender<Result<(), String>>)>,
    mut routes: Vec<Route>,
    mut rules: Option<Rules>,
    filters: Arc<RwLock<Vec<String>>>,
    report: Arc<Mutex<RulesReport>>,
    settings: CommitSettings,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut poll = tokio::time::interval(RULES_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut control_open = true;
    loop {
        let first = tokio::select! {
            next = rx.recv() => match next {
                Some(s) => s,
                None => break,
            },
            update = control.recv(), if control_open => {
                let Some((update, reply)) = update else {
                    control_open = false;
                    continue;
                };
                let wants_rules = update.dir.is_some() || !update.inline.is_empty();
                if rules.is_none() && wants_rules {
                    rules = Some(Rules::new(None, update.error_sink.clone(), update.sinks.clone(), report.clone()));
                }
                let result = match rules.as_mut() {
                    Some(r) => r.reconfigure(&update).await,
                    None => Ok(()),
                };
                if result.is_ok() {
                    routes = update.routes;
                }
                if let Some(r) = rules.as_ref() {
                    r.publish_report();
                }
                if let Ok(mut f) = filters.write() {
                    *f = filters_of(&routes, rules.as_ref());
                }
                let _ = reply.send(result);
                continue;
            }
            _ = poll.tick(), if rules.is_some() => {
                if let Some(r) = rules.as_mut() {
                    if r.reload().await {
                        if let Ok(mut f) = filters.write() {
                            *f = filters_of(&routes, Some(r));
                        }
                    }
                    let closed = r.engine.tick(crate::spool::now_ms() as i64).await;
                    r.publish_report();
                    if !closed.outputs.is_empty() {
                        let mut batches = Vec::new();
                        add_outputs(&mut batches, closed.outputs, &stats);
                        if let Err(e) = commit(&spool, &batches, &stats, &mut shutdown).await {
                            tracing::error!(error = %e, "could not spool closed windows");
                        }
                    }
                }
                continue;
            }
        };
        let mut waiting = vec![first];
        let mut count = waiting[0].messages.len();
        let deadline = tokio::time::Instant::now() + settings.interval;
        while count < settings.max_records {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(s) => {
                        count += s.messages.len();
                        waiting.push(s);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let mut batches = route(&routes, &waiting);
        if let Some(r) = rules.as_mut() {
            // Only messages some rule takes are copied for the engine; routes need no copy.
            let sources = r.engine.sources();
            let messages: Vec<Arc<sitegate_rules::Message>> = waiting
                .iter()
                .flat_map(|s| s.messages.iter())
                .filter(|m| {
                    sources
                        .iter()
                        .any(|f| sitegate_plugins::topic::filter_matches(f, &m.topic))
                })
                .map(|m| {
                    Arc::new(sitegate_rules::Message {
                        topic: m.topic.clone(),
                        thing: m.thing.to_string(),
                        cert_id: m.cert_id.to_string(),
                        payload: m.payload.clone(),
                        received_at_ms: i64::try_from(m.received_at_ms).unwrap_or(i64::MAX),
                    })
                })
                .collect();
            stats
                .rule_messages_in
                .fetch_add(messages.len() as u64, Relaxed);
            if messages.is_empty() {
                let closed = r.engine.tick(crate::spool::now_ms() as i64).await;
                add_outputs(&mut batches, closed.outputs, &stats);
            } else {
                let produced = r
                    .engine
                    .process(&messages, crate::spool::now_ms() as i64)
                    .await;
                add_outputs(&mut batches, produced.outputs, &stats);
            }
        }
        let result = commit(&spool, &batches, &stats, &mut shutdown).await;
        if result.is_ok() {
            let durable = metrics::histogram!(crate::prometheus::RECEIVE_TO_DURABLE);
            let now = std::time::Instant::now();
            for m in waiting.iter().flat_map(|s| s.messages.iter()) {
                durable.record(now.duration_since(m.received).as_secs_f64());
            }
        }
        for s in waiting {
            let _ = s.done.send(result.clone());
        }
    }
    if let Some(r) = rules.as_mut() {
        r.publish_report();
    }
}
/// Every (sink, drafts) pair the routes make of the waiting messages, in arrival order.
fn route(routes: &[Route], waiting: &[Submission]) -> Vec<(String, Vec<Draft>)> {
    let mut out: Vec<(String, Vec<Draft>)> = Vec::new();
    for s in waiting {
        for m in &s.messages {
            for r in routes
                .iter()
                .filter(|r| sitegate_plugins::topic::filter_matches(&r.from, &m.topic))
            {
                let draft = Draft {
                    received_at_ms: m.received_at_ms,
                    thing_name: m.thing.to_string(),
                    cert_id: m.cert_id.to_string(),
                    topic: m.topic.clone(),
                    rule: r.name.clone(),
                    payload: m.payload.clone(),
                };
                match out.iter_mut().find(|(sink, _)| *sink == r.to) {
                    Some((_, drafts)) => drafts.push(draft),
                    None => out.push((r.to.clone(), vec![draft])),
                }
            }
        }
    }
    out
}
