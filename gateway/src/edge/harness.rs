//! A whole device edge in memory, for fuzzers and property tests: real sessions over an
//! in-memory stream, the real policy, registry (sled in a temp dir) and router. Whatever bytes a
//! device sends, the router must stay alive and a good device must still be served.
//!
//! `wire` builds MQTT packets byte by byte (3.1.1 and 5), including the ones no client sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::AuthConfig;
use crate::auth::{Authority, PolicySet, Registry};
use crate::edge::session::{self, EdgeContext, Limits};
use crate::edge::ListenerConfig;
use crate::edge::SessionTable;
use crate::edge::{Fabric, FabricLimits};
use crate::identity::pki::Identity;
use crate::metrics::Stats;

/// MQTT packets as bytes.
pub mod wire {
    /// MQTT's variable byte integer.
    pub fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    fn string(s: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        out.extend_from_slice(&s[..s.len().min(usize::from(u16::MAX))]);
    }

    /// A packet: fixed header byte, remaining length, body.
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        varint(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    /// CONNECT with keepalive 60, no will; `flags` are the connect flags (0x02: clean start).
    pub fn connect(client_id: &str, v5: bool, flags: u8) -> Vec<u8> {
        connect_with(client_id, v5, flags, &[])
    }

    /// CONNECT as [`connect`], with v5 `props` as encoded.
    pub fn connect_with(client_id: &str, v5: bool, flags: u8, props: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(if v5 { 5 } else { 4 });
        body.push(flags);
        body.extend_from_slice(&60u16.to_be_bytes());
        if v5 {
            varint(props.len(), &mut body);
            body.extend_from_slice(props);
        }
        string(client_id.as_bytes(), &mut body);
        packet(0x10, &body)
    }

    /// PUBLISH of `topic` at `qos` (packet id 1 when above 0), with v5 `props` as encoded.
    pub fn publish(
        topic: &[u8],
        qos: u8,
        retain: bool,
        v5: bool,
        props: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic, &mut body);
        if qos > 0 {
            body.extend_from_slice(&1u16.to_be_bytes());
        }
        if v5 {
            varint(props.len(), &mut body);
            body.extend_from_slice(props);
        }
        body.extend_from_slice(payload);
        packet(0x30 | ((qos & 3) << 1) | u8::from(retain), &body)
    }

    /// An MQTT 5 property with a four-byte integer value (Session Expiry Interval 0x11,
    /// Maximum Packet Size 0x27, Message Expiry Interval 0x02).
    pub fn prop_u32(id: u8, value: u32) -> Vec<u8> {
        let mut out = vec![id];
        out.extend_from_slice(&value.to_be_bytes());
        out
    }

    /// An MQTT 5 property with a two-byte integer value (Receive Maximum 0x21).
    pub fn prop_u16(id: u8, value: u16) -> Vec<u8> {
        let mut out = vec![id];
        out.extend_from_slice(&value.to_be_bytes());
        out
    }

    /// SUBSCRIBE with `pkid` of `filters` (bytes, options byte), v5 `props`.
    pub fn subscribe(pkid: u16, filters: &[(&[u8], u8)], v5: bool, props: &[u8]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        if v5 {
            varint(props.len(), &mut body);
            body.extend_from_slice(props);
        }
        for (f, options) in filters {
            string(f, &mut body);
            body.push(*options);
        }
        packet(0x82, &body)
    }
}

/// Devices `dev-*` may publish and subscribe to anything: the widest rope for the input (and
/// for tests about the protocol rather than the policy).
pub const OPEN_AUTH: &str = r#"
[device_groups.devs]
selection_rule = "thingName: dev-*"
policy = "open"
[policies.open.all]
operations = ["mqtt:connect", "mqtt:publish", "mqtt:subscribe"]
resources = ["mqtt:clientId:${iot:Connection.Thing.ThingName}", "mqtt:topic:*", "mqtt:topicfilter:*"]
"#;

/// The certificate id each of the harness's things connects with (status is per certificate).
fn cert_of(thing: &str) -> String {
    let hex: String = thing.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{:0<64.64}", hex)
}

/// The identity `thing` connects with, as the listener would give it after the handshake.
fn identity_of(thing: &str) -> Identity {
    Identity {
        thing: thing.to_owned(),
        cert_id: cert_of(thing),
        issuer: String::new(),
        serial: String::new(),
    }
}

/// The in-memory edge. Make it inside a multi-threaded tokio runtime.
pub struct Harness {
    ctx: Arc<EdgeContext>,
    _dir: tempfile::TempDir,
    /// Held so that the pipeline, when there is one, runs as long as the harness.
    _pipeline: Option<tokio::sync::watch::Sender<bool>>,
}

/// Where a fuzzed session stops waiting for the gateway's answers.
const SESSION_LIMIT: Duration = Duration::from_secs(2);

impl Harness {
    /// The context sessions run in.
    pub fn context(&self) -> Arc<EdgeContext> {
        Arc::clone(&self.ctx)
    }

