//! Local fan-out between devices through rumqttd's router, reached over local links.
//!
//! The gateway owns the device-facing sockets and sessions (rumqttd cannot see client
//! certificates or authorize topics), and uses the router only as the in-process fabric that
//! matches publishes to subscriptions, keeps persistent sessions, and tracks QoS 1 deliveries
//! to subscribers. rumqttd types stay inside this module, `codec` and `session`.
//!
//! What reaches the router, and what is checked first (rumqttd 0.20 trusts its input):
//! - Every topic and filter has passed `topic::check_topic` / `check_filter` in the session
//!   (or the republish path here), and is then written in the router's own form: `t/<topic>`,
//!   or `s/<topic>` for one starting with `$`. rumqttd's matcher slices the first byte of a
//!   topic (a multi-byte first character panicked its thread) and never matches a `$` topic at
//!   all; in router form the first byte is always ASCII, and a filter that starts with a
//!   wildcard lands under `t/`, so it cannot match a `$` topic (MQTT §4.7.2). Deliveries get
//!   their device form back by dropping the two bytes.
//! - PUBLISH properties lose topic alias and subscription identifiers (the session refuses
//!   both from devices; the router disconnects a link that sends them).
//! - Retained messages are counted here against the site's limits and kept only here: they
//!   enter the router as live publishes (marked, see [`entering_properties`]), and sessions
//!   send the matching ones after a SUBSCRIBE as its Retain Handling asks, which the router
//!   cannot. A rebuilt router has nothing to be given back.
//!
//! The router is a thread that can die (a panic) and whose caches (every filter ever
//! subscribed, every topic ever matched) are never freed. So the fabric runs it in
//! generations: a watchdog rebuilds it when its thread has ended or its caches have grown past
//! `[listener] router_cache_limit`; sessions see the new generation and link again with their
//! filters; the old router is then retired.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties, QoS};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::topic::{check_topic, TopicLimits};

use super::codec::publish_packet;
use super::marks::{entering_properties, mark, strip_marks, Marks, RETAIN_MARK};
use super::offline::OfflineQueues;

/// Bytes per commit-log segment in the router; small, since the router only relays.
const SEGMENT_BYTES: usize = 1 << 20;
/// Segments kept per subscription filter before the oldest is dropped.
const SEGMENT_COUNT: usize = 4;
/// How often the watchdog looks at the router.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Rebuilds to free cache memory are at least this far apart, so a fleet whose live topics
/// alone exceed the limit costs one rebuild per interval, not a storm of them; past four times
/// the limit the router is rebuilt whatever the interval, so a flood stays bounded.
const MIN_GC_INTERVAL: Duration = Duration::from_secs(5);
const HARD_CACHE_FACTOR: usize = 4;
/// Time sessions get to link to a new router before the old one is retired.
const RETIRE_GRACE: Duration = Duration::from_secs(2);

/// Router form prefixes (see the module docs).
const PLAIN: &[u8] = b"t/";
const DOLLAR: &[u8] = b"s/";

/// The router could not take a link or a packet. Retrying helps once the fabric is rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("local router refused the link: {0}")]
    Link(#[from] Box<LinkError>),
    #[error("local router link task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("local router link closed: {0}")]
    Closed(String),
}

/// A message from inside the gateway for [`Fabric::inject`].
#[derive(Debug, Clone)]
pub struct Injected {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub props: Option<PublishProperties>,
}

/// A retained message the site's limits do not leave room for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetainError {
    #[error("retained messages are at listener.max_retained_messages ({0})")]
    Messages(usize),
    #[error("retained messages would exceed listener.max_retained_bytes ({0})")]
    Bytes(u64),
}

