//! Delivery: from the spool to the sinks, one drain task per sink.
//!
//! [`SinkSet`] builds sinks from `[sinks]` (plugins' `registry()`), runs one drain per sink
//! with its own stop switch (so one sink can be replaced without touching the others), and
//! stops them within [`DRAIN_STOP_GRACE`].
//!
//! Layout:
//! - `drain`: the per-sink loop that reads, sends, acknowledges, settles and backs off.
//! - here: the set of running drains.

pub mod drain;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sitegate_plugins::nucleus::Nucleus;
use sitegate_plugins::republish::LocalBroker;
use sitegate_plugins::{Sink, SinkConfig, SinkContext, SinkError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Stats;
use crate::spool::Spool;

/// How long a stopping drain may take to finish its send and close its sink.
pub const DRAIN_STOP_GRACE: Duration = Duration::from_secs(5);

struct RunningDrain {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The sinks' drains.
pub struct SinkSet {
    spool: Arc<Spool>,
    /// Where `republish` sinks publish: the local broker, which holds republished topics to
    /// the rules devices' topics are held to.
    local: Arc<dyn LocalBroker>,
    nucleus: Option<Arc<Nucleus>>,
    stats: Arc<Stats>,
    site: String,
    /// `[rules] error_sink`, read by every drain when its sink refuses records.
    error_sink: watch::Sender<Option<String>>,
    running: BTreeMap<String, RunningDrain>,
}

impl SinkSet {
    pub fn new(
        spool: Arc<Spool>,
        local: Arc<dyn LocalBroker>,
        nucleus: Option<Arc<Nucleus>>,
        stats: Arc<Stats>,
        site: String,
        error_sink: Option<String>,
    ) -> SinkSet {
        SinkSet {
            spool,
            local,
            nucleus,
            stats,
            site,
            error_sink: watch::Sender::new(error_sink),
            running: BTreeMap::new(),
        }
    }

    /// Builds the sink `name` describes (connecting happens at its first send).
    pub async fn build(&self, name: &str, config: &SinkConfig) -> Result<Box<dyn Sink>, SinkError> {
        let local: Option<Arc<dyn LocalBroker>> = match config {
            SinkConfig::Republish(_) => Some(Arc::clone(&self.local)),
            _ => None,
        };
        let context = SinkContext {
            name: name.to_string(),
            site: self.site.clone(),
            local,
            nucleus: self.nucleus.clone(),
        };
        sitegate_plugins::build(config.clone(), context).await
    }

    /// Starts draining `name`'s queue into `sink`, waiting up to `linger` to fill a batch.
    pub fn spawn(&mut self, name: &str, linger: Duration, sink: Box<dyn Sink>) {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(drain::run(
            Arc::clone(&self.spool),
            sink,
            self.error_sink.subscribe(),
            linger,
            Arc::clone(&self.stats),
            stopped,
        ));
        self.running
            .insert(name.to_string(), RunningDrain { stop, task });
    }

    /// Stops the drain of `name`: its send in progress finishes, the sink closes.
    pub async fn stop(&mut self, name: &str) {
        if let Some(d) = self.running.remove(name) {
            d.stop.send_replace(true);
            wait_stopped(name, d.task).await;
        }
    }

    /// Stops every drain, all at once.
    pub async fn stop_all(&mut self) {
        let running = std::mem::take(&mut self.running);
        for d in running.values() {
            d.stop.send_replace(true);
        }
        for (name, d) in running {
            wait_stopped(&name, d.task).await;
        }
    }

    /// The sink that refused records go to from now on (`[rules] error_sink`).
    pub fn set_error_sink(&self, sink: Option<String>) {
        self.error_sink.send_replace(sink);
    }

    /// Names of the sinks being drained.
    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }
}

async fn wait_stopped(sink: &str, task: JoinHandle<()>) {
    if tokio::time::timeout(DRAIN_STOP_GRACE, task).await.is_err() {
        tracing::warn!(sink, "drain did not stop in time");
    }
}
