//! One local publish's way to a subscriber inside the gateway: the shared link into rumqttd's
//! router (`Fabric::forward`), the router thread, and the subscriber's link notification, in
//! one process, no TLS or sockets. Not a throughput bench: one message at a time, p50 and p99
//! of the hand-over, beside the same hand-over of a tokio channel between two tasks (the
//! floor for any cross-task hop on this runtime).
//!
//! Run with `cargo bench -p sitegate-benches --bench fanout`; `MESSAGES` changes the count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::protocol::{Filter, Packet, QoS, RetainForwardRule, Subscribe};
use rumqttd::Notification;
use sitegate::edge::{publish_packet, Fabric, FabricLimits, ListenerConfig};

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

async fn router(messages: usize) -> Vec<Duration> {
    let l = ListenerConfig::with_defaults("127.0.0.1:0", "ca".into(), "c".into(), "k".into());
    let fabric = Arc::new(Fabric::start(
        FabricLimits::of(&l, 4),
        Arc::new(sitegate::metrics::Stats::default()),
    ));
    let mut link = fabric.link("pump-1", true).await.unwrap();
    let subscribe = Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: "cmd/pump-1/#".into(),
                qos: QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        },
        None,
    );
    fabric.send(&mut link, vec![subscribe]).await.unwrap();
    // The SUBACK.
    while !matches!(
        link.rx.next().await.unwrap(),
        Some(Notification::DeviceAck(_))
    ) {}
    let mut took = Vec::with_capacity(messages);
    for i in 0..messages {
        let p = publish_packet(
            "cmd/pump-1/set",
            format!("{i}").as_bytes(),
            QoS::AtMostOnce,
            false,
        );
        let start = Instant::now();
        fabric
            .forward(vec![Packet::Publish(p, None)])
            .await
            .unwrap();
        loop {
            match link.rx.next().await.unwrap() {
                Some(Notification::Forward(_)) => break,
                Some(Notification::Unschedule) => link.rx.wake().await.unwrap(),
                _ => {}
            }
        }
        took.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    took
}

async fn channel(messages: usize) -> Vec<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(1);
    let (back_tx, mut back) = tokio::sync::mpsc::channel::<Duration>(1);
    tokio::spawn(async move {
        while let Some(sent) = rx.recv().await {
            let _ = back_tx.send(sent.elapsed()).await;
        }
    });
    let mut took = Vec::with_capacity(messages);
    for _ in 0..messages {
        tx.send(Instant::now()).await.unwrap();
        took.push(back.recv().await.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    took
}

fn main() {
    let messages = std::env::var("MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (r50, r99) = percentiles(rt.block_on(router(messages)));
    let (c50, c99) = percentiles(rt.block_on(channel(messages)));
    println!("one message at a time, {messages} messages, µs:");
    println!("  publish → router → subscriber's link   p50 {r50:8.1}  p99 {r99:8.1}");
    println!("  tokio channel, task → task (the floor)  p50 {c50:8.1}  p99 {c99:8.1}");
}
