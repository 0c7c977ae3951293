//! Local fan-out between devices through rumqttd's router, reached over local links.
//!
//! The gateway owns the device-facing sockets and sessions (rumqttd cannot see client
//! certificates or authorize topics), and uses the router only as the in-process fabric that
//! matches publishes to subscriptions, keeps retained messages and persistent sessions, and
//! tracks QoS 1 deliveries to subscribers. rumqttd types stay inside this module, `codec` and
//! `session`.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, QoS};
use rumqttd::{Notification, Router, RouterConfig};

/// Bytes per commit-log segment in the router; small, since the router only relays.
const SEGMENT_BYTES: usize = 1 << 20;
/// Segments kept per subscription filter before the oldest is dropped.
const SEGMENT_COUNT: usize = 4;

/// The router could not take a link. Retrying can help only once the router has capacity.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("local router refused the link: {0}")]
    Link(#[from] Box<LinkError>),
    #[error("local router link task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("local router link closed: {0}")]
    Closed(String),
}

type Connector =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync;

/// The in-process router all device sessions are linked to.
pub struct Fabric {
    connect: Box<Connector>,
    /// The link that carries publishes of devices without a link of their own.
    shared: tokio::sync::OnceCell<LocalPublisher>,
    /// A device has linked (it subscribed, or has a persistent session), so some publish may
    /// have a local subscriber. Never cleared: a parked persistent session keeps its
    /// subscriptions in the router.
    device_linked: std::sync::atomic::AtomicBool,
}

/// Client id of the shared link; dots never occur in thing names.
const SHARED_LINK: &str = "sitegate.shared";

/// One session's two halves of its router link.
pub struct RouterLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
    /// The router kept state from an earlier persistent session of this client id.
    pub session_present: bool,
}

