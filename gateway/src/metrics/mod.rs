//! What the gateway counts and times: the series names, the process's recorder, and the handles
//! the data path writes to. A leaf: it imports no other part, so the hot path does not depend
//! on the HTTP exporter (`ops::prometheus`), which is the only code that reads them all.
//!
//! Layout:
//! - `stats`: the device edge's counters, plain atomics bumped per packet and copied into the
//!   recorder at each scrape.
//! - here: the recorder ([`handle`]), the latency series and one sink's handles
//!   ([`SinkMetrics`]: its counters in [`Stats`] and its latency histogram), recorded per
//!   batch or per commit, never per packet.

mod stats;

use std::sync::OnceLock;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use metrics::Histogram;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use stats::{SinkCounters, SinkCounts, Stats, StatsSnapshot};

/// Histogram buckets, in seconds: 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// From a device's PUBLISH arriving to its group commit being durable.
pub const RECEIVE_TO_DURABLE: &str = "sitegate_receive_to_durable_seconds";
/// From a device's PUBLISH arriving to the sink acknowledging the record.
pub const RECEIVE_TO_SINK_ACK: &str = "sitegate_receive_to_sink_ack_seconds";
/// Look-ups in the AWS IoT registry (`[auth.registry]`), by `result`: answered or failed.
pub const REGISTRY_LOOKUPS: &str = "sitegate_registry_lookups_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's recorder, installed on first use; `None` if another recorder was installed
/// first (then the series go there).
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// One sink's handles, taken once when its drain starts: each event is counted once, in the
/// sink's [`SinkCounters`] (the exporter copies them at each scrape), and each acknowledged
/// record's latency goes to the histogram.
pub struct SinkMetrics {
    counters: Arc<SinkCounters>,
    latency: Histogram,
}

impl SinkMetrics {
    pub fn new(sink: &str, stats: &Stats) -> SinkMetrics {
        handle();
        SinkMetrics {
            counters: stats.sink(sink),
            latency: metrics::histogram!(RECEIVE_TO_SINK_ACK, "sink" => sink.to_string()),
        }
    }

    /// The sink accepted records received at `received_at_ms` (Unix ms), acknowledged `now_ms`.
    pub fn sent(&self, received_at_ms: impl Iterator<Item = u64>, now_ms: u64) {
        let mut n = 0;
        for at in received_at_ms {
            n += 1;
            self.latency
                .record(now_ms.saturating_sub(at) as f64 / 1000.0);
        }
        self.counters.sent.fetch_add(n, Relaxed);
    }

    /// A send failed as a whole.
    pub fn failed(&self) {
        self.counters.failures.fetch_add(1, Relaxed);
    }

    /// The drain waits before trying again.
    pub fn retrying(&self) {
        self.counters.retries.fetch_add(1, Relaxed);
    }

    /// The sink refused `n` records for good.
    pub fn rejected(&self, n: usize) {
        self.counters.rejected.fetch_add(n as u64, Relaxed);
    }
}
