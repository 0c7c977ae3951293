//! Ingest: device messages in, records durable in the spool out, with group commit.
//!
//! Sessions submit the allowed publishes of one socket read as one [`Submission`]. A single
//! committer task gathers submissions for up to `commit_interval` or `commit_records`, turns
//! the messages into records for each sink (through the routes; the rules engine plugs in at
//! the same point), writes one block per sink and flushes once. Then every waiting session
//! learns its messages are durable and sends its PUBACKs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, RouteConfig};
use crate::spool::{Draft, Spool, SpoolError};
use crate::stats::Stats;

/// One allowed device publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub thing: Arc<str>,
    pub cert_id: Arc<str>,
    pub qos: u8,
    pub received_at_ms: u64,
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
    routes: Arc<Vec<Route>>,
}

impl Ingest {
    /// Whether any route takes messages on `topic` (others need no spooling).
    pub fn wants(&self, topic: &str) -> bool {
        self.routes
            .iter()
            .any(|r| sitegate_plugins::topic::filter_matches(&r.from, topic))
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

/// Start the committer; returns the sessions' handle and the task.
pub fn start(
    config: &Config,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) -> (Ingest, tokio::task::JoinHandle<()>) {
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
    // The channel counts submissions, not messages; one read is rarely more than a few dozen.
    let (tx, rx) = mpsc::channel(settings.max_pending.div_ceil(16).max(16));
    let routes = Arc::new(routes);
    let task = tokio::spawn(committer(
        rx,
        routes.clone(),
        settings,
        spool,
        stats,
        shutdown,
    ));
    (Ingest { tx, routes }, task)
}

async fn committer(
    mut rx: mpsc::Receiver<Submission>,
    routes: Arc<Vec<Route>>,
    settings: CommitSettings,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some(first) = rx.recv().await {
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
        let batches = route(&routes, &waiting);
        let result = loop {
            match spool.commit(&batches).await {
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
                        break Err("gateway is shutting down".to_string());
                    }
                }
                Err(e) => {
                    stats.spool_errors.fetch_add(1, Relaxed);
                    break Err(e.to_string());
                }
                Ok(()) => {
                    stats.spool_commits.fetch_add(1, Relaxed);
                    break Ok(());
                }
            }
        };
        for s in waiting {
            let _ = s.done.send(result.clone());
        }
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
