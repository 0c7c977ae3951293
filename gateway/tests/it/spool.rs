//! The spool end to end: real devices (mosquitto_pub, rumqttc) publish QoS 1 through a running
//! gateway into encrypted sled queues and out through the file sink; KMS is moto_server.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::aws::{Moto, Relay};
use common::{archive_to, files_containing, out_path, text, wait_lines, Site};
use sitegate::config::{QueueOverride, RouteConfig, WhenFull};
use sitegate_plugins::{ByteSize, SinkConfig};

/// A path no file can be created at, even by root: the sink fails and records stay spooled.
const UNWRITABLE: &str = "/dev/null/sitegate/out.jsonl";

#[tokio::test(flavor = "multi_thread")]
async fn qos1_messages_reach_the_file_sink_with_the_device_identity() {
    let site = Site::start_with(|c| {
        let out = out_path(c);
        archive_to(c, &out);
    })
    .await;
    let out = out_path(&site.config);
    let sensor = site.device("sensor-1").await;
    for (i, v5) in [(0, false), (1, true), (2, false)] {
        let o = site
            .publish(
                &sensor,
                "dt/sensor-1/temp",
                &format!(r#"{{"n":{i},"t":21.5}}"#),
                1,
                v5,
            )
            .await;
        assert!(o.status.success(), "{}", text(&o));
    }
    // Not routed: acknowledged, relayed locally, but not spooled.
    let o = site
        .publish(&sensor, "status/sensor-1", "up", 1, false)
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let lines = wait_lines(&out, 3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["payload"]["n"], i);
        assert_eq!(line["thing_name"], "sensor-1");
        assert_eq!(line["cert_id"], sensor.cert_id);
        assert_eq!(line["topic"], "dt/sensor-1/temp");
        assert_eq!(line["rule"], "telemetry");
        assert_eq!(line["site"], "test");
        assert_eq!(line["record_id"], i + 1);
    }
    assert!(site.snapshot().spool_commits >= 1);
    let status = site.spool_status().await;
    assert_eq!(status.queues[0].records, 0, "{status:?}");
    site.stop().await;
}

/// The spool's current data key is wrapped by `wrapper` ("file:…" or "kms:…").
fn assert_wrapped_by(status: &sitegate::spool::SpoolStatus, wrapper: &str) {
    let by = status.keys.wrapped_by.as_deref().unwrap_or_default();
    assert!(
        by.starts_with(wrapper),
        "wrapped by {by:?}, expected {wrapper}…: {status:?}"
    );
}

