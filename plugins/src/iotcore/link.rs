//! The cloud link: a second, long-lived MQTT 5 connection of an `iotcore` sink that brings
//! cloud messages down (downlinks, the cloud's answers to jobs and shadow requests) and takes
//! local devices' jobs and shadow requests up.
//!
//! It is not the sink's own connection, which starts clean on every reconnect and is driven by
//! the spool drain only while a batch is in flight. This one keeps a persistent session (Clean
//! Start 0 with `session_expiry`), so IoT Core holds QoS 1 messages for the gateway while it is
//! away, and it is polled all the time. Its client id is the sink's with
//! [`LINK_CLIENT_SUFFIX`].
//!
//! With `via = "nucleus"` the link is Greengrass IPC instead: a `SubscribeToIoTCore` stream
//! per filter (opened again when it ends) and `PublishToIoTCore` for requests going up, on the
//! nucleus's own IoT Core connection. The nucleus acknowledges a message to IoT Core itself
//! when it takes it, so such messages come without an [`AckToken`].
//!
//! QoS 1 end to end: a message comes down with an [`AckToken`]; the gateway hands it on and
//! then calls [`CloudLink::ack`]. Until then IoT Core has no PUBACK, and after a lost
//! connection it sends the message again. Acknowledgements are sent in the order the messages
//! came (MQTT-4.6.0-2), since the gateway takes them in order, batch after batch; one for a
//! connection that has since been replaced is dropped, as the broker sends that message again
//! on the new one.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::{mpsc, watch};

/// A cloud message's MQTT 5 properties.
pub use rumqttc::v5::mqttbytes::v5::PublishProperties as CloudProperties;

use super::config::{IotCoreConfig, Via, MAX_PAYLOAD_BYTES};
use crate::backoff::Backoff;
use crate::nucleus::{iot_core_message, IotCorePublish, Nucleus};
use crate::sink::SinkError;

/// Appended to the sink's client id for its cloud link.
pub const LINK_CLIENT_SUFFIX: &str = "-link";
/// How long IoT Core keeps the link's session (and its QoS 1 messages) while the gateway is
/// away: IoT Core's own longest persistent session is 7 days; one hour is its default.
pub const DEFAULT_SESSION_EXPIRY_SECS: u32 = 3600;
/// Messages coming down that the gateway has not taken yet. The link stops reading (and so
/// stops acknowledging) beyond this, and IoT Core holds the rest.
const DOWN_QUEUE: usize = 256;
/// Requests waiting to go up.
const UP_QUEUE: usize = 256;
/// Filters in one SUBSCRIBE (IoT Core takes at most 8).
const FILTERS_PER_SUBSCRIBE: usize = 8;
/// Reconnect delays.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A message from the cloud.
#[derive(Debug)]
pub struct Downlinked {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// Given back to [`CloudLink::ack`] once the message is handed on.
    pub ack: Option<AckToken>,
}

/// What the gateway returns to acknowledge a QoS 1 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    connection: u64,
    pkid: u16,
}

/// A publish going up.
#[derive(Debug, Clone)]
pub struct Upward {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 user properties: the device's identity.
    pub user_properties: Vec<(String, String)>,
}

/// Why a request cannot go up now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpError {
    #[error("the cloud link is not connected")]
    Down,
    #[error("the cloud link's queue is full")]
    Full,
    #[error("{0}")]
    Invalid(String),
}

impl UpError {
    /// Whether sending again later can help.
    pub fn retryable(&self) -> bool {
        !matches!(self, UpError::Invalid(_))
    }
}

enum Command {
    Subscribe(String),
    Ack(AckToken),
    Publish(Upward),
}

/// What the link reports of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    /// Connections made (or, through the nucleus, times every stream was open) since start.
    pub connections: u64,
    pub last_error: Option<String>,
    /// Filters subscribed on every connection (the downlinks' and the relayed ones).
    pub filters: Vec<String>,
    /// Of those, the ones IoT Core acknowledged on the current connection.
    pub subscribed: Vec<String>,
    /// Filters IoT Core refused.
    pub refused: Vec<String>,
}

