//! The committer: the one task that gives records their ids and makes them durable.
//!
//! The framework part is [`Committer::run`], which owns the loop and calls three hooks:
//! [`Committer::on_batch`] for the submissions gathered over one commit interval (routes,
//! rules, one spool commit, then every waiting session's receipt), [`Committer::on_control`]
//! for a live reconfiguration (applied between batches, never inside one), and
//! [`Committer::on_tick`] for the rules' housekeeping (directory poll, closing windows).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::routes::{Batches, Filters, Route};
use super::rules::Rules;
use super::{CommitError, CommitSettings, PipelineError, PipelineUpdate, RulesReport, Submission};
use crate::metrics::Stats;
use crate::spool::{Spool, SpoolError};

/// How often the committer looks at the rules directory and closes due windows.
pub const RULES_POLL: Duration = Duration::from_millis(250);
/// How often a commit held by a low disk looks at the free space again.
const DISK_RECHECK: Duration = Duration::from_millis(500);
/// How often a commit held by a full `block` queue looks again without a drain's signal.
const FULL_RECHECK: Duration = Duration::from_millis(500);

/// A live reconfiguration and where its outcome goes.
pub(super) type Control = (PipelineUpdate, oneshot::Sender<Result<(), PipelineError>>);

pub(super) struct Committer {
    pub(super) routes: Vec<Route>,
    pub(super) rules: Option<Rules>,
    /// What sessions match topics against; replaced whenever routes or rules change.
    pub(super) filters: Arc<RwLock<Filters>>,
    pub(super) report: Arc<Mutex<RulesReport>>,
    pub(super) settings: CommitSettings,
    pub(super) spool: Arc<Spool>,
    pub(super) stats: Arc<Stats>,
    pub(super) shutdown: watch::Receiver<bool>,
}

