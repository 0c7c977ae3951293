//! Memory per persistent session whose device is away, the gateway's way against rumqttd's.
//!
//! Not a timing bench: it reads the process's anonymous resident memory (heap and stacks, the
//! router thread's and sled's cache included) before and after, and prints the growth per
//! session and per queued message, for the two ways a session can wait for its device:
//!
//! - `gateway`: as sitegate keeps one: the session parked in the session table, its two
//!   filters in the offline queues' trie, and its QoS 1 messages sealed into the store
//!   (`session_messages`, a real sled store opened as the gateway opens it).
//! - `router`: as rumqttd keeps one when the gateway leaves it there (what sitegate did
//!   before): a link made not clean, its two filters subscribed, then disconnected, so the
//!   router parks the session; its messages wait in the router's commit log.
//!
//! Run with `cargo bench -p sitegate-benches --bench sessions`; `SESSIONS` and `MESSAGES`
//! (per session) change the load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, QoS, RetainForwardRule, Subscribe,
};
use sitegate::edge::{
    publish_packet, Fabric, FabricLimits, ListenerConfig, Parked, SessionTable, Subscription,
};

/// The process's anonymous resident memory (heap, stacks; `RssAnon` of /proc/self/status),
/// in bytes: what the router thread, sled's cache and every allocation hold.
fn live() -> isize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<isize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn thing(i: usize) -> String {
    format!("freezer-{i:05}")
}

fn filters(thing: &str) -> Vec<Subscription> {
    [format!("cmd/{thing}/#"), format!("cfg/{thing}")]
        .into_iter()
        .map(|filter| Subscription {
            filter,
            qos: 1,
            no_local: false,
            retain_as_published: false,
        })
        .collect()
}

fn fabric(stats: &Arc<sitegate::metrics::Stats>, sessions: usize) -> Arc<Fabric> {
    let mut l = ListenerConfig::with_defaults("127.0.0.1:0", "ca".into(), "c".into(), "k".into());
    l.max_connections = sessions + 16;
    l.max_session_messages = 1 << 20;
    l.max_saved_messages = 1 << 30;
    Arc::new(Fabric::start(FabricLimits::of(&l, 4), Arc::clone(stats)))
}

/// 100 bytes of JSON telemetry, like the spool bench's.
fn payload(n: usize) -> Vec<u8> {
    let mut p = format!(r#"{{"n":{n},"setpoint":-18.5,"defrost":false,"pad":""#).into_bytes();
    p.resize(98, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// `messages` QoS 1 commands for every session, handed to the fabric 1,000 at a time.
async fn publish_commands(fabric: &Fabric, sessions: usize, messages: usize) {
    let mut batch = Vec::with_capacity(1000);
    for m in 0..messages {
        for i in 0..sessions {
            let topic = format!("cmd/{}/set", thing(i));
            let p = publish_packet(&topic, &payload(m), QoS::AtLeastOnce, false);
            batch.push(Packet::Publish(p, None));
            if batch.len() == 1000 {
                fabric.forward(std::mem::take(&mut batch)).await.unwrap();
            }
        }
    }
    if !batch.is_empty() {
        fabric.forward(batch).await.unwrap();
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

struct Figures {
    per_session: f64,
    per_message: f64,
}

async fn gateway_way(sessions: usize, messages: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(sitegate::metrics::Stats::default());
    let spool = Arc::new(sitegate_benches::fixtures::open_spool_async(dir.path()).await);
    let fabric = fabric(&stats, sessions);
    fabric.offline().attach(Arc::downgrade(&spool));
    let table = SessionTable::default();
    // Warm the trie's and table's first allocations out of the figure.
    settle().await;
    let before = live();
    for i in 0..sessions {
        let thing = thing(i);
        let f = filters(&thing);
        fabric
            .offline()
            .watch(&thing, f.clone(), 0, None, false)
            .await;
        table.park(
            &thing,
            Parked {
                filters: f,
                expires_at: Instant::now() + Duration::from_secs(3600),
                sent: Vec::new(),
            },
        );
    }
    settle().await;
    let parked = live();
    publish_commands(&fabric, sessions, messages).await;
    settle().await;
    let queued = live();
    assert_eq!(
        fabric.offline().len().await,
        (sessions, sessions * messages)
    );
    Figures {
        per_session: (parked - before) as f64 / sessions as f64,
        per_message: (queued - parked) as f64 / (sessions * messages) as f64,
    }
}

async fn router_way(sessions: usize, messages: usize) -> Figures {
    let stats = Arc::new(sitegate::metrics::Stats::default());
    let fabric = fabric(&stats, sessions);
    settle().await;
    let before = live();
    for i in 0..sessions {
        let thing = thing(i);
        let mut link = fabric.link(&thing, false).await.unwrap();
        let filters = filters(&thing)
            .into_iter()
            .map(|s| Filter {
                path: s.filter,
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            })
            .collect();
        let subscribe = Packet::Subscribe(Subscribe { pkid: 1, filters }, None);
        let bye = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        fabric.send(&mut link, vec![subscribe, bye]).await.unwrap();
    }
    settle().await;
    let parked = live();
    publish_commands(&fabric, sessions, messages).await;
    settle().await;
    let queued = live();
    Figures {
        per_session: (parked - before) as f64 / sessions as f64,
        per_message: (queued - parked) as f64 / (sessions * messages) as f64,
    }
}

/// One way, in this process; prints its two figures.
fn run_way(way: &str, sessions: usize, messages: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let f = match way {
        "gateway" => rt.block_on(gateway_way(sessions, messages)),
        _ => rt.block_on(router_way(sessions, messages)),
    };
    println!("{} {}", f.per_session, f.per_message);
}

/// Each way runs in a process of its own (this binary again, with `WAY` set), so memory one
/// freed is not counted to the other.
fn measure(way: &str) -> Figures {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("WAY", way)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok());
    Figures {
        per_session: v.next().unwrap(),
        per_message: v.next().unwrap(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this bench has no filters of its own.
    let sessions = env("SESSIONS", 10_000);
    let messages = env("MESSAGES", 10);
    if let Ok(way) = std::env::var("WAY") {
        run_way(&way, sessions, messages);
        return;
    }
    let gateway = measure("gateway");
    let router = measure("router");
    println!("away sessions: {sessions}, QoS 1 messages queued per session: {messages} (100-byte payloads)");
    println!(
        "gateway (offline queue, sled store): {:>8.0} B per session, {:>6.0} B per queued message",
        gateway.per_session, gateway.per_message
    );
    println!(
        "router  (rumqttd parked session):    {:>8.0} B per session, {:>6.0} B per queued message",
        router.per_session, router.per_message
    );
    println!(
        "ratio gateway/router: {:.2} per session, {:.2} per queued message",
        gateway.per_session / router.per_session,
        gateway.per_message / router.per_message
    );
}