/// The link's status, shared by its handle and its task: what `status` shows, and the filters
/// wanted (its `filters`), which the handle adds to and the task subscribes.
#[derive(Default)]
struct Shared {
    status: Mutex<LinkStatus>,
    /// A filter was added while the command queue was full: the task takes it from `status`.
    dropped: AtomicBool,
}

impl Shared {
    fn set<T>(&self, change: impl FnOnce(&mut LinkStatus) -> T) -> T {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn get<T>(&self, read: impl FnOnce(&LinkStatus) -> T) -> T {
        read(&self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Wanted filters not in `have`.
    fn missing(&self, have: &BTreeSet<String>) -> Vec<String> {
        self.get(|s| {
            s.filters
                .iter()
                .filter(|f| !have.contains(*f))
                .cloned()
                .collect()
        })
    }

    /// Wanted filters not in `have`, if one was dropped from the queue since the last call
    /// (otherwise every one came as a command): a flag read per command, not a walk.
    fn dropped(&self, have: &BTreeSet<String>) -> Vec<String> {
        match self.dropped.swap(false, Ordering::AcqRel) {
            true => self.missing(have),
            false => Vec::new(),
        }
    }
}

/// The handle on a running cloud link; cheap to clone.
#[derive(Clone)]
pub struct CloudLink {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// The link's settings, from its sink and its users.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The sink whose endpoint and certificate it uses.
    pub sink: String,
    pub config: IotCoreConfig,
    /// The sink's client id (the site's name unless the sink names one).
    pub site: String,
    pub session_expiry_secs: u32,
    /// Filters subscribed on every connection.
    pub filters: Vec<String>,
    /// The Greengrass nucleus, for a sink with `via = "nucleus"`.
    pub nucleus: Option<Arc<Nucleus>>,
}

impl CloudLink {
    /// Reads the certificate files and starts the link's task, which runs until `stop`; what
    /// it tells comes on the receiver.
    pub fn start(
        settings: LinkSettings,
        stop: watch::Receiver<bool>,
    ) -> Result<(CloudLink, mpsc::Receiver<Downlinked>), SinkError> {
        let (events, events_rx) = mpsc::channel(DOWN_QUEUE);
        let (commands, rx) = mpsc::channel(UP_QUEUE);
        let shared = Arc::new(Shared::default());
        shared.set(|s| s.filters = settings.filters.clone());
        if settings.config.via == Via::Nucleus {
            let nucleus = settings.nucleus.clone().ok_or_else(|| {
                SinkError::Config("via = \"nucleus\" needs the nucleus's IPC connection".into())
            })?;
            let task = NucleusTask {
                filters: BTreeSet::new(),
                settings,
                nucleus,
                events,
                commands: rx,
                shared: Arc::clone(&shared),
            };
            tokio::spawn(task.run(stop));
            return Ok((CloudLink { commands, shared }, events_rx));
        }
        let tls = Arc::new(super::client_tls(&settings.config)?);
        let task = Task {
            filters: settings.filters.iter().cloned().collect(),
            settings,
            tls,
            events,
            commands: rx,
            shared: Arc::clone(&shared),
            connection: 0,
        };
        tokio::spawn(task.run(stop));
        Ok((CloudLink { commands, shared }, events_rx))
    }

    /// Adds `filter` to what the link subscribes, now and after every reconnect. Queued
    /// behind the requests already given, so a request made after it is answered on it.
    pub fn subscribe(&self, filter: &str) {
        let new = self.shared.set(|s| {
            let new = !s.filters.iter().any(|f| f == filter);
            if new {
                s.filters.push(filter.to_owned());
            }
            new
        });
        if !new {
            return;
        }
        // With the queue full it is still wanted: subscribed with the next command the link
        // takes, or at its next connection.
        if self
            .commands
            .try_send(Command::Subscribe(filter.to_owned()))
            .is_err()
        {
            self.shared.dropped.store(true, Ordering::Release);
        }
    }

    /// Acknowledges a message to IoT Core.
    pub async fn ack(&self, token: AckToken) {
        let _ = self.commands.send(Command::Ack(token)).await;
    }

    /// Queues a QoS 1 publish up; refused at once while the link is down or its queue full.
    pub fn publish(&self, up: Upward) -> Result<(), UpError> {
        if up.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(UpError::Invalid(format!(
                "payload is {} bytes; IoT Core allows {MAX_PAYLOAD_BYTES}",
                up.payload.len()
            )));
        }
        if !self.shared.get(|s| s.connected) {
            return Err(UpError::Down);
        }
        self.commands
            .try_send(Command::Publish(up))
            .map_err(|_| UpError::Full)
    }

    /// The link's state now.
    pub fn status(&self) -> LinkStatus {
        self.shared.get(LinkStatus::clone)
    }
}

struct Task {
    settings: LinkSettings,
    tls: Arc<rustls::ClientConfig>,
    events: mpsc::Sender<Downlinked>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    /// Filters subscribed on the current connection (asked, at least).
    filters: BTreeSet<String>,
    /// Counts connections, so an acknowledgement meant for an earlier one is dropped.
    connection: u64,
}

impl Task {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        while !*stop.borrow() {
            let error = match self.connect().await {
                Ok((client, events)) => {
                    backoff.reset();
                    self.shared.set(|s| {
                        s.connected = true;
                        s.connections += 1;
                        s.subscribed.clear();
                    });
                    let error = self.serve(&client, events, &mut stop).await;
                    self.shared.set(|s| s.connected = false);
                    let _ = client.try_disconnect();
                    error
                }
                Err(e) => e,
            };
            let Some(error) = error else { break };
            tracing::warn!(sink = %self.settings.sink, %error, "cloud link down");
            self.shared.set(|s| s.last_error = Some(error));
            tokio::select! {
                _ = tokio::time::sleep(backoff.step()) => {}
                _ = stop.changed() => {}
            }
        }
    }

    fn client_id(&self) -> String {
        let base = self
            .settings
            .config
            .client_id
            .clone()
            .unwrap_or_else(|| self.settings.site.clone());
        format!("{base}{LINK_CLIENT_SUFFIX}")
    }

    /// A new connection: CONNECT with the persistent session, then every filter subscribed.
    async fn connect(&mut self) -> Result<(AsyncClient, EventLoop), Option<String>> {
        let missing = self.shared.missing(&self.filters);
        self.filters.extend(missing);
        let config = &self.settings.config;
        let (host, port) = config.host_port().map_err(Some)?;
        let mut options = MqttOptions::new(self.client_id(), host, port);
        options.set_keep_alive(Duration::from_secs(config.keep_alive_secs));
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(self.settings.session_expiry_secs));
        options.set_manual_acks(true);
        options.set_max_packet_size(Some(
            u32::try_from(MAX_PAYLOAD_BYTES).unwrap_or(u32::MAX) + 1024,
        ));
        options.set_outgoing_inflight_upper_limit(config.max_inflight);
        options.set_connection_timeout(config.ack_timeout.0.as_secs().max(1));
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::clone(&self.tls)),
        ));
        let (client, mut events) = AsyncClient::new(options, UP_QUEUE + 16);
        self.connection += 1;
        let deadline = tokio::time::Instant::now() + config.ack_timeout.0;
        let session_present = loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
                    if ack.code != ConnectReturnCode::Success {
                        return Err(Some(format!("CONNACK {:?}", ack.code)));
                    }
                    break ack.session_present;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Some(super::classify(&e).to_string())),
                Err(_) => return Err(Some("no CONNACK in time".into())),
            }
        };
        // Subscribed again on every connection: a session IoT Core kept has them already, one
        // it lost (expired, or a broker restarted without persistence) has not.
        let filters: Vec<Filter> = self
            .filters
            .iter()
            .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        for chunk in filters.chunks(FILTERS_PER_SUBSCRIBE) {
            client
                .try_subscribe_many(chunk.to_vec())
                .map_err(|e| Some(e.to_string()))?;
        }
        tracing::info!(sink = %self.settings.sink, client_id = %self.client_id(), session_present, filters = self.filters.len(), "cloud link up");
        Ok((client, events))
    }

    /// Polls the connection and takes commands until the connection ends (`Some(why)`) or the
    /// link is stopped (`None`).
    async fn serve(
        &mut self,
        client: &AsyncClient,
        mut events: EventLoop,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<String> {
        // Filters in SUBSCRIBEs not yet answered, in order, to name a refused one.
        let mut asked: std::collections::VecDeque<Vec<String>> = self
            .filters
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .chunks(FILTERS_PER_SUBSCRIBE)
            .map(<[String]>::to_vec)
            .collect();
        loop {
            tokio::select! {
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        match self.message(&p) {
                            // Waiting here is the back-pressure: unread, IoT Core holds the rest.
                            Some(message) => if self.events.send(message).await.is_err() {
                                return None;
                            },
                            // Dropped, so acknowledged: IoT Core would send it again forever.
                            None => if let Err(e) = client.try_ack(&p) {
                                return Some(e.to_string());
                            },
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let filters = asked.pop_front().unwrap_or_default();
                        for (i, code) in ack.return_codes.iter().enumerate() {
                            let filter = filters.get(i).cloned().unwrap_or_default();
                            if matches!(code, SubscribeReasonCode::Success(_)) {
                                self.shared.set(|s| s.subscribed.push(filter));
                            } else {
                                tracing::warn!(sink = %self.settings.sink, filter = ?filter, ?code, "IoT Core refused a cloud link filter");
                                self.shared.set(|s| s.refused.push(filter));
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        return Some(format!("DISCONNECT {:?}", d.reason_code));
                    }
                    Ok(_) => {}
                    Err(e) => return Some(super::classify(&e).to_string()),
                },
                command = self.commands.recv() => {
                    // Filters wanted while the queue was full come first.
                    for filter in self.shared.dropped(&self.filters) {
                        self.filters.insert(filter.clone());
                        asked.push_back(vec![filter.clone()]);
                        if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                            return Some(e.to_string());
                        }
                    }
                    match command {
                    None => return None,
                    Some(Command::Ack(token)) => {
                        if token.connection == self.connection {
                            let mut p = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
                            p.pkid = token.pkid;
                            if let Err(e) = client.try_ack(&p) {
                                return Some(e.to_string());
                            }
                        }
                    }
                    Some(Command::Subscribe(filter)) => {
                        if self.filters.insert(filter.clone()) {
                            asked.push_back(vec![filter.clone()]);
                            if let Err(e) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                                return Some(e.to_string());
                            }
                        }
                    }
                    Some(Command::Publish(up)) => {
                        let properties = PublishProperties {
                            user_properties: up.user_properties,
                            ..PublishProperties::default()
                        };
                        if let Err(e) = client.try_publish_with_properties(up.topic, QoS::AtLeastOnce, false, up.payload, properties) {
                            return Some(e.to_string());
                        }
                    }
                    }
                },
                _ = stop.changed() => return None,
            }
        }
    }

    fn message(&self, p: &Publish) -> Option<Downlinked> {
        let topic = match String::from_utf8(p.topic.to_vec()) {
            Ok(t) => t,
            Err(_) => {
                tracing::warn!(sink = %self.settings.sink, "cloud message with a topic that is not UTF-8, dropped");
                return None;
            }
        };
        let (qos, ack) = match p.qos {
            QoS::AtMostOnce => (0, None),
            _ => (
                1,
                Some(AckToken {
                    connection: self.connection,
                    pkid: p.pkid,
                }),
            ),
        };
        Some(Downlinked {
            topic,
            payload: p.payload.clone(),
            qos,
            retain: p.retain,
            properties: p.properties.clone(),
            ack,
        })
    }
}

