//! The log sink: each record as one `tracing` line. For trying rules out, not for keeping data.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::sink::{Ack, Sink, SinkError};

/// `[sinks.NAME]` with `type = "log"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Log the payload too, not just identity and topic. Off by default: payloads may be sensitive.
    #[serde(default)]
    pub payload: bool,
}

/// Writes each record to the gateway's log at info level.
pub struct LogSink {
    name: String,
    config: LogConfig,
}

impl LogSink {
    /// A log sink called `name`.
    pub fn new(name: &str, config: LogConfig) -> Self {
        LogSink {
            name: name.into(),
            config,
        }
    }
}

#[async_trait]
impl Sink for LogSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError> {
        for r in batch {
            if self.config.payload {
                let payload = String::from_utf8_lossy(&r.payload);
                tracing::info!(sink = %self.name, id = r.id, thing = %r.thing_name, topic = %r.topic, rule = %r.rule, %payload, "record");
            } else {
                tracing::info!(sink = %self.name, id = r.id, thing = %r.thing_name, topic = %r.topic, rule = %r.rule, bytes = r.payload.len(), "record");
            }
        }
        Ok(Ack::all(batch.len()))
    }
}
