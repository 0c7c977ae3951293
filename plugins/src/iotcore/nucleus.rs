//! `via = "nucleus"`: the same publishes as the MQTT path (topic, JSON envelope, identity in
//! user properties, IoT Core's limits checked first), sent as Greengrass IPC
//! `PublishToIoTCore` requests, up to `max_inflight` at once, paced by `max_publish_rate`.
//! A record is done when the nucleus answers its request.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;

use super::{outbound, settle, IotCoreConfig, Pacer};
use crate::nucleus::{IotCorePublish, IpcError, Nucleus, Pending};
use crate::record::Record;
use crate::sink::{Ack, Sink, SinkError};

/// Publishes records to IoT Core through the Greengrass nucleus.
pub struct NucleusSink {
    name: String,
    site: String,
    config: IotCoreConfig,
    nucleus: Arc<Nucleus>,
    pacer: Pacer,
}

impl NucleusSink {
    pub fn new(name: &str, site: &str, config: IotCoreConfig, nucleus: Arc<Nucleus>) -> Self {
        NucleusSink {
            name: name.into(),
            site: site.into(),
            pacer: Pacer::new(config.max_publish_rate),
            config,
            nucleus,
        }
    }
}

fn sink_error(e: IpcError) -> SinkError {
    match &e {
        IpcError::Service { kind, .. } if kind == "UnauthorizedError" => SinkError::AccessDenied(
            format!("{e} (the recipe's accessControl must allow aws.greengrass#PublishToIoTCore on this topic)"),
        ),
        IpcError::Service { kind, .. } if kind == "InvalidArgumentsError" => {
            SinkError::BadRequest(e.to_string())
        }
        _ if e.retryable() => SinkError::Network(e.to_string()),
        _ => SinkError::Server(e.to_string()),
    }
}

#[async_trait]
impl Sink for NucleusSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError> {
        let (outbound, rejected) = outbound(&self.config, &self.site, batch);
        let mut queue = outbound.into_iter();
        let mut window: VecDeque<(Vec<usize>, Pending)> = VecDeque::new();
        let mut acked = BTreeSet::new();
        let mut failure = None;
        let limit = usize::from(self.config.max_inflight);
        'batch: loop {
            while window.len() < limit {
                let Some(next) = queue.next() else { break };
                self.pacer.wait().await;
                let publish = IotCorePublish {
                    topic: &next.topic,
                    payload: &next.payload,
                    content_type: next.properties.content_type.as_deref(),
                    user_properties: &next.properties.user_properties,
                };
                match self.nucleus.publish_to_iot_core(&publish).await {
                    Ok(pending) => window.push_back((next.indexes, pending)),
                    Err(e) => {
                        failure = Some(sink_error(e));
                        break 'batch;
                    }
                }
            }
            // Answers arrive in any order but are taken in publish order, so `done` stays a prefix.
            let Some((indexes, pending)) = window.pop_front() else {
                break;
            };
            match pending.response().await {
                Ok(_) => {
                    acked.extend(indexes);
                }
                Err(e) => {
                    failure = Some(sink_error(e));
                    break;
                }
            }
        }
        settle(&self.name, batch.len(), &acked, rejected, failure)
    }
}