/// The link over Greengrass IPC.
struct NucleusTask {
    settings: LinkSettings,
    nucleus: Arc<Nucleus>,
    events: mpsc::Sender<Downlinked>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    /// Filters with a stream open or being opened.
    filters: BTreeSet<String>,
}

impl NucleusTask {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // A stream that ends (or could not be opened) names its filter here.
        let (ended_tx, mut ended) = mpsc::unbounded_channel::<String>();
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        for filter in self.settings.filters.clone() {
            self.open(filter, &ended_tx).await;
        }
        if self.all_open() {
            self.shared.set(|s| {
                s.connected = true;
                s.connections += 1;
            });
        }
        loop {
            tokio::select! {
                filter = ended.recv() => {
                    let Some(filter) = filter else { return };
                    self.shared.set(|s| {
                        s.connected = false;
                        s.subscribed.retain(|f| f != &filter);
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.step()) => {}
                        _ = stop.changed() => return,
                    }
                    self.open(filter, &ended_tx).await;
                    if self.all_open() {
                        backoff.reset();
                        self.shared.set(|s| {
                            s.connected = true;
                            s.connections += 1;
                        });
                    }
                }
                command = self.commands.recv() => {
                    // Filters wanted while the queue was full come first.
                    for filter in self.shared.dropped(&self.filters) {
                        self.open(filter, &ended_tx).await;
                    }
                    match command {
                    None => return,
                    // The nucleus acknowledged it to IoT Core already.
                    Some(Command::Ack(_)) => {}
                    Some(Command::Subscribe(filter)) => {
                        if !self.filters.contains(&filter) {
                            self.open(filter, &ended_tx).await;
                        }
                    }
                    Some(Command::Publish(up)) => {
                        let publish = IotCorePublish {
                            topic: &up.topic,
                            payload: &up.payload,
                            content_type: None,
                            user_properties: &up.user_properties,
                        };
                        match self.nucleus.publish_to_iot_core(&publish).await {
                            Ok(pending) => {
                                let sink = self.settings.sink.clone();
                                tokio::spawn(async move {
                                    if let Err(e) = pending.response().await {
                                        tracing::warn!(%sink, error = %e, "a relayed request was not published through the nucleus");
                                    }
                                });
                            }
                            Err(e) => tracing::warn!(sink = %self.settings.sink, error = %e, "a relayed request was not published through the nucleus"),
                        }
                    }
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }

    fn all_open(&self) -> bool {
        self.shared
            .get(|s| s.subscribed.len() == self.filters.len())
    }

    /// Opens `filter`'s stream and forwards its messages until it ends, then names it on
    /// `ended`.
    async fn open(&mut self, filter: String, ended: &mpsc::UnboundedSender<String>) {
        self.filters.insert(filter.clone());
        let mut subscription = match self.nucleus.subscribe_to_iot_core(&filter).await {
            Ok(s) => s,
            Err(e) => {
                let error = format!("SubscribeToIoTCore {filter:?}: {e}");
                tracing::warn!(sink = %self.settings.sink, %error, "cloud link filter not open");
                self.shared.set(|s| s.last_error = Some(error));
                let _ = ended.send(filter);
                return;
            }
        };
        self.shared.set(|s| s.subscribed.push(filter.clone()));
        let (events, ended, sink) = (
            self.events.clone(),
            ended.clone(),
            self.settings.sink.clone(),
        );
        tokio::spawn(async move {
            while let Some(event) = subscription.next().await {
                let Ok(event) = event else { break };
                let Some(m) = iot_core_message(&event) else {
                    tracing::warn!(%sink, "an IoTCoreMessage without a topic or with bad base64, dropped");
                    continue;
                };
                let properties = CloudProperties {
                    content_type: m.content_type,
                    user_properties: m.user_properties,
                    ..CloudProperties::default()
                };
                let message = Downlinked {
                    topic: m.topic,
                    payload: Bytes::from(m.payload),
                    qos: 1,
                    retain: false,
                    properties: Some(properties),
                    ack: None,
                };
                if events.send(message).await.is_err() {
                    return;
                }
            }
            let _ = ended.send(filter);
        });
    }
}