impl Committer {
    /// Runs until every [`super::Ingest`] is dropped.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Submission>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut poll = tokio::time::interval(RULES_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut control_open = true;
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(first) => {
                        let waiting = self.gather(&mut rx, first).await;
                        self.on_batch(waiting).await;
                    }
                    None => break,
                },
                update = control.recv(), if control_open => match update {
                    Some((update, reply)) => {
                        let result = self.on_control(update).await;
                        let _ = reply.send(result);
                    }
                    None => control_open = false,
                },
                _ = poll.tick(), if self.rules.is_some() => self.on_tick().await,
            }
        }
        if let Some(r) = self.rules.as_mut() {
            r.publish_report();
        }
    }

    /// More submissions after `first`, until `max_records` or one commit interval after its
    /// oldest message was read. The interval bounds how long a message waits for company (as
    /// `[spool] commit_interval` documents): a submission that queued while the previous batch
    /// committed has waited already and should not wait a whole interval more.
    async fn gather(
        &self,
        rx: &mut mpsc::Receiver<Submission>,
        first: Submission,
    ) -> Vec<Submission> {
        let mut count = first.messages.len();
        let oldest = first.messages.iter().map(|m| m.received).min();
        let deadline = batch_deadline(oldest, self.settings.interval, std::time::Instant::now());
        let mut waiting = vec![first];
        while count < self.settings.max_records {
            // Past the deadline, what is already queued still joins (up to `max_records`).
            tokio::select! {
                biased;
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
        waiting
    }

    /// Routes and rules over one micro-batch, one commit, then every session's receipt.
    pub(super) async fn on_batch(&mut self, waiting: Vec<Submission>) {
        let mut batches = Batches::default();
        let generation = self.filters_generation();
        let messages = waiting.iter().flat_map(|s| s.messages.iter());
        for m in messages.clone() {
            batches.route(&self.routes, generation, m);
        }
        if let Some(r) = self.rules.as_mut() {
            // Only messages some statement takes are copied for the engine; routes need none.
            let traced = r.engine.reads_trace_id();
            let for_rules: Vec<Arc<sitegate_rules::Message>> = match self.filters.read() {
                Ok(filters) => messages
                    .filter(|m| filters.for_rules(m))
                    .map(|m| {
                        Arc::new(sitegate_rules::Message {
                            topic: m.topic.clone(),
                            thing: m.thing.to_string(),
                            cert_id: m.cert_id.to_string(),
                            payload: m.payload.clone(),
                            received_at_ms: i64::try_from(m.received_at_ms).unwrap_or(i64::MAX),
                            properties: m.properties.clone(),
                            source_ip: Some(Arc::clone(&m.source_ip)),
                            trace_id: traced.then(rand::random),
                        })
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            self.stats
                .rule_messages_in
                .fetch_add(for_rules.len() as u64, Relaxed);
            let now = crate::clock::now_ms() as i64;
            let produced = if for_rules.is_empty() {
                r.engine.tick(now).await
            } else {
                r.engine.process(&for_rules, now).await
            };
            self.stats
                .rule_rows_out
                .fetch_add(produced.outputs.len() as u64, Relaxed);
            batches.add_outputs(produced.outputs);
        }
        let result = self.commit(&batches).await;
        if result.is_ok() {
            let durable = metrics::histogram!(crate::metrics::RECEIVE_TO_DURABLE);
            let now = std::time::Instant::now();
            for m in waiting.iter().flat_map(|s| s.messages.iter()) {
                durable.record(now.duration_since(m.received).as_secs_f64());
            }
        }
        // Newest first: a session wakes on its oldest read's receipt, and by then the receipts
        // of its later reads in this commit are already resolved, so it acknowledges them all
        // in one write (`release_held`). Oldest first, it woke, took one, and wrote once a read.
        for s in waiting.into_iter().rev() {
            let _ = s.done.send(result.clone());
        }
    }

    /// Applies a live reconfiguration as a whole, or refuses it with nothing changed.
    pub(super) async fn on_control(&mut self, update: PipelineUpdate) -> Result<(), PipelineError> {
        let wants_rules = update.dir.is_some() || !update.inline.is_empty();
        if self.rules.is_none() && wants_rules {
            self.rules = Some(Rules::new(
                None,
                update.error_sink.clone(),
                update.context.clone(),
                self.report.clone(),
            ));
        }
        let result = match self.rules.as_mut() {
            Some(r) => r.reconfigure(&update).await,
            None => Ok(()),
        };
        if result.is_ok() {
            self.routes = update.routes;
        }
        if let Some(r) = self.rules.as_ref() {
            r.publish_report();
        }
        self.refresh_filters();
        result
    }

    /// Rule files changed on disk are applied; windows that are due close and are spooled.
    pub(super) async fn on_tick(&mut self) {
        let Some(r) = self.rules.as_mut() else {
            return;
        };
        let reloaded = r.reload().await;
        let closed = r.engine.tick(crate::clock::now_ms() as i64).await;
        r.publish_report();
        if reloaded {
            self.refresh_filters();
        }
        if !closed.outputs.is_empty() {
            self.stats
                .rule_rows_out
                .fetch_add(closed.outputs.len() as u64, Relaxed);
            let mut batches = Batches::default();
            batches.add_outputs(closed.outputs);
            if let Err(e) = self.commit(&batches).await {
                tracing::error!(error = %e, "could not spool closed windows");
            }
        }
    }

    fn filters_generation(&self) -> u64 {
        self.filters.read().map(|f| f.generation()).unwrap_or(0)
    }

    fn refresh_filters(&self) {
        let sources = self
            .rules
            .as_ref()
            .map(|r| r.engine.sources())
            .unwrap_or_default();
        if let Ok(mut f) = self.filters.write() {
            *f = Filters::new(f.generation() + 1, &self.routes, sources);
        }
    }

    /// One commit, waiting while a `block` queue is full or the disk is low.
    async fn commit(&mut self, batches: &Batches) -> Result<(), CommitError> {
        loop {
            let wait = match self.spool.commit(batches.as_slice()).await {
                Ok(()) => {
                    self.stats.spool_commits.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Err(SpoolError::Full {
                    sink,
                    bytes,
                    max_bytes,
                }) => {
                    tracing::warn!(
                        sink,
                        bytes,
                        max_bytes,
                        "spool full: holding PUBACKs until the sink drains"
                    );
                    FULL_RECHECK
                }
                Err(SpoolError::DiskLow(low)) => {
                    tracing::warn!(
                        free = low.free,
                        reserve = low.reserve,
                        "disk below the spool's reserve: holding PUBACKs until space returns"
                    );
                    DISK_RECHECK
                }
                Err(e) => {
                    self.stats.spool_errors.fetch_add(1, Relaxed);
                    return Err(CommitError::Spool(Arc::new(e)));
                }
            };
            self.stats.spool_full_waits.fetch_add(1, Relaxed);
            tokio::select! {
                _ = self.spool.space.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.changed() => {}
            }
            if *self.shutdown.borrow() {
                return Err(CommitError::ShuttingDown);
            }
        }
    }
}

/// When a batch whose oldest message was read at `oldest` stops waiting for more: one
/// `interval` after that read, and never later than one interval from `now`.
fn batch_deadline(
    oldest: Option<std::time::Instant>,
    interval: Duration,
    now: std::time::Instant,
) -> tokio::time::Instant {
    let due = oldest.map_or(now, |t| t.min(now)) + interval;
    tokio::time::Instant::from_std(due)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_waits_one_interval_from_its_oldest_message() {
        let now = std::time::Instant::now();
        let interval = Duration::from_millis(5);
        let fresh = batch_deadline(Some(now), interval, now);
        assert_eq!(fresh.into_std(), now + interval);
        // Queued through the previous commit for longer than the interval: due at once.
        let stale = batch_deadline(Some(now - Duration::from_millis(8)), interval, now);
        assert!(stale.into_std() <= now);
        let half = batch_deadline(Some(now - Duration::from_millis(2)), interval, now);
        assert_eq!(half.into_std(), now + Duration::from_millis(3));
        assert_eq!(
            batch_deadline(None, interval, now).into_std(),
            now + interval
        );
    }
}
