//! Ingest: device messages in, records durable in the spool out, with group commit.
//!
//! Sessions submit the allowed publishes of one socket read as one submission. A single
//! committer task gathers submissions until `commit_interval` after the oldest message was read
//! or `commit_records` (this is also the rules' micro-batch), turns the messages into records
//! for each sink through the routes and the SQL rules, writes one block per sink and flushes
//! once. Then every waiting session learns its messages are durable and sends its PUBACKs.
//! Between batches the committer closes due windows and applies rule-file changes, so a reload
//! never splits a batch.
//!
//! Layout:
//! - `config`: the `[routes]` and `[rules]` sections.
//! - `routes`: direct routes, the filters sessions match, the per-sink batches of a commit.
//! - `rules`: the rules directory and inline rules around the engine.
//! - `committer`: the task, as hooks (`on_batch`, `on_control`, `on_tick`) under one loop.
//! - here: the handles sessions and the control plane hold, and [`start`].

mod committer;
mod config;
mod routes;
mod rules;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sitegate_rules::dir::Change;
use sitegate_rules::RuleStatus;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Stats;
use crate::spool::{Spool, SpoolConfig, SpoolError};
use committer::Committer;
use routes::{routes_of, Filters, Route};
use rules::{inline_label, Rules};

pub use committer::RULES_POLL;
pub use config::{RouteConfig, RulesConfig};
pub use routes::Wanted;

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
    /// What takes it, from [`Ingest::wants`].
    pub wanted: Wanted,
    /// Its MQTT 5 properties the rules may read, if it came with any.
    pub properties: Option<Arc<sitegate_rules::Properties>>,
    /// The IP address the device connected from (the rules' `sourceip()`).
    pub source_ip: Arc<str>,
}

/// Why submitted messages did not become durable; their PUBACKs are never sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("gateway is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Spool(Arc<SpoolError>),
}

impl CommitError {
    /// Whether the device sending the same messages again later can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            CommitError::ShuttingDown => true,
            CommitError::Spool(e) => e.retryable(),
        }
    }
}

/// Why the pipeline could not start or take a reconfiguration.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    #[error("rules.dir {} is not a directory", .0.display())]
    RulesDir(PathBuf),
    #[error("rule `{rule}` writes to sink `{sink}`, which the update removes; change or remove the rule in the same update")]
    SinkInUse { rule: String, sink: String },
    #[error("the pipeline has stopped")]
    Stopped,
}

impl PipelineError {
    /// Whether the same call may succeed later without a change to the configuration.
    pub fn retryable(&self) -> bool {
        false
    }
}

/// Resolves when the submitted messages are durable, or with the reason they are not.
pub type Receipt = oneshot::Receiver<Result<(), CommitError>>;

struct Submission {
    messages: Vec<Message>,
    done: oneshot::Sender<Result<(), CommitError>>,
}

/// The sessions' handle into the pipeline.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Submission>,
    /// The filters of every route and rule statement; replaced on reloads.
    filters: Arc<RwLock<Filters>>,
}

impl Ingest {
    /// What takes messages on `topic`; `None` when nothing does (they need no spooling).
    pub fn wants(&self, topic: &str) -> Option<Wanted> {
        self.filters.read().ok()?.wants(topic)
    }

