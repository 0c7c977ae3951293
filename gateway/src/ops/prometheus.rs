//! Prometheus metrics on a loopback port (`[admin] metrics`): `GET /metrics` in the text format.
//!
//! The series live in the `metrics` crate's recorder, rendered by its Prometheus exporter. The
//! edge's hot-path counters stay plain atomics in [`Stats`] and are copied into the recorder
//! at each scrape, as are per-sink counters, spool depths and per-rule counters; the latency
//! histograms are recorded where they happen (per batch or per commit, never per packet).
//! The `metrics` recorder is process-wide: several gateways in one process (tests) share it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::metrics::{handle, Stats};
use crate::pipeline::RulesReport;
use crate::spool::Spool;

/// Time a scraper has to send its request and take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Scrapes answered at once; more connections are closed.
const MAX_CONCURRENT_SCRAPES: usize = 4;
/// How often histogram samples are folded into their buckets. The exporter keeps every raw
/// sample until a render; with no scraper (or a slow one) that would grow without bound, about
/// 8 bytes per message.
const UPKEEP: Duration = Duration::from_secs(1);

/// Folds histogram samples into their buckets every [`UPKEEP`] until `stopped`, whether or not
/// anyone scrapes.
pub async fn upkeep(mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(UPKEEP) => {}
            _ = stopped.changed() => return,
        }
        if let Some(h) = handle() {
            let _ = h.render();
        }
    }
}

/// What a scrape reads besides the recorder.
#[derive(Clone)]
pub struct Sources {
    pub stats: Arc<Stats>,
    pub spool: Arc<Spool>,
    pub rules: Arc<Mutex<RulesReport>>,
}

/// Copies the counters kept elsewhere into the recorder.
async fn refresh(sources: &Sources) {
    let s = sources.stats.snapshot();
    gauge!("sitegate_connections_open").set(s.connections_open as f64);
    gauge!("sitegate_claim_sessions_open").set(s.claim_sessions_open as f64);
    gauge!("sitegate_handshakes_pending").set(s.handshakes_pending as f64);
    counter!("sitegate_connections_accepted_total").absolute(s.connections_accepted);
    counter!("sitegate_keepalive_timeouts_total").absolute(s.keepalive_timeouts);
    counter!("sitegate_messages_in_total", "qos" => "0").absolute(s.messages_in_qos0);
    counter!("sitegate_messages_in_total", "qos" => "1").absolute(s.messages_in_qos1);
    counter!("sitegate_messages_out_total").absolute(s.messages_out);
    counter!("sitegate_deliveries_too_large_total").absolute(s.deliveries_too_large);
    counter!("sitegate_sessions_expired_total").absolute(s.sessions_expired);
    counter!("sitegate_sessions_saved_total").absolute(s.sessions_saved);
    counter!("sitegate_sessions_restored_total").absolute(s.sessions_restored);
    counter!("sitegate_session_messages_saved_total").absolute(s.session_messages_saved);
    counter!("sitegate_session_messages_dropped_total").absolute(s.session_messages_dropped);
    counter!("sitegate_session_messages_expired_total").absolute(s.session_messages_expired);
    counter!("sitegate_router_rebuilds_total").absolute(s.router_rebuilds);
    for (reason, n) in s.denials() {
        counter!("sitegate_denied_total", "reason" => reason).absolute(n);
    }
    counter!("sitegate_relayed_total", "direction" => "up").absolute(s.relayed_up);
    counter!("sitegate_relayed_total", "direction" => "down").absolute(s.relayed_down);
    counter!("sitegate_shadow_answers_cached_total").absolute(s.shadow_answers_cached);
    counter!("sitegate_rule_messages_in_total").absolute(s.rule_messages_in);
    counter!("sitegate_spool_commits_total").absolute(s.spool_commits);
    counter!("sitegate_spool_full_waits_total").absolute(s.spool_full_waits);
    counter!("sitegate_config_updates_total", "result" => "applied")
        .absolute(s.config_updates_applied);
    counter!("sitegate_config_updates_total", "result" => "refused")
        .absolute(s.config_updates_refused);
    counter!("sitegate_spool_errors_total").absolute(s.spool_errors);
    for (sink, c) in sources.stats.sinks() {
        let sink = [("sink", sink)];
        counter!("sitegate_sink_records_sent_total", &sink).absolute(c.sent);
        counter!("sitegate_sink_send_failures_total", &sink).absolute(c.failures);
        counter!("sitegate_sink_retries_total", &sink).absolute(c.retries);
        counter!("sitegate_sink_records_rejected_total", &sink).absolute(c.rejected);
    }
    for q in sources.spool.status().await.queues {
        let sink = [("sink", q.sink.clone())];
        gauge!("sitegate_spool_records", &sink).set(q.records as f64);
        gauge!("sitegate_spool_bytes", &sink).set(q.bytes as f64);
        gauge!("sitegate_spool_oldest_age_seconds", &sink)
            .set(q.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
        counter!("sitegate_spool_dropped_records_total", &sink).absolute(q.dropped_records);
        counter!("sitegate_spool_quarantined_blocks_total", &sink).absolute(q.quarantined_blocks);
        counter!("sitegate_spool_lost_records_total", &sink).absolute(q.lost_records);
    }
    let report = sources.rules.lock().map(|r| r.clone()).unwrap_or_default();
    for r in &report.rules {
        let rule = [("rule", r.name.clone())];
        counter!("sitegate_rule_rows_in_total", &rule).absolute(r.rows_in);
        counter!("sitegate_rule_rows_out_total", &rule).absolute(r.rows_out);
        counter!("sitegate_rule_errors_total", &rule).absolute(r.errors);
        counter!("sitegate_rule_late_events_total", &rule).absolute(r.late_events);
    }
    gauge!("sitegate_rules_refused").set(report.refused.len() as f64);
}

/// Answers scrapes on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, sources: Sources, mut shutdown: watch::Receiver<bool>) {
    let Some(handle) = handle() else {
        tracing::warn!("another metrics recorder is installed; /metrics is not served");
        return;
    };
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let (handle, sources) = (handle.clone(), sources.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) =
                tokio::time::timeout(IO_TIMEOUT, answer(stream, &handle, &sources)).await
            {
                tracing::debug!(error = %e, "metrics scrape timed out");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    sources: &Sources,
) {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        if head.len() > MAX_REQUEST_BYTES {
            let _ = respond(&mut stream, "431 Request Header Fields Too Large", "").await;
            return;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => {
            refresh(sources).await;
            ("200 OK", handle.render())
        }
        (Some(b"GET"), _) => ("404 Not Found", "metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", String::new()),
    };
    let _ = respond(&mut stream, status, &body).await;
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Fetches `/metrics` from `addr` (for `sitegate demo` and the tests): the exposition text.
pub async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: sitegate\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(std::io::Error::other(format!(
                "unexpected answer from {addr}: {}",
                response.lines().next().unwrap_or_default()
            ))),
        }
    };
    tokio::time::timeout(IO_TIMEOUT, io).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "metrics scrape timed out")
    })?
}

/// The value of one series in exposition text: `name` with its labels as written, e.g.
/// `sitegate_messages_in_total{qos="1"}`.
pub fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
