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

/// The rules as the committer runs them.
struct Rules {
    engine: Engine,
    watcher: Watcher,
    dir: PathBuf,
    sinks: Vec<String>,
    refused: BTreeMap<String, String>,
    report: Arc<Mutex<RulesReport>>,
}

impl Rules {
    /// Apply what changed in the directory; returns whether the set of rules changed.
    async fn reload(&mut self) -> bool {
        let changes = match self.watcher.poll() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the rules directory");
                return false;
            }
        };
        let mut changed = false;
        for change in changes {
            match change {
                Change::Upsert { name, file, text } => {
                    let shown = file.display().to_string();
                    match sitegate_rules::check(&name, &shown, &text, Some(&self.sinks)).await {
                        Ok(spec) => {
                            tracing::info!(rule = %name, file = %shown, statements = spec.statements.len(), "rule loaded");
                            self.engine.install(spec);
                            self.refused.remove(&name);
                            changed = true;
                        }
                        Err(e) => {
                            tracing::error!(rule = %name, error = %e, "rule refused; the previous version, if any, keeps running");
                            self.engine.refused(&name, &e);
                            self.refused.insert(name, e.to_string());
                        }
                    }
                }
                Change::Removed { name } => {
                    if self.engine.remove(&name) {
                        tracing::info!(rule = %name, "rule removed");
                        changed = true;
                    }
                    self.refused.remove(&name);
                }
            }
        }
        changed
    }

    fn publish_report(&self) {
        if let Ok(mut r) = self.report.lock() {
            r.rules = self.engine.status();
            r.refused = self.refused.clone();
        }
    }
}

/// Start the committer; returns the sessions' handle, the task, and the rules report.
pub async fn start(
    config: &Config,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Ingest, tokio::task::JoinHandle<()>, Arc<Mutex<RulesReport>>), String> {
    let routes: Vec<Route> = config
        .routes
        .iter()
        .map(|(name, RouteConfig { from, to })| Route {
            name: name.clone(),
            from: from.clone(),
            to: to.clone(),
        })
        .collect();
    let settings = CommitSettings {
        interval: config.spool.commit_interval.0,
        max_records: config.spool.commit_records,
        max_pending: config.spool.max_pending,
    };
    let report = Arc::new(Mutex::new(RulesReport {
        dir: config.rules.dir.clone(),
        ..RulesReport::default()
    }));
    let mut rules = match &config.rules.dir {
        None => None,
        Some(dir) => {
            if !dir.is_dir() {
                return Err(format!("rules.dir {} is not a directory", dir.display()));
            }
            let mut r = Rules {
                engine: Engine::new(ErrorRouting {
                    default_sink: config.rules.error_sink.clone(),
                }),
                watcher: Watcher::new(dir),
                dir: dir.clone(),
                sinks: config.sinks.keys().cloned().collect(),
                refused: BTreeMap::new(),
                report: report.clone(),
            };
            r.reload().await;
            r.publish_report();
            Some(r)
        }
    };
    let filters = Arc::new(RwLock::new(filters_of(&routes, rules.as_ref())));
    // The channel counts submissions, not messages; one read is rarely more than a few dozen.
    let (tx, rx) = mpsc::channel(settings.max_pending.div_ceil(16).max(16));
    let task_filters = filters.clone();
    let task = tokio::spawn(async move {
        committer(
            rx,
            routes,
            rules.take(),
            task_filters,
            settings,
            spool,
            stats,
            shutdown,
        )
        .await
    });
    Ok((Ingest { tx, filters }, task, report))
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
    routes: Vec<Route>,
    mut rules: Option<Rules>,
    filters: Arc<RwLock<Vec<String>>>,
    settings: CommitSettings,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut poll = tokio::time::interval(RULES_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            next = rx.recv() => match next {
                Some(s) => s,
                None => break,
            },
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