/// The fabric's limits, from `[listener]`.
#[derive(Debug, Clone, Copy)]
pub struct FabricLimits {
    /// Links the router takes (devices plus the gateway's own).
    pub max_connections: usize,
    /// Unacknowledged QoS 1 deliveries per link.
    pub max_inflight: u16,
    /// Distinct topics and filters the router may have cached before it is rebuilt.
    pub cache_limit: usize,
    pub max_retained_messages: usize,
    pub max_retained_bytes: u64,
    /// Messages queued for one away persistent session, and for all of them.
    pub max_session_messages: usize,
    pub max_saved_messages: usize,
}

impl FabricLimits {
    /// The limits of `[listener]`, with `internal_links` more links than devices for the
    /// gateway's own.
    pub fn of(l: &super::ListenerConfig, internal_links: usize) -> FabricLimits {
        FabricLimits {
            max_connections: l.max_connections + internal_links,
            max_inflight: l.max_inflight,
            cache_limit: l.router_cache_limit,
            max_retained_messages: l.max_retained_messages,
            max_retained_bytes: l.max_retained_bytes.0,
            max_session_messages: l.max_session_messages,
            max_saved_messages: l.max_saved_messages,
        }
    }
}

type Connector =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync;

/// One router thread and what the fabric knows of it.
struct Generation {
    id: u64,
    connect: Box<Connector>,
    /// False once the router thread has ended (its channel has no receiver).
    alive: Box<dyn Fn() -> bool + Send + Sync>,
    /// The link that carries publishes of devices without a link of their own.
    shared: tokio::sync::Mutex<Option<LocalPublisher>>,
    /// A device has linked (it subscribed, or has a persistent session), so some publish may
    /// have a local subscriber.
    device_linked: AtomicBool,
    /// Hashes of the distinct filters and topics handed to this router: what its caches hold.
    cached: Mutex<HashSet<u64>>,
}

/// Generations whose router thread is being ended on purpose (see `Generation::retire`).
static RETIRING: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Keeps the deliberate fault of a retiring router out of the log and, above all, keeps the
/// panic hook from capturing a backtrace for it: with `RUST_BACKTRACE` set, the first capture
/// loads the binary's debug info, which stayed resident (85 MiB) for the life of the process.
/// Any other panic goes to the hook that was there before.
fn quiet_retired_routers() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let retiring = std::thread::current()
                .name()
                .and_then(|n| n.strip_prefix("router-"))
                .and_then(|id| id.parse::<u64>().ok())
                .is_some_and(|id| RETIRING.lock().map(|r| r.contains(&id)).unwrap_or(false));
            if !retiring {
                previous(info);
            }
        }));
    });
}