    pub fn new() -> Result<Harness, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = sled::Config::new().path(dir.path().join("db")).open()?;
        let auth: AuthConfig = toml::from_str(OPEN_AUTH)?;
        let registry = Registry::open(&db, crate::disk::DiskGuard::off())?;
        for thing in ["dev-fuzz", "dev-good", "dev-sub"] {
            registry.approve(thing, Some(&cert_of(thing)), &[])?;
        }
        let authority = Arc::new(Authority::new(PolicySet::compile(&auth)?, registry));
        let stats = Arc::new(Stats::default());
        let l = ListenerConfig::with_defaults("127.0.0.1:0", "ca".into(), "c".into(), "k".into());
        let fabric = Arc::new(Fabric::start(
            FabricLimits {
                max_connections: 64,
                max_retained_messages: 100,
                max_retained_bytes: 1 << 20,
                ..FabricLimits::of(&l, 0)
            },
            Arc::clone(&stats),
        ));
        let ctx = Arc::new(EdgeContext {
            authority,
            fabric,
            sessions: Arc::new(SessionTable::default()),
            stats,
            limits: Limits {
                max_packet_size: 64 * 1024,
                connect_timeout: Duration::from_secs(1),
                write_timeout: Duration::from_secs(1),
                max_keep_alive_secs: 60,
                ..Limits::of(&l)
            },
            ingest: None,
            enrollment: None,
            relay: None,
        });
        Ok(Harness {
            ctx,
            _dir: dir,
            _pipeline: None,
        })
    }

    /// The edge with a real pipeline behind it: publishes on `dt/#` are spooled (sled in the
    /// temp dir) for a sink `out`, committed every `interval`.
    pub async fn with_pipeline(interval: Duration) -> Result<Harness, Box<dyn std::error::Error>> {
        use crate::pipeline::{self, CommitSettings, PipelineUpdate, RouteConfig, RulesConfig};
        let mut h = Harness::new()?;
        let dir = h._dir.path().join("spool");
        std::fs::create_dir_all(&dir)?;
        let db = sled::Config::new().path(dir.join("db")).open()?;
        let config = crate::spool::SpoolConfig::default();
        let spool = crate::spool::Spool::open(db, &config, &dir, ["out".to_string()]).await?;
        let route = RouteConfig {
            from: "dt/#".into(),
            to: "out".into(),
        };
        let routes = [("all".to_string(), route)].into_iter().collect();
        let update = PipelineUpdate::new(&routes, &RulesConfig::default(), Default::default());
        let settings = CommitSettings {
            interval,
            ..CommitSettings::of(&config)
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stats = Arc::clone(&h.ctx.stats);
        let started = pipeline::start(update, settings, Arc::new(spool), stats, stopped).await?;
        Arc::get_mut(&mut h.ctx)
            .ok_or("the harness's context is shared already")?
            .ingest = Some(started.ingest);
        h._pipeline = Some(stop);
        Ok(h)
    }

    /// The edge's counters.
    pub fn stats(&self) -> &Stats {
        &self.ctx.stats
    }

    /// Runs one session of `thing` fed `input`, then the end of the stream; returns what the
    /// gateway wrote back.
    pub async fn session(&self, thing: &str, input: &[u8]) -> Vec<u8> {
        let (mut device, gateway) = tokio::io::duplex(1 << 16);
        let identity = identity_of(thing);
        let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
        let served = tokio::spawn(session::run(gateway, identity, peer, Arc::clone(&self.ctx)));
        let _ = device.write_all(input).await;
        let _ = device.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(SESSION_LIMIT, device.read_to_end(&mut out)).await;
        drop(device);
        let _ = tokio::time::timeout(SESSION_LIMIT, served).await;
        out
    }

    /// A subscriber and a publisher on fresh sessions: true when the publish was delivered.
    pub async fn good_device_served(&self) -> bool {
        let (mut sub, gateway) = tokio::io::duplex(1 << 16);
        let identity = identity_of("dev-sub");
        let peer: SocketAddr = ([127, 0, 0, 1], 2).into();
        let served = tokio::spawn(session::run(gateway, identity, peer, Arc::clone(&self.ctx)));
        let mut hello = wire::connect("dev-sub", true, 0x02);
        hello.extend(wire::subscribe(1, &[(b"good/#", 0)], true, &[]));
        let _ = sub.write_all(&hello).await;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut delivered = false;
        for _ in 0..20 {
            let mut publish = wire::connect("dev-good", true, 0x02);
            publish.extend(wire::publish(b"good/x", 0, false, true, &[], b"ok"));
            self.session("dev-good", &publish).await;
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), sub.read(&mut buf)).await
            {
                seen.extend_from_slice(&buf[..n]);
            }
            if seen.windows(6).any(|w| w == b"good/x") {
                delivered = true;
                break;
            }
        }
        drop(sub);
        let _ = tokio::time::timeout(SESSION_LIMIT, served).await;
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One step of a hostile device: a packet with arbitrary text where MQTT puts a topic or a
    /// filter, arbitrary properties and flags, or raw bytes.
    #[derive(Debug, Clone)]
    enum Step {
        Publish {
            topic: String,
            qos: u8,
            retain: bool,
            props: Vec<u8>,
        },
        Subscribe {
            filter: String,
            options: u8,
            props: Vec<u8>,
        },
        Raw(Vec<u8>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                prop_oneof![any::<String>(), "\\PC{0,12}"],
                0u8..4,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..6)
            )
                .prop_map(|(topic, qos, retain, props)| Step::Publish {
                    topic,
                    qos,
                    retain,
                    props
                }),
            (
                any::<String>(),
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..4)
            )
                .prop_map(|(filter, options, props)| Step::Subscribe {
                    filter,
                    options,
                    props
                }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Step::Raw),
        ]
    }

    fn encode(v5: bool, steps: &[Step]) -> Vec<u8> {
        let mut bytes = wire::connect("dev-fuzz", v5, 0x02);
        for s in steps {
            bytes.extend(match s {
                Step::Publish {
                    topic,
                    qos,
                    retain,
                    props,
                } => wire::publish(topic.as_bytes(), *qos, *retain, v5, props, b"{}"),
                Step::Subscribe {
                    filter,
                    options,
                    props,
                } => wire::subscribe(1, &[(filter.as_bytes(), *options)], v5, props),
                Step::Raw(raw) => raw.clone(),
            });
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        // Bounded here (24 sequences a run); `fuzz/` runs the same harness under libFuzzer.
        #[test]
        fn hostile_sessions_never_hurt_the_router_or_a_good_device(
            v5 in any::<bool>(),
            steps in proptest::collection::vec(step(), 1..8),
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let harness = Harness::new().unwrap();
                // Someone subscribes first, so publishes reach the router's matcher.
                harness.session("dev-sub", &[wire::connect("dev-sub", true, 0x02), wire::subscribe(1, &[(b"#", 0)], true, &[])].concat()).await;
                harness.session("dev-fuzz", &encode(v5, &steps)).await;
                prop_assert_eq!(harness.stats().snapshot().router_rebuilds, 0);
                prop_assert!(harness.good_device_served().await, "a good device was not served after {:?}", steps);
                Ok(())
            })?;
        }
    }
}