/// Publishes `count` messages whose payload and topic carry `marker`; all are acknowledged.
async fn publish_marked(
    site: &Site,
    sensor: &sitegate::identity::pki::IssuedDevice,
    marker: &str,
    from: usize,
    count: usize,
) {
    for i in from..from + count {
        let topic = format!("dt/sensor-1/{marker}");
        let o = site
            .publish(
                sensor,
                &topic,
                &format!(r#"{{"n":{i},"note":"{marker}"}}"#),
                1,
                i % 2 == 0,
            )
            .await;
        assert!(o.status.success(), "message {i}: {}", text(&o));
    }
}

fn assert_not_at_rest(data_dir: &Path, marker: &str) {
    // Control: the grep does see sled's files (the registry keeps thing names in the clear).
    assert!(
        !files_containing(data_dir, b"sensor-1").is_empty(),
        "grep sees nothing under {}",
        data_dir.display()
    );
    let hits = files_containing(data_dir, marker.as_bytes());
    assert!(
        hits.is_empty(),
        "plaintext marker found at rest in {hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_stored_in_plaintext_with_a_key_file() {
    let marker = "MARKER-c0ffee-keyfile";
    let site = Site::start_with(|c| {
        archive_to(c, Path::new(UNWRITABLE));
        let kek = c.data_dir.parent().unwrap().join("pki/spool.kek");
        sitegate::spool::keys::generate_kek(&kek).unwrap();
        c.spool.encryption.key_file = Some(kek);
    })
    .await;
    let sensor = site.device("sensor-1").await;
    publish_marked(&site, &sensor, marker, 0, 6).await;
    let status = site.spool_status().await;
    assert_eq!(status.queues[0].records, 6, "{status:?}");
    assert_wrapped_by(&status, "file:");
    let data_dir = site.config.data_dir.clone();
    let mut site = site;
    site.halt().await;
    assert_not_at_rest(&data_dir, marker);
}

#[tokio::test(flavor = "multi_thread")]
async fn kms_wraps_keys_and_an_offline_restart_keeps_accepting_then_drains() {
    let moto = Moto::start().await;
    let key_id = moto.create_kms_key().await;
    let relay = Relay::start(&moto.endpoint).await;
    let marker = "MARKER-c0ffee-kms";
    let mut site = Site::start_with(|c| {
        archive_to(c, Path::new(UNWRITABLE));
        let kek = c.data_dir.parent().unwrap().join("pki/spool.kek");
        sitegate::spool::keys::generate_kek(&kek).unwrap();
        c.spool.encryption.key_file = Some(kek);
        c.spool.encryption.kms_key_id = Some(key_id.clone());
        c.spool.encryption.endpoint = Some(relay.endpoint());
        c.spool.encryption.region = Some("us-east-1".into());
    })
    .await;
    let sensor = site.device("sensor-1").await;
    publish_marked(&site, &sensor, marker, 0, 4).await;
    let status = site.spool_status().await;
    assert_eq!(
        status.keys.wrapped_by.as_deref(),
        Some(format!("kms:{key_id}").as_str()),
        "{status:?}"
    );
    let data_dir = site.config.data_dir.clone();

    // KMS unreachable across a restart: data is still accepted, under the local key file.
    relay.set(false);
    site.restart(|_| {}).await;
    publish_marked(&site, &sensor, marker, 4, 4).await;
    let status = site.spool_status().await;
    assert_eq!(status.queues[0].records, 8, "{status:?}");
    assert_wrapped_by(&status, "file:");
    site.halt().await;
    assert_not_at_rest(&data_dir, marker);

    // KMS back and the sink writable: everything drains, in order.
    relay.set(true);
    let out = out_path(&site.config);
    site.restart(|c| archive_to(c, &out)).await;
    let lines = wait_lines(&out, 8).await;
    let ns: Vec<u64> = lines
        .iter()
        .map(|l| l["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (0..8).collect::<Vec<_>>());
    site.stop().await;
}

/// Publishes `count` incompressible QoS 1 messages with rumqttc and counts PUBACKs within `wait`.
async fn publish_counting_acks(
    site: &Site,
    sensor: &sitegate::identity::pki::IssuedDevice,
    count: usize,
    wait: Duration,
) -> usize {
    use rumqttc::{Event, Packet, QoS};
    let opts = site
        .credentials(sensor)
        .mqtt_options(site.addr, Duration::from_secs(30))
        .unwrap();
    let (client, mut events) = rumqttc::AsyncClient::new(opts, count + 10);
    for i in 0..count {
        let payload: Vec<u8> = (0..600u32)
            .map(|j| (j.wrapping_mul(2654435761).wrapping_add(i as u32 * 97) >> 13) as u8)
            .collect();
        client
            .publish("dt/sensor-1/blob", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut acks = 0;
    let deadline = tokio::time::Instant::now() + wait;
    while acks < count {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => break,
        }
    }
    acks
}

/// A site whose only queue holds 8 KiB and whose sink never accepts anything.
async fn site_with_a_tiny_stuck_queue(when_full: WhenFull) -> Site {
    Site::start_with(|c| {
        archive_to(c, Path::new(UNWRITABLE));
        c.spool.sinks.insert(
            "archive".into(),
            QueueOverride {
                max_bytes: Some(ByteSize(8 << 10)),
                when_full: Some(when_full),
                ..Default::default()
            },
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_withholds_pubacks_in_block_mode() {
    let site = site_with_a_tiny_stuck_queue(WhenFull::Block).await;
    let sensor = site.device("sensor-1").await;
    let acked = publish_counting_acks(&site, &sensor, 40, Duration::from_secs(3)).await;
    assert!(acked > 0 && acked < 40, "{acked} of 40 acknowledged");
    assert!(site.snapshot().spool_full_waits > 0);
    let status = site.spool_status().await;
    assert_eq!(
        status.queues[0].records as usize, acked,
        "every acknowledged message is spooled: {status:?}"
    );
    assert_eq!(status.queues[0].dropped_records, 0);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_drops_its_oldest_blocks_in_drop_oldest_mode() {
    let site = site_with_a_tiny_stuck_queue(WhenFull::DropOldest).await;
    let sensor = site.device("sensor-1").await;
    let acked = publish_counting_acks(&site, &sensor, 40, Duration::from_secs(20)).await;
    assert_eq!(acked, 40);
    let status = site.spool_status().await;
    let q = &status.queues[0];
    assert!(q.dropped_records > 0, "{status:?}");
    assert_eq!(q.records + q.dropped_records, 40, "{status:?}");
    assert!(q.bytes <= 8 << 10, "{status:?}");
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_republish_sink_feeds_local_subscribers() {
    use sitegate_plugins::republish::RepublishConfig;
    use sitegate_plugins::template::Template;
    let site = Site::start_with(|c| {
        c.sinks.insert(
            "local".into(),
            SinkConfig::Republish(RepublishConfig {
                topic: Template::parse("status/${thing_name}/relayed").unwrap(),
                qos: 1,
                retain: false,
                envelope: false,
            }),
        );
        c.routes.insert(
            "relay".into(),
            RouteConfig {
                from: "dt/+/alarm".into(),
                to: "local".into(),
            },
        );
    })
    .await;
    let sensor = site.device("sensor-1").await;
    let monitor = site.device("monitor-1").await;
    let sub = site.subscribe(&monitor, "status/#", false, &["-C", "1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let o = site
        .publish(&sensor, "dt/sensor-1/alarm", r#"{"door":"open"}"#, 1, false)
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = common::collect(sub, Duration::from_secs(10)).await;
    assert_eq!(out.trim(), r#"status/sensor-1/relayed {"door":"open"}"#);
    site.stop().await;
}