impl Fabric {
    /// Starts a router sized for `max_connections` links, each with at most `max_inflight`
    /// unacknowledged QoS 1 deliveries.
    pub fn start(max_connections: usize, max_inflight: u16) -> Fabric {
        let config = RouterConfig {
            max_connections,
            max_outgoing_packet_count: u64::from(max_inflight),
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, config).spawn();
        Fabric {
            connect: Box::new(move |client_id, clean| {
                LinkBuilder::new(client_id, router_tx.clone())
                    .clean_session(clean)
                    .build()
                    .map_err(Box::new)
            }),
            shared: tokio::sync::OnceCell::new(),
            device_linked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Hands the PUBLISHes among `packets` to the router through the shared link. A device that
    /// only publishes needs no link of its own; each link costs the router two 200-slot packet
    /// queues (about 150 KB), which for a fleet of publish-only devices was most of the
    /// gateway's memory.
    ///
    /// Until some device has linked, nothing can be subscribed, so only retained publishes
    /// (kept for later subscribers) go to the router; a publish-only fleet costs it nothing.
    pub async fn forward(self: &Arc<Self>, mut packets: Vec<Packet>) -> Result<(), FabricError> {
        if !self
            .device_linked
            .load(std::sync::atomic::Ordering::Acquire)
        {
            packets.retain(|p| matches!(p, Packet::Publish(publish, _) if publish.retain));
            if packets.is_empty() {
                return Ok(());
            }
        }
        let publisher = self
            .shared
            .get_or_try_init(|| async {
                Ok::<_, FabricError>(LocalPublisher::new(self.link(SHARED_LINK, true).await?))
            })
            .await?;
        publisher.forward(packets).await
    }

    /// Links `client_id` to the router. The router answers over a blocking channel, so the
    /// wait happens off the async workers.
    pub async fn link(
        self: &Arc<Self>,
        client_id: &str,
        clean: bool,
    ) -> Result<RouterLink, FabricError> {
        // Dots never occur in thing names: the gateway's own links (shared, republish) have them.
        if !client_id.contains('.') {
            self.device_linked
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let fabric = Arc::clone(self);
        let client_id = client_id.to_owned();
        let (tx, rx, ack) =
            tokio::task::spawn_blocking(move || (fabric.connect)(&client_id, clean)).await??;
        let session_present = matches!(
            Option::<Packet>::from(ack),
            Some(Packet::ConnAck(connack, _)) if connack.session_present
        );
        Ok(RouterLink {
            tx,
            rx,
            session_present,
        })
    }
}

/// The republish sink's way into the router: one local link, publishing what sinks hand it.
pub struct LocalPublisher {
    tx: tokio::sync::Mutex<LinkTx>,
    _drain: tokio::task::JoinHandle<()>,
}

impl LocalPublisher {
    /// Publishes through `link`; the router's answers on it (acks) are read and dropped.
    pub fn new(link: RouterLink) -> Self {
        let RouterLink { tx, mut rx, .. } = link;
        let drain = tokio::spawn(async move {
            loop {
                match rx.next().await {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        LocalPublisher {
            tx: tokio::sync::Mutex::new(tx),
            _drain: drain,
        }
    }
}

impl LocalPublisher {
    /// Sends the PUBLISHes among `packets`, in order, in one hand-over to the router.
    async fn forward(&self, packets: Vec<Packet>) -> Result<(), FabricError> {
        let mut publishes: Vec<Packet> = packets
            .into_iter()
            .filter(|p| matches!(p, Packet::Publish(..)))
            .collect();
        let Some(last) = publishes.pop() else {
            return Ok(());
        };
        let mut tx = self.tx.lock().await;
        tx.buffer().extend(publishes);
        tx.send(last)
            .await
            .map(|_| ())
            .map_err(|e| FabricError::Closed(e.to_string()))
    }
}

impl Drop for LocalPublisher {
    fn drop(&mut self) {
        self._drain.abort();
    }
}

#[async_trait::async_trait]
impl sitegate_plugins::republish::LocalBroker for LocalPublisher {
    async fn publish(
        &self,
        topic: String,
        payload: bytes::Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<(), String> {
        let qos = if qos >= 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let packet = Packet::Publish(publish_packet(&topic, &payload, qos, retain), None);
        self.forward(vec![packet]).await.map_err(|e| e.to_string())
    }
}

/// A publish packet for the router with any QoS. rumqttd keeps a publish's QoS and packet id
/// crate-private and offers only its MQTT-independent serialization to set them, so this goes
/// through that format. Used for wills and the republish sink: device publishes are relayed as
/// parsed.
pub fn publish_packet(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Publish {
    let mut raw = BytesMut::with_capacity(5 + topic.len() + payload.len());
    raw.put_u8(0b0011_0000 | u8::from(retain) | ((qos as u8) << 1));
    raw.put_u16(if qos == QoS::AtMostOnce { 0 } else { 1 });
    raw.put_u16(topic.len() as u16);
    raw.extend_from_slice(topic.as_bytes());
    raw.extend_from_slice(payload);
    Publish::deserialize(raw.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_packet_keeps_qos_and_retain() {
        let p = publish_packet("a/b", b"hi", QoS::AtLeastOnce, true);
        assert_eq!(&p.topic[..], b"a/b");
        assert_eq!(&p.payload[..], b"hi");
        assert!(p.retain);
        // The header byte of the serialized form carries QoS 1 and retain.
        assert_eq!(p.serialize()[0], 0b0011_0011);
    }

    #[tokio::test]
    async fn two_links_fan_out_through_the_router() {
        let fabric = Arc::new(Fabric::start(16, 10));
        let mut sub = fabric.link("sub", true).await.unwrap();
        let mut publ = fabric.link("pub", true).await.unwrap();
        sub.tx.subscribe("cmd/pump-1/#").unwrap();
        // Let the router register the filter before publishing.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        publ.tx.publish("cmd/pump-1/start", "go").unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match sub.rx.next().await.unwrap() {
                    Some(Notification::Forward(f)) => break f.publish,
                    _ => continue,
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(&got.topic[..], b"cmd/pump-1/start");
        assert_eq!(&got.payload[..], b"go");
    }
}