#[cfg(test)]
mod task_size {
    use super::*;

    /// What every connection's task carries for the whole session: its future's state. The
    /// phases that run once (CONNECT, admission, resuming, closing) and the away sessions'
    /// capture are boxed, so only the serving loop stays inline. It was 13,128 bytes (debug
    /// build) before they were.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_connection_task_stays_small() {
        let h = Harness::new().unwrap();
        let (_device, gateway) = tokio::io::duplex(1024);
        let identity = identity_of("dev-good");
        let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
        let run = session::run(gateway, identity, peer, Arc::clone(&h.ctx));
        let size = std::mem::size_of_val(&run);
        assert!(size < 8192, "a session's future is {size} bytes");
    }
}

#[cfg(test)]
mod acknowledgements {
    use super::*;

    /// A stream that counts the writes made to it.
    struct Counted {
        inner: tokio::io::DuplexStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tokio::io::AsyncRead for Counted {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Counted {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            // Counted before the bytes can reach the reader, so a reader that has them sees
            // the count; taken back if nothing was written.
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if !matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
                self.writes
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            written
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Socket reads that one group commit makes durable get their PUBACKs in one write: the
    /// session takes every held read whose commit has landed, not one read per wake-up (which
    /// was a write, and a TLS record, for each read). Without that, 3 writes here. The
    /// PUBACKs keep PUBLISH order (MQTT 5 §4.6, MQTT-4.6.0-2; 3.1.1 §4.6 likewise).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_acknowledges_its_reads_in_one_write() {
        let h = Harness::with_pipeline(Duration::from_millis(500))
            .await
            .unwrap();
        let (mut device, gateway) = tokio::io::duplex(1 << 16);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gateway = Counted {
            inner: gateway,
            writes: Arc::clone(&writes),
        };
        let identity = identity_of("dev-good");
        let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
        let served = tokio::spawn(session::run(gateway, identity, peer, h.context()));
        device
            .write_all(&wire::connect("dev-good", false, 0x02))
            .await
            .unwrap();
        let mut connack = [0u8; 4];
        device.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);
        let before = writes.load(std::sync::atomic::Ordering::SeqCst);
        for pkid in 1..=3u16 {
            let mut body = vec![0, 4];
            body.extend_from_slice(b"dt/x");
            body.extend_from_slice(&pkid.to_be_bytes());
            body.extend_from_slice(b"{\"t\":1}");
            device.write_all(&wire::packet(0x32, &body)).await.unwrap();
            // Long enough for the session to take each publish in a read of its own.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let mut acks = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), device.read_exact(&mut acks))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(acks, [0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3]);
        let after = writes.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            after - before,
            1,
            "PUBACKs of one commit in {} writes",
            after - before
        );
        drop(device);
        let _ = tokio::time::timeout(SESSION_LIMIT, served).await;
    }
}
