//! The drain: one task per sink that reads the queue in order, sends, and acknowledges only
//! what the sink accepted. Failures back off exponentially with jitter; nothing is dropped.

use std::sync::Arc;
use std::time::Duration;

use sitegate_plugins::backoff::Backoff;
use sitegate_plugins::{Record, Sink};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::metrics::{SinkMetrics, Stats};
use crate::spool::Spool;
use sitegate_plugins::Entry;

/// Records per `send` at most (Kinesis PutRecords takes 500).
pub const DRAIN_BATCH: usize = 500;
/// First retry delay after a failed send.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a sink whose endpoint comes back is sending again within about this
/// long. One small request per sink this often is no load on an endpoint that is down.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An idle drain re-checks its queue this often even without a wake-up (age expiry, keys).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Feed `sink` from its queue until `shutdown` turns true, then close it.
///
/// With a `linger`, a batch smaller than [`DRAIN_BATCH`] waits that long once for more records,
/// so a trickle of messages still fills PutRecords requests. `error_sink` is read when records
/// are refused, so a live reconfiguration can move it without restarting the drain.
pub async fn run(
    spool: Arc<Spool>,
    mut sink: Box<dyn Sink>,
    error_sink: watch::Receiver<Option<String>>,
    linger: Duration,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = sink.name().to_string();
    let Some(queue) = spool.queue(&name) else {
        tracing::error!(sink = %name, "no spool queue for sink; not draining");
        return;
    };
    let series = SinkMetrics::new(&name, &stats);
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut lingered = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let wait = match spool.read(&name, DRAIN_BATCH).await {
            Ok(batch) if batch.is_empty() => {
                tokio::select! {
                    _ = queue.appended.notified() => {}
                    _ = tokio::time::sleep(IDLE_CHECK) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            Ok(batch) if batch.len() < DRAIN_BATCH && !linger.is_zero() && !lingered => {
                lingered = true;
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            Ok(batch) => {
                lingered = false;
                let error_sink = error_sink.borrow().clone();
                send(
                    &spool,
                    sink.as_mut(),
                    error_sink.as_deref(),
                    &batch,
                    &series,
                    &mut backoff,
                )
                .await
            }
            Err(e) => {
                let delay = backoff.step();
                tracing::warn!(sink = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "spool read failed; will retry");
                Some(delay)
            }
        };
        if let Some(delay) = wait {
            series.retrying();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
    if let Err(e) = sink.close().await {
        tracing::warn!(sink = %name, error = %e, "closing sink");
    }
}

/// Sends one batch and acknowledges what the sink took; returns how long to wait before the
/// next try when it took nothing.
async fn send(
    spool: &Spool,
    sink: &mut dyn Sink,
    error_sink: Option<&str>,
    batch: &[Record],
    series: &SinkMetrics,
    backoff: &mut Backoff,
) -> Option<Duration> {
    let name = sink.name().to_string();
    match sink.send(batch).await {
        Ok(ack) => {
            let done = ack.done.min(batch.len());
            if !ack.rejected.is_empty() {
                reject(spool, &name, error_sink, batch, &ack.rejected, series).await;
            }
            if done > 0 {
                let through = batch[done - 1].id;
                series.sent(batch[..done].iter().map(|r| r.received_at_ms), now_ms());
                let settled = match spool.ack(&name, through) {
                    Ok(()) => spool.settle().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = settled {
                    tracing::error!(sink = %name, error = %e, "spool acknowledgement failed; records may be sent again");
                }
                backoff.reset();
                None
            } else {
                Some(backoff.step())
            }
        }
        Err(e) => {
            series.failed();
            let delay = backoff.step();
            if e.retryable() {
                tracing::warn!(sink = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "sink send failed; will retry");
            } else {
                tracing::error!(sink = %name, error = %e, retry_in_ms = delay.as_millis() as u64, "sink refused the batch; kept in the spool and retried until the cause is fixed");
            }
            Some(delay)
        }
    }
}

/// Route records a sink refused for good to the error sink, with the reason.
async fn reject(
    spool: &Spool,
    sink: &str,
    error_sink: Option<&str>,
    batch: &[Record],
    rejected: &[sitegate_plugins::Rejected],
    series: &SinkMetrics,
) {
    series.rejected(rejected.len());
    let target = error_sink.filter(|e| *e != sink);
    let Some(target) = target else {
        for r in rejected {
            tracing::warn!(sink, record = batch.get(r.index).map(|b| b.id), reason = %r.reason, "record refused by sink; no error sink configured, dropped");
        }
        return;
    };
    let entries: Vec<Entry> = rejected
        .iter()
        .filter_map(|r| {
            let record = batch.get(r.index)?;
            use base64::Engine as _;
            let body = serde_json::json!({
                "error": r.reason,
                "sink": sink,
                "record_id": record.id,
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(&record.payload),
                "failed_at": now_ms(),
            });
            Some(Entry {
                received_at_ms: record.received_at_ms,
                thing_name: record.thing_name.clone(),
                cert_id: record.cert_id.clone(),
                topic: record.topic.clone(),
                rule: record.rule.clone(),
                payload: serde_json::to_vec(&body).unwrap_or_default().into(),
                template_values: Vec::new(),
            })
        })
        .collect();
    if let Err(e) = spool.commit(&[(target.to_string(), entries)]).await {
        tracing::error!(sink, error_sink = target, error = %e, "could not spool refused records for the error sink; dropped");
    }
}
