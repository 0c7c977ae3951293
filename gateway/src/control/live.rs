//! Live reconfiguration: sinks, routes and rules change while devices stay connected.
//!
//! [`Live::apply`] takes a new, validated config and
//! changes what can change live, in an order that never loses a record: new sinks and their
//! spool queues first, then the pipeline (routes and rules; refused as a whole if a rule that
//! stays would lose its sink), then the drains of removed or changed sinks stop and the new
//! ones start. A removed sink's queue stays in the spool until the sink returns or the records
//! expire. Keys that need a restart (listener, auth, spool, …) are named in the log.

use std::sync::Arc;

use crate::config::Config;
use crate::delivery::SinkSet;
use crate::metrics::Stats;
use crate::pipeline::{PipelineControl, PipelineError};
use crate::spool::{Spool, SpoolError};
use sitegate_plugins::SinkError;

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
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

impl ApplyError {
    /// Whether the same update may be taken later (a sink's endpoint or the store may come
    /// back); otherwise the configuration has to change.
    pub fn retryable(&self) -> bool {
        match self {
            ApplyError::Sink { source, .. } => source.retryable(),
            ApplyError::Spool(e) => e.retryable(),
            ApplyError::Pipeline(e) => e.retryable(),
        }
    }
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
            self.spool.add_queue(name, &running.spool).await?;
            let sink = sinks
                .build(name, config)
                .await
                .map_err(|source| ApplyError::Sink {
                    name: name.clone(),
                    source,
                })?;
            built.push((name.clone(), config.linger(), sink, previous.is_some()));
        }
        self.control.reconfigure(new.pipeline_update()).await?;
        sinks.set_error_sink(new.rules.error_sink.clone());
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
    differs("downlinks", running.downlinks != new.downlinks);
    differs("relay", running.relay != new.relay);
    keys
}
