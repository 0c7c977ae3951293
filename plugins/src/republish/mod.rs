//! The republish sink: records go back into the gateway's local broker, so a rule's output can
//! feed local devices (a freezer alarm that a local siren subscribes to). The gateway supplies
//! the broker through [`LocalBroker`]; this crate never sees the broker itself.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::sink::{Ack, Rejected, Sink, SinkError};
use crate::template::Template;

/// `[sinks.NAME]` with `type = "republish"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepublishConfig {
    /// Topic template for each record, e.g. "alerts/${thing_name}".
    pub topic: Template,
    /// QoS for local subscribers: 0 or 1.
    #[serde(default)]
    pub qos: u8,
    /// Publish retained, so late subscribers get the latest record.
    #[serde(default)]
    pub retain: bool,
    /// Publish the whole envelope (identity, topic, rule) instead of just the row.
    #[serde(default)]
    pub envelope: bool,
}

impl RepublishConfig {
    /// Pure checks; errors name the key below `[sinks.NAME]`.
    pub fn validate(&self) -> Result<(), String> {
        if self.qos > 1 {
            return Err("`qos` must be 0 or 1".into());
        }
        if self.topic.source().is_empty() {
            return Err("`topic` must not be empty".into());
        }
        Ok(())
    }
}

/// The gateway's local broker, as the republish sink sees it.
#[async_trait]
pub trait LocalBroker: Send + Sync {
    /// Hand one message to the local broker.
    async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<(), LocalPublishError>;
}

/// Why the local broker did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalPublishError {
    /// The message can never be taken (its topic breaks the site's topic rules, the retained
    /// limits are reached): the record is refused, not retried.
    #[error("{0}")]
    Refused(String),
    /// The broker is not there right now; retrying can help.
    #[error("{0}")]
    Unavailable(String),
}

/// Publishes records to local subscribers.
pub struct RepublishSink {
    name: String,
    site: String,
    config: RepublishConfig,
    broker: Arc<dyn LocalBroker>,
}

impl RepublishSink {
    /// A sink publishing into `broker`.
    pub fn new(
        name: &str,
        site: &str,
        config: RepublishConfig,
        broker: Arc<dyn LocalBroker>,
    ) -> Self {
        RepublishSink {
            name: name.into(),
            site: site.into(),
            config,
            broker,
        }
    }
}

#[async_trait]
impl Sink for RepublishSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError> {
        let mut rejected = Vec::new();
        for (index, record) in batch.iter().enumerate() {
            let topic = self.config.topic.render(record, &self.site);
            if topic.is_empty() || topic.contains(['+', '#']) || topic.len() > usize::from(u16::MAX)
            {
                rejected.push(Rejected {
                    index,
                    reason: format!("topic {topic:?} is not a valid MQTT topic"),
                });
                continue;
            }
            let payload = if self.config.envelope {
                Bytes::from(record.envelope_bytes(&self.site))
            } else {
                record.payload.clone()
            };
            match self
                .broker
                .publish(topic, payload, self.config.qos, self.config.retain)
                .await
            {
                Ok(()) => {}
                Err(LocalPublishError::Refused(reason)) => {
                    rejected.push(Rejected { index, reason });
                }
                Err(e @ LocalPublishError::Unavailable(_)) => {
                    if index == 0 {
                        return Err(SinkError::Server(format!("local broker: {e}")));
                    }
                    return Ok(Ack {
                        done: index,
                        rejected,
                    });
                }
            }
        }
        Ok(Ack {
            done: batch.len(),
            rejected,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use super::*;
    use crate::record::sample;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Bytes)>>);

    #[async_trait]
    impl LocalBroker for Recorder {
        async fn publish(
            &self,
            topic: String,
            payload: Bytes,
            _qos: u8,
            _retain: bool,
        ) -> Result<(), LocalPublishError> {
            self.0.lock().unwrap().push((topic, payload));
            Ok(())
        }
    }

    #[tokio::test]
    async fn rows_go_to_the_templated_topic() {
        let broker = Arc::new(Recorder::default());
        let config = RepublishConfig {
            topic: Template::parse("alerts/${thing_name}/${zone}").unwrap(),
            qos: 1,
            retain: false,
            envelope: false,
        };
        let mut sink = RepublishSink::new("local", "s", config, broker.clone());
        let ack = sink
            .send(&[sample(1, "freezer-1", r#"{"zone":"B","t":-2}"#)])
            .await
            .unwrap();
        assert_eq!(ack, Ack::all(1));
        let got = broker.0.lock().unwrap().clone();
        assert_eq!(got[0].0, "alerts/freezer-1/B");
        assert_eq!(&got[0].1[..], br#"{"zone":"B","t":-2}"#);
    }
}