impl Generation {
    fn start(id: u64, config: RouterConfig) -> Generation {
        quiet_retired_routers();
        // The router's id names its thread (`router-<generation>`).
        let router_tx = Router::new(usize::try_from(id).unwrap_or(usize::MAX), config).spawn();
        let probe = router_tx.clone();
        Generation {
            id,
            connect: Box::new(move |client_id, clean| {
                LinkBuilder::new(client_id, router_tx.clone())
                    .clean_session(clean)
                    .build()
                    .map_err(Box::new)
            }),
            alive: Box::new(move || !probe.is_disconnected()),
            shared: tokio::sync::Mutex::new(None),
            device_linked: AtomicBool::new(false),
            cached: Mutex::new(HashSet::new()),
        }
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn link(
        self: &Arc<Self>,
        client_id: &str,
        clean: bool,
    ) -> Result<RouterLink, FabricError> {
        // The router answers over a blocking channel, so the wait happens off the async workers.
        let gen = Arc::clone(self);
        let client_id = client_id.to_owned();
        let (tx, rx, ack) =
            tokio::task::spawn_blocking(move || (gen.connect)(&client_id, clean)).await??;
        let session_present = matches!(
            Option::<Packet>::from(ack),
            Some(Packet::ConnAck(connack, _)) if connack.session_present
        );
        Ok(RouterLink {
            tx,
            rx,
            session_present,
            generation: self.id,
        })
    }

    /// Ends this router's thread so its memory is freed. rumqttd 0.20 has no shutdown and its
    /// thread holds its own sender, so the only way to end it is the fault its matcher has on a
    /// topic whose first character is wider than a byte (which the router form keeps devices
    /// from ever sending): a link subscribes to something, then publishes such a topic.
    async fn retire(self: &Arc<Self>) -> bool {
        if !(self.alive)() {
            return true;
        }
        *self.shared.lock().await = None;
        if let Ok(mut r) = RETIRING.lock() {
            r.push(self.id);
        }
        let ended = self.end_thread().await;
        if let Ok(mut r) = RETIRING.lock() {
            r.retain(|&id| id != self.id);
        }
        ended
    }

    async fn end_thread(self: &Arc<Self>) -> bool {
        if let Ok(mut link) = self.link("sitegate.retire", true).await {
            let _ = link.tx.subscribe("r");
            let _ = link.tx.publish("\u{e9}", "");
            for _ in 0..40 {
                if !(self.alive)() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        !(self.alive)()
    }
}

/// The in-process router all device sessions are linked to.
pub struct Fabric {
    router: RouterConfig,
    limits: FabricLimits,
    current: RwLock<Arc<Generation>>,
    generation: watch::Sender<u64>,
    retained: Mutex<Retained>,
    wake_watchdog: Notify,
    last_gc: Mutex<Instant>,
    stats: Arc<crate::metrics::Stats>,
    /// Some session has subscribed with No Local: publishes carry their publisher from then on.
    no_local: AtomicBool,
    /// Where publishes for persistent sessions whose device is away are queued.
    offline: OfflineQueues,
}

/// Retained messages by device topic, in router form, with their total size.
#[derive(Default)]
struct Retained {
    messages: HashMap<Bytes, (Publish, Option<PublishProperties>)>,
    bytes: u64,
}

fn retained_size(topic: &[u8], payload: &[u8]) -> u64 {
    (topic.len() + payload.len()) as u64
}

/// One session's two halves of its router link.
pub struct RouterLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
    /// The router kept state from an earlier persistent session of this client id.
    pub session_present: bool,
    /// The router generation this link belongs to.
    pub generation: u64,
}

/// Client id of the shared link; dots never occur in thing names.
const SHARED_LINK: &str = "sitegate.shared";

impl Fabric {
    /// Starts the first router generation.
    pub fn start(limits: FabricLimits, stats: Arc<crate::metrics::Stats>) -> Fabric {
        let router = RouterConfig {
            max_connections: limits.max_connections,
            max_outgoing_packet_count: u64::from(limits.max_inflight),
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let first = Arc::new(Generation::start(0, router.clone()));
        let offline = OfflineQueues::new(
            Arc::clone(&stats),
            limits.max_session_messages,
            limits.max_saved_messages,
        );
        Fabric {
            offline,
            router,
            limits,
            current: RwLock::new(first),
            generation: watch::Sender::new(0),
            retained: Mutex::new(Retained::default()),
            wake_watchdog: Notify::new(),
            last_gc: Mutex::new(Instant::now()),
            stats,
            no_local: AtomicBool::new(false),
        }
    }

    fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Changes whenever the router is rebuilt; a session with a link then links again.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The generation now running.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// The queues of persistent sessions whose device is away.
    pub fn offline(&self) -> &OfflineQueues {
        &self.offline
    }

    /// Queues what away sessions take of `packets`, durably, before the router sees them;
    /// true if any took one.
    async fn queue_offline(&self, packets: &[Packet]) -> bool {
        // Boxed: the capture's state is large and needed only while some session is away;
        // inline, every connection's task would carry it.
        if !self.offline.watching() {
            return false;
        }
        let taken = Box::pin(self.offline.capture(packets)).await;
        if taken {
            self.flush_offline().await;
        }
        taken
    }

    /// Makes what the away sessions took durable before its publishers are answered.
    async fn flush_offline(&self) {
        if let Err(e) = self.offline.flush().await {
            warn!(error = %e, "messages queued for away sessions may not be durable");
        }
    }

    /// Whether publishes must name their publisher (see [`entering_properties`]).
    pub fn no_local_used(&self) -> bool {
        self.no_local.load(Ordering::Relaxed)
    }

    /// A session granted a No Local subscription.
    pub fn use_no_local(&self) {
        self.no_local.store(true, Ordering::Relaxed);
    }

    /// Messages retained for later subscribers, and their bytes.
    pub fn retained(&self) -> (usize, u64) {
        let r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        (r.messages.len(), r.bytes)
    }

    /// Links `client_id` to the current router.
    pub async fn link(&self, client_id: &str, clean: bool) -> Result<RouterLink, FabricError> {
        let gen = self.current();
        // Dots never occur in thing names: the gateway's own links have them.
        if !client_id.contains('.') {
            gen.device_linked.store(true, Ordering::Release);
        }
        gen.link(client_id, clean).await
    }

    /// Ends what the current router keeps of `client_id`'s persistent session (subscriptions,
    /// its place in each commit log): rumqttd forgets a session when a clean link of the same
    /// client id disconnects. A session parked in an older generation is gone with it already.
    pub async fn forget(&self, client_id: &str, generation: u64) -> Result<(), FabricError> {
        if generation != self.generation() {
            return Ok(());
        }
        let mut link = self.link(client_id, true).await?;
        let bye = Packet::Disconnect(
            rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        self.send(&mut link, vec![bye]).await
    }

    /// Books a retained publish against the site's limits (an empty payload clears the topic),
    /// before it is handed over. Non-retained publishes pass.
    ///
    /// A kept message gets its own exact-size copy of topic and payload (here and in the
    /// router): as parsed they are slices of the device's read buffer, which a retained message
    /// would otherwise keep alive whole for as long as it is retained.
    pub fn retain(
        &self,
        publish: &mut Publish,
        props: &Option<PublishProperties>,
    ) -> Result<(), RetainError> {
        if !publish.retain {
            return Ok(());
        }
        let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        let old = r
            .messages
            .get(&publish.topic)
            .map(|(p, _)| retained_size(&p.topic, &p.payload));
        if publish.payload.is_empty() {
            if r.messages.remove(&publish.topic).is_some() {
                r.bytes -= old.unwrap_or(0);
            }
            return Ok(());
        }
        let size = retained_size(&publish.topic, &publish.payload);
        if old.is_none() && r.messages.len() >= self.limits.max_retained_messages {
            return Err(RetainError::Messages(self.limits.max_retained_messages));
        }
        let total = r.bytes - old.unwrap_or(0) + size;
        if total > self.limits.max_retained_bytes {
            return Err(RetainError::Bytes(self.limits.max_retained_bytes));
        }
        r.bytes = total;
        let mut own = BytesMut::with_capacity(publish.topic.len() + publish.payload.len());
        own.put_slice(&publish.topic);
        publish.topic = own.split().freeze();
        own.put_slice(&publish.payload);
        publish.payload = own.freeze();
        r.messages
            .insert(publish.topic.clone(), (publish.clone(), props.clone()));
        Ok(())
    }

    /// The retained messages whose topics `filter` matches (device form, with the gateway's
    /// marks), for a session to send after a SUBSCRIBE: the router never holds them, since
    /// it sends them only for a filter new to a link, where MQTT 5's Retain Handling asks
    /// for every SUBSCRIBE, for new filters only, or never.
    pub fn retained_for(&self, filter: &str) -> Vec<(Publish, Option<PublishProperties>)> {
        let r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        r.messages
            .iter()
            .filter(|(topic, _)| {
                std::str::from_utf8(topic).is_ok_and(|t| crate::topic::matches(t, filter))
            })
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Hands `packets` (device form) to the router on `link`. A link of an older generation
    /// fails with `Closed`: the session links again.
    pub async fn send(
        &self,
        link: &mut RouterLink,
        packets: Vec<Packet>,
    ) -> Result<(), FabricError> {
        let gen = self.current();
        if link.generation != gen.id {
            return Err(FabricError::Closed("the router was rebuilt".into()));
        }
        self.queue_offline(&packets).await;
        let mut packets = self.to_router_form(&gen, packets, true);
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        link.tx.buffer().extend(packets);
        link.tx
            .send(last)
            .await
            .map(|_| ())
            .map_err(|e| FabricError::Closed(e.to_string()))
    }

    /// Hands the PUBLISHes among `packets` to the router through the shared link. A device that
    /// only publishes needs no link of its own; each link costs the router two 200-slot packet
    /// queues (about 150 KB), which for a fleet of publish-only devices was most of the
    /// gateway's memory.
    ///
    /// Until some device has linked, nothing can be subscribed, so nothing goes to the router;
    /// a publish-only fleet costs it nothing.
    pub async fn forward(&self, packets: Vec<Packet>) -> Result<(), FabricError> {
        let gen = self.current();
        self.queue_offline(&packets).await;
        self.share(&gen, packets).await
    }

    /// Hands the PUBLISHes among `packets` to the router on the shared link.
    async fn share(
        &self,
        gen: &Arc<Generation>,
        mut packets: Vec<Packet>,
    ) -> Result<(), FabricError> {
        // Retained messages are kept here, not in the router: until a device links, nothing
        // in the router could take a publish.
        if !gen.device_linked.load(Ordering::Acquire) {
            return Ok(());
        }
        packets.retain(|p| matches!(p, Packet::Publish(..)));
        if packets.is_empty() {
            return Ok(());
        }
        let packets = self.to_router_form(gen, packets, true);
        let mut shared = gen.shared.lock().await;
        // A shared link the router dropped (whatever the cause) is replaced, not kept dead.
        if shared.as_ref().is_none_or(|p| !p.alive()) {
            if shared.is_some() {
                warn!("the router dropped the shared link; linking again");
            }
            *shared = Some(LocalPublisher::new(gen.link(SHARED_LINK, true).await?));
        }
        match shared.as_ref() {
            Some(publisher) => publisher.forward(packets).await,
            None => Ok(()),
        }
    }

    /// Messages from inside the gateway (republished records, cloud messages) entering the
    /// router in one hand-over: each topic held to the rules a device's is, a retained one to
    /// the site's limits. Per message: refused (why), or taken, and then whether an away
    /// session queued it (durably, before this returns). An error means the router took none
    /// of them and trying again can help.
    pub async fn inject(
        &self,
        messages: &[Injected],
        topics: TopicLimits,
    ) -> Result<Vec<Result<bool, String>>, FabricError> {
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut packets = Vec::with_capacity(messages.len());
        for m in messages {
            match self.prepare(m, topics) {
                Ok(packet) => {
                    outcomes.push(Ok(packets.len()));
                    packets.push(packet);
                }
                Err(why) => outcomes.push(Err(why)),
            }
        }
        let mut queued = Vec::with_capacity(packets.len());
        for packet in &packets {
            queued.push(self.offline.capture(std::slice::from_ref(packet)).await);
        }
        if queued.contains(&true) {
            self.flush_offline().await;
        }
        let gen = self.current();
        self.share(&gen, packets).await?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.map(|i| queued.get(i).copied().unwrap_or(false)))
            .collect())
    }

    fn prepare(&self, m: &Injected, topics: TopicLimits) -> Result<Packet, String> {
        check_topic(&m.topic, topics)
            .map_err(|e| format!("topic {:?}: {e}", crate::escape::Escaped(&m.topic)))?;
        let mut publish = publish_packet(&m.topic, &m.payload, m.qos, m.retain);
        let props = entering_properties(m.props.clone(), m.qos, None);
        self.retain(&mut publish, &props)
            .map_err(|e| e.to_string())?;
        Ok(Packet::Publish(publish, props))
    }

    /// Rewrites topics and filters into router form and notes what the router will cache.
    fn to_router_form(
        &self,
        gen: &Generation,
        packets: Vec<Packet>,
        count_topics: bool,
    ) -> Vec<Packet> {
        // One buffer holds the batch's router-form topics, not one allocation per message.
        let size: usize = packets
            .iter()
            .map(|p| match p {
                Packet::Publish(publish, _) => publish.topic.len() + PLAIN.len(),
                _ => 0,
            })
            .sum();
        let mut arena = BytesMut::with_capacity(size);
        let mut cached = gen.cached();
        let out: Vec<Packet> = packets
            .into_iter()
            .map(|packet| match packet {
                Packet::Publish(mut publish, props) => {
                    publish.topic = router_topic(&publish.topic, &mut arena);
                    if count_topics {
                        cached.insert(hash(&publish.topic[..]));
                    }
                    let mut props = props.map(strip_properties);
                    if std::mem::take(&mut publish.retain) {
                        mark(&mut props, RETAIN_MARK);
                    }
                    Packet::Publish(publish, props)
                }
                Packet::Subscribe(mut subscribe, _) => {
                    for f in &mut subscribe.filters {
                        f.path = router_filter(&f.path);
                        cached.insert(hash(f.path.as_bytes()));
                    }
                    Packet::Subscribe(subscribe, None)
                }
                Packet::Unsubscribe(mut unsubscribe, _) => {
                    for f in &mut unsubscribe.filters {
                        *f = router_filter(f);
                    }
                    Packet::Unsubscribe(unsubscribe, None)
                }
                other => other,
            })
            .collect();
        if cached.len() > self.limits.cache_limit {
            self.wake_watchdog.notify_one();
        }
        out
    }

    /// Watches the router until `stop`: rebuilds it when its thread has ended, or when its
    /// caches have outgrown the limit.
    pub async fn watchdog(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = self.wake_watchdog.notified() => {}
            }
            let gen = self.current();
            if !(gen.alive)() {
                error!(generation = gen.id, "the local router's thread has ended; rebuilding the fabric (sessions link again)");
                self.rebuild().await;
                continue;
            }
            let cached = gen.cached().len();
            let due = self
                .last_gc
                .lock()
                .map(|t| t.elapsed() >= MIN_GC_INTERVAL)
                .unwrap_or(true);
            let over = cached > self.limits.cache_limit;
            if over && (due || cached > HARD_CACHE_FACTOR * self.limits.cache_limit) {
                info!(generation = gen.id, cached, limit = self.limits.cache_limit, "the local router's caches passed listener.router_cache_limit; rebuilding it to free them");
                self.rebuild().await;
            }
        }
    }

    /// Starts a new router generation, tells the sessions, and retires the old one once they
    /// had time to move. (Retained messages are the fabric's, not the router's: nothing to
    /// hand over.)
    pub async fn rebuild(self: &Arc<Self>) {
        let old = self.current();
        let gen = Arc::new(Generation::start(old.id + 1, self.router.clone()));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&gen);
        if let Ok(mut t) = self.last_gc.lock() {
            *t = Instant::now();
        }
        self.stats.router_rebuilds.fetch_add(1, Ordering::Relaxed);
        self.generation.send_replace(gen.id);
        tokio::spawn(async move {
            tokio::time::sleep(RETIRE_GRACE).await;
            if !old.retire().await {
                warn!(
                    generation = old.id,
                    "the old router thread did not end; its memory stays in use"
                );
            }
        });
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// A device topic in router form, written into `arena`.
fn router_topic(topic: &[u8], arena: &mut BytesMut) -> Bytes {
    let prefix = if topic.first() == Some(&b'$') {
        DOLLAR
    } else {
        PLAIN
    };
    arena.put_slice(prefix);
    arena.put_slice(topic);
    arena.split().freeze()
}

/// A device filter in router form: one starting with `$` matches only `$` topics, and one
/// starting with a wildcard only the others (MQTT §4.7.2).
fn router_filter(filter: &str) -> String {
    let prefix = if filter.starts_with('$') { "s/" } else { "t/" };
    let mut out = String::with_capacity(filter.len() + 2);
    out.push_str(prefix);
    out.push_str(filter);
    out
}

/// The device form of a topic the router delivered.
pub(super) fn device_topic(publish: &mut Publish) {
    if publish.topic.len() >= 2 {
        publish.topic = publish.topic.slice(2..);
    }
}

/// The device form of a delivery: its topic, and its properties without the gateway's marks;
/// what the marks said, `me` being the receiving session's client id.
pub(super) fn device_form(
    publish: &mut Publish,
    props: &mut Option<PublishProperties>,
    me: &str,
) -> Marks {
    device_topic(publish);
    strip_marks(props, me)
}

/// What of a PUBLISH's properties the router may see: no alias, no subscription ids.
fn strip_properties(mut props: PublishProperties) -> PublishProperties {
    props.topic_alias = None;
    props.subscription_identifiers.clear();
    props
}

/// The gateway's own way into the router: one local link, publishing what it is handed.
struct LocalPublisher {
    tx: tokio::sync::Mutex<LinkTx>,
    alive: Arc<AtomicBool>,
    _drain: tokio::task::JoinHandle<()>,
}

impl LocalPublisher {
    /// Publishes through `link`; the router's answers on it (acks) are read and dropped, and a
    /// disconnection marks the publisher dead.
    fn new(link: RouterLink) -> Self {
        let RouterLink { tx, mut rx, .. } = link;
        let alive = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&alive);
        let drain = tokio::spawn(async move {
            loop {
                match rx.next().await {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(Notification::Disconnect(..))) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            flag.store(false, Ordering::Release);
        });
        LocalPublisher {
            tx: tokio::sync::Mutex::new(tx),
            alive,
            _drain: drain,
        }
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Sends `packets` (router form), in order, in one hand-over to the router.
    async fn forward(&self, mut packets: Vec<Packet>) -> Result<(), FabricError> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        let mut tx = self.tx.lock().await;
        tx.buffer().extend(packets);
        let sent = tx.send(last).await;
        if sent.is_err() {
            self.alive.store(false, Ordering::Release);
        }
        sent.map(|_| ())
            .map_err(|e| FabricError::Closed(e.to_string()))
    }
}

impl Drop for LocalPublisher {
    fn drop(&mut self) {
        self._drain.abort();
    }
}

/// The republish sink's way into the router: the fabric's shared link, with the same checks as
/// a device's publish.
pub struct Republisher {
    fabric: Arc<Fabric>,
    topics: TopicLimits,
}

impl Republisher {
    pub fn new(fabric: Arc<Fabric>, topics: TopicLimits) -> Self {
        Republisher { fabric, topics }
    }
}

#[async_trait::async_trait]
impl sitegate_plugins::republish::LocalBroker for Republisher {
    async fn publish(
        &self,
        topic: String,
        payload: bytes::Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<(), sitegate_plugins::republish::LocalPublishError> {
        use sitegate_plugins::republish::LocalPublishError;
        let qos = if qos >= 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let message = Injected {
            topic,
            payload,
            qos,
            retain,
            props: None,
        };
        match self.fabric.inject(&[message], self.topics).await {
            Ok(mut outcomes) => match outcomes.pop() {
                Some(Err(why)) => Err(LocalPublishError::Refused(why)),
                _ => Ok(()),
            },
            Err(e) => Err(LocalPublishError::Unavailable(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FabricLimits {
        FabricLimits {
            max_connections: 16,
            max_inflight: 10,
            cache_limit: 1000,
            max_retained_messages: 2,
            max_retained_bytes: 100,
            max_session_messages: 10,
            max_saved_messages: 100,
        }
    }

    #[test]
    fn router_form_keeps_dollar_topics_apart() {
        let mut arena = BytesMut::new();
        assert_eq!(
            &router_topic(b"\xc3\xa9/x", &mut arena)[..],
            "t/é/x".as_bytes()
        );
        assert_eq!(&router_topic(b"$aws/x", &mut arena)[..], b"s/$aws/x");
        assert_eq!(router_filter("#"), "t/#");
        assert_eq!(router_filter("$aws/#"), "s/$aws/#");
        // A wildcard filter in router form does not reach a $ topic (MQTT §4.7.2).
        assert!(!rumqttd::protocol::matches("s/$aws/x", "t/#"));
        assert!(rumqttd::protocol::matches("s/$aws/x", "s/$aws/#"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retained_messages_are_held_to_the_site_limits() {
        let fabric = Fabric::start(limits(), Default::default());
        let p = |t: &str, body: &str| publish_packet(t, body.as_bytes(), QoS::AtMostOnce, true);
        fabric.retain(&mut p("a", "1"), &None).unwrap();
        fabric.retain(&mut p("b", "2"), &None).unwrap();
        assert_eq!(
            fabric.retain(&mut p("c", "3"), &None),
            Err(RetainError::Messages(2))
        );
        // Replacing one does not count twice; clearing one makes room.
        fabric.retain(&mut p("a", "11"), &None).unwrap();
        fabric.retain(&mut p("a", ""), &None).unwrap();
        fabric.retain(&mut p("c", "3"), &None).unwrap();
        assert_eq!(fabric.retained(), (2, 4));
        assert_eq!(
            fabric.retain(&mut p("c", &"x".repeat(200)), &None),
            Err(RetainError::Bytes(100))
        );
    }

    async fn next_forward(link: &mut RouterLink) -> Publish {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match link.rx.next().await.unwrap() {
                    Some(Notification::Forward(f)) => {
                        let mut p = f.publish;
                        device_topic(&mut p);
                        break p;
                    }
                    _ => continue,
                }
            }
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_watchdog_rebuilds_a_router_whose_thread_ended() {
        let stats = Arc::new(crate::metrics::Stats::default());
        let fabric = Arc::new(Fabric::start(limits(), Arc::clone(&stats)));
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(Arc::clone(&fabric).watchdog(stopped));
        let mut generations = fabric.generations();
        // End the router's thread the way a panic in it would.
        assert!(fabric.current().retire().await);
        tokio::time::timeout(Duration::from_secs(5), generations.changed())
            .await
            .expect("the watchdog rebuilt the router")
            .unwrap();
        assert_eq!(stats.router_rebuilds.load(Ordering::Relaxed), 1);
        assert!((fabric.current().alive)());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rebuilt_router_serves_again_and_the_old_thread_ends() {
        let fabric = Arc::new(Fabric::start(limits(), Default::default()));
        let old = fabric.current();
        let mut sub = fabric.link("sub", true).await.unwrap();
        let subscribe = |f: &str| {
            Packet::Subscribe(
                rumqttd::protocol::Subscribe {
                    pkid: 1,
                    filters: vec![rumqttd::protocol::Filter {
                        path: f.into(),
                        qos: QoS::AtMostOnce,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
                    }],
                },
                None,
            )
        };
        fabric.send(&mut sub, vec![subscribe("é/#")]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let publish = publish_packet("é/x", b"1", QoS::AtMostOnce, false);
        fabric
            .forward(vec![Packet::Publish(publish.clone(), None)])
            .await
            .unwrap();
        assert_eq!(&next_forward(&mut sub).await.topic[..], "é/x".as_bytes());
        fabric.rebuild().await;
        assert_eq!(fabric.generation(), 1);
        // The old link is of the old generation; a new one works.
        assert!(fabric.send(&mut sub, vec![subscribe("é/#")]).await.is_err());
        let mut sub = fabric.link("sub", true).await.unwrap();
        fabric.send(&mut sub, vec![subscribe("é/#")]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        fabric
            .forward(vec![Packet::Publish(publish, None)])
            .await
            .unwrap();
        assert_eq!(&next_forward(&mut sub).await.payload[..], b"1");
        assert!(
            old.retire().await,
            "the old router thread should have ended"
        );
    }
}
