//! Live reconfiguration: sinks, routes and rules change while devices stay connected.
//!
//! [`SinkSet`] runs one drain task per sink, each with its own stop switch, so one sink can be
//! replaced without touching the others. [`Live::apply`] takes a new, validated config and
//! changes what can change live, in an order that never loses a record: new sinks and their
//! spool queues first, then the pipeline (routes and rules; refused as a whole if a rule that
//! stays would lose its sink), then the drains of removed or changed sinks stop and the new
//! ones start. A removed sink's queue stays in the spool until the sink returns or the records
//! expire. Keys that need a restart (listener, auth, spool, …) are named in the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sitegate_plugins::nucleus::Nucleus;
use sitegate_plugins::republish::LocalBroker;
use sitegate_plugins::{Sink, SinkConfig, SinkContext, SinkError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::{Fabric, Republisher};
use crate::config::Config;
use crate::pipeline::{PipelineControl, PipelineUpdate};
use crate::spool::{drain, Spool};
use crate::stats::Stats;
use crate::topic::TopicLimits;

/// How long a stopping drain may take to finish its send and close its sink.
pub const DRAIN_STOP_GRACE: Duration = Duration::from_secs(5);

struct RunningDrain {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The sinks' drains.
pub struct SinkSet {
    spool: Arc<Spool>,
    fabric: Arc<Fabric>,
    /// The topic rules republished topics are held to, as devices' are.
    topics: TopicLimits,
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
        fabric: Arc<Fabric>,
        topics: TopicLimits,
        nucleus: Option<Arc<Nucleus>>,
        stats: Arc<Stats>,
        site: String,
        error_sink: Option<String>,
    ) -> SinkSet {
        SinkSet {
            spool,
            fabric,
            topics,
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
            SinkConfig::Republish(_) => Some(Arc::new(Republisher::new(
                Arc::clone(&self.fabric),
                self.topics,
            ))),
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

/// What one live reconfiguration did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Applied {
    pub sinks_started: Vec<String>,
    pub sinks_replaced: Vec<String>,
    pub sinks_stopped: Vec<String>,
    /// Changed keys that take effect at the next restart.
    pub restart_needed: Vec<&'static str>,
}

/// Why a reconfiguration was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot start sink `{name}`: {source}")]
    Sink { name: String, source: SinkError },
    #[error("cannot open the spool queue: {0}")]
    Spool(String),
    #[error("{0}")]
    Pipeline(String),
}

/// The running configuration and the parts that change with it.
pub struct Live {
    sinks: Arc<tokio::sync::Mutex<SinkSet>>,
    control: PipelineControl,
    running: tokio::sync::Mutex<Config>,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
}

impl Live {
    pub fn new(
        config: Config,
        sinks: Arc<tokio::sync::Mutex<SinkSet>>,
        control: PipelineControl,
        spool: Arc<Spool>,
        stats: Arc<Stats>,
    ) -> Live {
        Live {
            sinks,
            control,
            running: tokio::sync::Mutex::new(config),
            spool,
            stats,
        }
    }

    /// The configuration now in force (keys that wait for a restart show their old value).
    pub async fn running(&self) -> Config {
        self.running.lock().await.clone()
    }

    /// Whether `new` differs from what runs in anything [`Live::apply`] would act on or warn about.
    pub async fn differs(&self, new: &Config) -> bool {
        let running = self.running.lock().await;
        new.sinks != running.sinks
            || new.routes != running.routes
            || new.rules != running.rules
            || !restart_needed(&running, new).is_empty()
    }

    /// Counts an update refused before it reached [`Live::apply`] (it did not validate).
    pub fn refused(&self) {
        self.stats
            .config_updates_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies what can change live from `new` (already validated).
    pub async fn apply(&self, new: Config) -> Result<Applied, ApplyError> {
        let result = self.apply_inner(new).await;
        let counter = match &result {
            Ok(_) => &self.stats.config_updates_applied,
            Err(_) => &self.stats.config_updates_refused,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        result
    }

    async fn apply_inner(&self, new: Config) -> Result<Applied, ApplyError> {
        let mut running = self.running.lock().await;
        let mut sinks = self.sinks.lock().await;
        let mut applied = Applied {
            restart_needed: restart_needed(&running, &new),
            ..Applied::default()
        };
        // Build every new or changed sink before anything changes: a sink that cannot be built
        // refuses the whole update.
        let mut built = Vec::new();
        for (name, config) in &new.sinks {
            let previous = running.sinks.get(name);
            if previous == Some(config) {
                continue;
            }
            self.spool
                .add_queue(name, &running.spool)
                .await
                .map_err(ApplyError::Spool)?;
            let sink = sinks
                .build(name, config)
                .await
                .map_err(|source| ApplyError::Sink {
                    name: name.clone(),
                    source,
                })?;
            built.push((name.clone(), config.linger(), sink, previous.is_some()));
        }
        self.control
            .reconfigure(PipelineUpdate::of(&new))
            .await
            .map_err(ApplyError::Pipeline)?;
        sinks.error_sink.send_replace(new.rules.error_sink.clone());
        for name in sinks.names() {
            if !new.sinks.contains_key(&name) {
                sinks.stop(&name).await;
                applied.sinks_stopped.push(name);
            }
        }
        for (name, linger, sink, replaces) in built {
            if replaces {
                sinks.stop(&name).await;
                applied.sinks_replaced.push(name.clone());
            } else {
                applied.sinks_started.push(name.clone());
            }
            sinks.spawn(&name, linger, sink);
        }
        running.sinks = new.sinks;
        running.routes = new.routes;
        running.rules = new.rules;
        Ok(applied)
    }
}

/// Keys of `new` that differ from `running` and only take effect at a restart.
fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differs("site", running.site != new.site);
    differs("data_dir", running.data_dir != new.data_dir);
    differs("listener", running.listener != new.listener);
    differs("auth", running.auth != new.auth);
    differs("admin", running.admin != new.admin);
    differs("spool", running.spool != new.spool);
    differs("greengrass", running.greengrass != new.greengrass);
    keys
}
