//! The IoT Core sink: the gateway's own MQTT 5 connection over mutual TLS, QoS 1 publishes,
//! and a record acknowledged to the spool only after its PUBACK. Each publish names the device
//! in MQTT 5 user properties (`thing-name`, `cert-id`, `source-topic`, `record-id`) and in the
//! JSON body.
//!
//! The connection is driven inside `send` (rumqttc's event loop is polled while a batch is in
//! flight), so PUBACKs map to records without a second task. A connection idle for half its
//! keepalive, or broken, is replaced at the next send; the drain's backoff paces reconnects.
//!
//! With `via = "nucleus"` ([`NucleusSink`], in `nucleus.rs`) the same publishes go through
//! Greengrass IPC (`PublishToIoTCore`) on the nucleus's own IoT Core connection.

mod config;
mod link;
mod nucleus;
#[cfg(test)]
mod tests;

pub use config::*;
pub use link::{
    AckToken, CloudLink, CloudProperties, Downlinked, LinkSettings, LinkStatus, UpError, Upward,
    DEFAULT_SESSION_EXPIRY_SECS, LINK_CLIENT_SUFFIX,
};
pub use nucleus::NucleusSink;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;

use crate::record::Record;
use crate::sink::{Ack, Rejected, Sink, SinkError};

struct Connection {
    client: AsyncClient,
    events: EventLoop,
    last_used: Instant,
}

/// Publishes records to IoT Core (or any MQTT 5 broker with mutual TLS).
pub struct IotCoreSink {
    name: String,
    site: String,
    config: IotCoreConfig,
    tls: Arc<rustls::ClientConfig>,
    connection: Option<Connection>,
    pacer: Pacer,
}

/// `max_publish_rate`: when the next publish may go out.
struct Pacer {
    next_slot: Instant,
    interval: Duration,
}

impl Pacer {
    fn new(per_second: u32) -> Pacer {
        Pacer {
            next_slot: Instant::now(),
            interval: Duration::from_secs(1) / per_second.max(1),
        }
    }