    /// Hand over messages; waits only when the committer is `max_pending` behind.
    pub async fn submit(&self, messages: Vec<Message>) -> Receipt {
        let (done, receipt) = oneshot::channel();
        if let Err(mpsc::error::SendError(s)) = self.tx.send(Submission { messages, done }).await {
            let _ = s.done.send(Err(CommitError::ShuttingDown));
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

impl CommitSettings {
    /// Group commit as `[spool]` sets it.
    pub fn of(spool: &SpoolConfig) -> CommitSettings {
        CommitSettings {
            interval: spool.commit_interval.0,
            max_records: spool.commit_records,
            max_pending: spool.max_pending,
        }
    }
}

/// What `sitegate rules status` shows: loaded rules with their counters, and files refused.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RulesReport {
    pub dir: Option<PathBuf>,
    pub rules: Vec<RuleStatus>,
    /// Rule name → why its current file is refused (the previous version, if any, runs).
    pub refused: BTreeMap<String, String>,
}

/// What the pipeline runs: routes, rules and the sinks they may write to. At start and at
/// every live reconfiguration.
#[derive(Debug, Clone)]
pub struct PipelineUpdate {
    routes: Vec<Route>,
    dir: Option<PathBuf>,
    inline: BTreeMap<String, String>,
    error_sink: Option<String>,
    /// What the rules are checked against: the sinks, their template expressions, the account.
    context: sitegate_rules::Context,
}

impl PipelineUpdate {
    /// From the `[routes]` and `[rules]` sections and what the configuration gives the rules
    /// (`Config::rules_context`).
    pub fn new(
        routes: &BTreeMap<String, RouteConfig>,
        rules: &RulesConfig,
        context: sitegate_rules::Context,
    ) -> PipelineUpdate {
        PipelineUpdate {
            routes: routes_of(routes),
            dir: rules.dir.clone(),
            inline: rules.sql.clone(),
            error_sink: rules.error_sink.clone(),
            context,
        }
    }

    /// The sinks rules may write to.
    fn sinks(&self) -> &[String] {
        self.context.sinks.as_deref().unwrap_or_default()
    }
}

/// Hands live reconfigurations to the committer, which applies them between batches.
#[derive(Clone)]
pub struct PipelineControl {
    tx: mpsc::Sender<committer::Control>,
}

impl PipelineControl {
    /// Applies `update`; refused as a whole (nothing changes) when a rule that stays would
    /// write to a sink the update removes.
    pub async fn reconfigure(&self, update: PipelineUpdate) -> Result<(), PipelineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((update, reply))
            .await
            .map_err(|_| PipelineError::Stopped)?;
        answer.await.map_err(|_| PipelineError::Stopped)?
    }
}

/// The handles [`start`] returns.
pub struct Started {
    pub ingest: Ingest,
    pub control: PipelineControl,
    pub task: tokio::task::JoinHandle<()>,
    pub report: Arc<Mutex<RulesReport>>,
}

/// Starts the committer with `update`'s routes and rules.
pub async fn start(
    update: PipelineUpdate,
    settings: CommitSettings,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) -> Result<Started, PipelineError> {
    let report = Arc::new(Mutex::new(RulesReport {
        dir: update.dir.clone(),
        ..RulesReport::default()
    }));
    if let Some(dir) = &update.dir {
        if !dir.is_dir() {
            return Err(PipelineError::RulesDir(dir.clone()));
        }
    }
    let mut rules = None;
    if update.dir.is_some() || !update.inline.is_empty() {
        let mut r = Rules::new(
            update.dir.clone(),
            update.error_sink.clone(),
            update.context.clone(),
            report.clone(),
        );
        for (name, text) in &update.inline {
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
    let sources = rules
        .as_ref()
        .map(|r| r.engine.sources())
        .unwrap_or_default();
    let filters = Arc::new(RwLock::new(Filters::new(0, &update.routes, sources)));
    // The channel counts submissions, not messages; one read is rarely more than a few dozen.
    let (tx, rx) = mpsc::channel(settings.max_pending.div_ceil(16).max(16));
    let (control_tx, control_rx) = mpsc::channel(4);
    let committer = Committer {
        routes: update.routes,
        rules,
        filters: filters.clone(),
        report: report.clone(),
        settings,
        spool,
        stats,
        shutdown,
    };
    let task = tokio::spawn(committer.run(rx, control_rx));
    Ok(Started {
        ingest: Ingest { tx, filters },
        control: PipelineControl { tx: control_tx },
        task,
        report,
    })
}