    /// Takes the next slot if it is due; otherwise says when it will be.
    fn take(&mut self) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        if self.next_slot > now {
            return Some(tokio::time::Instant::from_std(self.next_slot));
        }
        // No credit for idle time beyond one interval: a burst never exceeds the rate.
        self.next_slot = self
            .next_slot
            .max(now.checked_sub(self.interval).unwrap_or(now))
            + self.interval;
        None
    }

    /// Waits for and takes the next slot.
    async fn wait(&mut self) {
        while let Some(at) = self.take() {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// One publish ready to go.
struct Outbound {
    /// The batch indexes of the records it carries, in order.
    indexes: Vec<usize>,
    topic: String,
    payload: Bytes,
    properties: PublishProperties,
}

/// One batch on its way: the publishes not sent yet, those sent and waiting for their packet
/// id, those waiting for their PUBACK, and the batch indexes acknowledged.
struct Flight {
    queue: VecDeque<Outbound>,
    /// Batch indexes of the publishes handed to the client, in order, until the client says
    /// which packet id each got.
    published: VecDeque<Vec<usize>>,
    by_pkid: std::collections::HashMap<u16, Vec<usize>>,
    acked: std::collections::BTreeSet<usize>,
    total: usize,
}

impl Flight {
    fn new(outbound: Vec<Outbound>) -> Flight {
        Flight {
            total: outbound.iter().map(|o| o.indexes.len()).sum(),
            queue: outbound.into(),
            published: VecDeque::new(),
            by_pkid: std::collections::HashMap::new(),
            acked: std::collections::BTreeSet::new(),
        }
    }

    fn in_flight(&self) -> usize {
        self.published.len() + self.by_pkid.len()
    }

    /// Hands the next publish to `client` (taken from the queue either way).
    fn publish_next(&mut self, client: Option<&AsyncClient>) -> Result<(), SinkError> {
        if let (Some(next), Some(client)) = (self.queue.pop_front(), client) {
            client
                .try_publish_with_properties(
                    next.topic,
                    QoS::AtLeastOnce,
                    false,
                    next.payload,
                    next.properties,
                )
                .map_err(|e| SinkError::Network(e.to_string()))?;
            self.published.push_back(next.indexes);
        }
        Ok(())
    }

    /// An event of the connection: a packet id given, or a PUBACK (a refusal fails the batch).
    fn on_event(&mut self, event: Event) -> Result<(), SinkError> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(indexes) = self.published.pop_front() {
                    self.by_pkid.insert(pkid, indexes);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(indexes) = self.by_pkid.remove(&ack.pkid) else {
                    return Ok(());
                };
                match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                        self.acked.extend(indexes);
                    }
                    PubAckReason::NotAuthorized => {
                        return Err(SinkError::AccessDenied(format!(
                            "PUBACK {:?}: the policy does not allow this topic",
                            ack.reason
                        )))
                    }
                    PubAckReason::QuotaExceeded => {
                        return Err(SinkError::Throttled(format!("PUBACK {:?}", ack.reason)))
                    }
                    reason => return Err(SinkError::Server(format!("PUBACK {reason:?}"))),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl IotCoreSink {
    /// Publishes `flight` within the rate and in-flight limits until every PUBACK is back, or
    /// the first failure (a refusal, the connection lost, `ack_timeout` passed).
    async fn exchange(&mut self, flight: &mut Flight) -> Result<(), SinkError> {
        let deadline = tokio::time::Instant::now() + self.config.ack_timeout.0;
        let mut wake: Option<tokio::time::Instant> = None;
        while flight.acked.len() < flight.total {
            if wake.is_none()
                && !flight.queue.is_empty()
                && flight.in_flight() < usize::from(self.config.max_inflight)
            {
                match self.pacer.take() {
                    None => {
                        flight.publish_next(self.connection.as_ref().map(|c| &c.client))?;
                        continue;
                    }
                    Some(at) => wake = Some(at),
                }
            }
            let Some(conn) = self.connection.as_mut() else {
                return Ok(());
            };
            let rate_wait = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = conn.events.poll() => match event {
                    Ok(event) => flight.on_event(event)?,
                    Err(e) => {
                        self.connection = None;
                        return Err(classify(&e));
                    }
                },
                _ = rate_wait => wake = None,
                _ = tokio::time::sleep_until(deadline) => {
                    // Unanswered publishes would be retransmitted later under new ids; start clean.
                    self.connection = None;
                    return Err(SinkError::Network(format!("PUBACKs missing after {:?}", self.config.ack_timeout.0)));
                }
            }
        }
        Ok(())
    }

    /// Reads the certificate files; does not connect yet.
    pub fn new(name: &str, site: &str, config: IotCoreConfig) -> Result<Self, SinkError> {
        let tls = client_tls(&config)?;
        Ok(IotCoreSink {
            name: name.into(),
            site: site.into(),
            tls: Arc::new(tls),
            connection: None,
            pacer: Pacer::new(config.max_publish_rate),
            config,
        })
    }

    fn outbound(&self, batch: &[Record]) -> (Vec<Outbound>, Vec<Rejected>) {
        outbound(&self.config, &self.site, batch)
    }

    /// A live connection: reuses the current one unless it idled past half its keepalive.
    async fn connect(&mut self) -> Result<(), SinkError> {
        let keep_alive = Duration::from_secs(self.config.keep_alive_secs);
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.last_used.elapsed() < keep_alive / 2)
        {
            return Ok(());
        }
        self.connection = None;
        let (host, port) = self.config.host_port().map_err(SinkError::Config)?;
        let client_id = self
            .config
            .client_id
            .clone()
            .unwrap_or_else(|| self.site.clone());
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(keep_alive);
        options.set_clean_start(true);
        options.set_outgoing_inflight_upper_limit(self.config.max_inflight);
        options.set_connection_timeout(self.config.ack_timeout.0.as_secs().max(1));
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(self.tls.clone()),
        ));
        let (client, mut events) =
            AsyncClient::new(options, usize::from(self.config.max_inflight) + 16);
        let deadline = tokio::time::Instant::now() + self.config.ack_timeout.0;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
                    if ack.code != ConnectReturnCode::Success {
                        return Err(SinkError::AccessDenied(format!("CONNACK {:?}", ack.code)));
                    }
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(classify(&e)),
                Err(_) => {
                    return Err(SinkError::Network(format!(
                        "no CONNACK from {} in {:?}",
                        self.config.endpoint.as_deref().unwrap_or_default(),
                        self.config.ack_timeout.0
                    )))
                }
            }
        }
        tracing::info!(sink = %self.name, endpoint = %self.config.endpoint.as_deref().unwrap_or_default(), "connected");
        self.connection = Some(Connection {
            client,
            events,
            last_used: Instant::now(),
        });
        Ok(())
    }
}

/// The mutual-TLS client settings from the sink's certificate files.
fn client_tls(config: &IotCoreConfig) -> Result<rustls::ClientConfig, SinkError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| SinkError::Config(format!("{}: {e}", p.display())))
    };
    let path = |p: &Option<std::path::PathBuf>, key: &str| {
        p.clone()
            .ok_or_else(|| SinkError::Config(format!("`{key}` must name a PEM file")))
    };
    crate::tls::mtls_client_config(
        &read(&path(&config.ca, "ca")?)?,
        &read(&path(&config.cert, "cert")?)?,
        &read(&path(&config.key, "key")?)?,
    )
    .map_err(SinkError::Config)
}

/// Topic, body and user properties for each record; records IoT Core would refuse are rejected.
fn outbound(
    config: &IotCoreConfig,
    site: &str,
    batch: &[Record],
) -> (Vec<Outbound>, Vec<Rejected>) {
    let mut out = Vec::with_capacity(batch.len());
    let mut rejected = Vec::new();
    let mut grouped = Groups::default();
    for (index, record) in batch.iter().enumerate() {
        let topic = config.topic.render(record, site);

        let reason = if topic.is_empty() || topic.contains(['+', '#']) {
            Some(format!("topic {topic:?} is not a valid MQTT topic"))
        } else if topic.len() > MAX_TOPIC_BYTES {
            Some(format!(
                "topic is {} bytes; IoT Core allows {MAX_TOPIC_BYTES}",
                topic.len()
            ))
        } else if topic.matches('/').count() > MAX_TOPIC_SLASHES {
            Some(format!(
                "topic {topic:?} has more than {MAX_TOPIC_SLASHES} slashes, IoT Core's limit"
            ))
        } else {
            None
        };
        let payload = record.envelope_bytes(site);
        let reason = reason.or_else(|| {
            (payload.len() > MAX_PAYLOAD_BYTES).then(|| {
                format!(
                    "payload is {} bytes; IoT Core allows {MAX_PAYLOAD_BYTES}",
                    payload.len()
                )
            })
        });
        if let Some(reason) = reason {
            rejected.push(Rejected { index, reason });
            continue;
        }
        if config.batch_records <= 1 {
            let properties = PublishProperties {
                content_type: Some("application/json".into()),
                user_properties: vec![
                    ("thing-name".into(), record.thing_name.clone()),
                    ("cert-id".into(), record.cert_id.clone()),
                    ("source-topic".into(), record.topic.clone()),
                    ("record-id".into(), record.id.to_string()),
                ],
                ..PublishProperties::default()
            };
            out.push(Outbound {
                indexes: vec![index],
                topic,
                payload: payload.into(),
                properties,
            });
            continue;
        }
        grouped.add(
            topic,
            index,
            record.id,
            payload,
            usize::from(config.batch_records),
        );
    }
    out.extend(grouped.finish());
    out.sort_by_key(|o| o.indexes.first().copied().unwrap_or(usize::MAX));
    (out, rejected)
}

/// Records bound for the same topic, gathered into JSON arrays of envelopes.
#[derive(Default)]
struct Groups {
    open: std::collections::HashMap<String, Group>,
    done: Vec<Outbound>,
}

struct Group {
    indexes: Vec<usize>,
    first_id: u64,
    last_id: u64,
    body: Vec<u8>,
}

impl Groups {
    fn add(&mut self, topic: String, index: usize, id: u64, envelope: Vec<u8>, max: usize) {
        let full = self.open.get(&topic).is_some_and(|g| {
            g.indexes.len() >= max || g.body.len() + 1 + envelope.len() + 1 > MAX_PAYLOAD_BYTES
        });
        if full {
            if let Some(g) = self.open.remove(&topic) {
                self.done.push(g.close(topic.clone()));
            }
        }
        let g = self.open.entry(topic).or_insert_with(|| Group {
            indexes: Vec::new(),
            first_id: id,
            last_id: id,
            body: vec![b'['],
        });
        if !g.indexes.is_empty() {
            g.body.push(b',');
        }
        g.body.extend_from_slice(&envelope);
        g.indexes.push(index);
        g.last_id = id;
    }

    fn finish(mut self) -> Vec<Outbound> {
        for (topic, g) in self.open.drain() {
            self.done.push(g.close(topic));
        }
        self.done
    }
}

impl Group {
    fn close(mut self, topic: String) -> Outbound {
        self.body.push(b']');
        Outbound {
            properties: PublishProperties {
                content_type: Some("application/json".into()),
                user_properties: vec![
                    ("record-count".into(), self.indexes.len().to_string()),
                    ("first-record-id".into(), self.first_id.to_string()),
                    ("last-record-id".into(), self.last_id.to_string()),
                ],
                ..PublishProperties::default()
            },
            indexes: self.indexes,
            topic,
            payload: self.body.into(),
        }
    }
}

/// The batch's [`Ack`]: done through the record before the first one neither acknowledged nor
/// rejected; an error only when nothing at all is done.
fn settle(
    sink: &str,
    len: usize,
    acked: &std::collections::BTreeSet<usize>,
    rejected: Vec<Rejected>,
    failure: Option<SinkError>,
) -> Result<Ack, SinkError> {
    let done = (0..len)
        .find(|i| !acked.contains(i) && !rejected.iter().any(|r| r.index == *i))
        .unwrap_or(len);
    let ack = Ack {
        done,
        rejected: rejected.into_iter().filter(|r| r.index < done).collect(),
    };
    match failure {
        Some(e) if done == 0 => Err(e),
        Some(e) => {
            tracing::warn!(sink, error = %e, done, "IoT Core batch partly sent");
            Ok(ack)
        }
        None => Ok(ack),
    }
}

fn classify(e: &rumqttc::v5::ConnectionError) -> SinkError {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => {
            SinkError::AccessDenied(format!("connection refused: {code:?}"))
        }
        E::Tls(t) => SinkError::Network(format!("TLS: {t}")),
        other => SinkError::Network(other.to_string()),
    }
}

#[async_trait]
impl Sink for IotCoreSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError> {
        let (outbound, rejected) = self.outbound(batch);
        if outbound.is_empty() {
            return Ok(Ack {
                done: batch.len(),
                rejected,
            });
        }
        self.connect().await?;
        let mut flight = Flight::new(outbound);
        let failure = self.exchange(&mut flight).await.err();
        if let Some(conn) = self.connection.as_mut() {
            conn.last_used = Instant::now();
        }
        if failure.is_some() {
            self.connection = None;
        }
        settle(&self.name, batch.len(), &flight.acked, rejected, failure)
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        if let Some(mut conn) = self.connection.take() {
            let _ = conn.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.events.poll()).await;
        }
        Ok(())
    }
}
