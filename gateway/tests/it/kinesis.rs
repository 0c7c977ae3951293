//! The Kinesis sink end to end: devices publish through a running gateway, records land in a
//! stream on moto_server and are read back with the AWS SDK; aggregated records are
//! de-aggregated with AWS's own aws-kinesis-agg (Python).

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use common::aws::{Moto, Relay, StreamRecord};
use common::{simulate, text, Site};
use sitegate::config::{Config, RouteConfig};
use sitegate_plugins::kinesis::KinesisConfig;
use sitegate_plugins::SinkConfig;

fn route_to_kinesis(config: &mut Config, endpoint: &str, stream: &str, aggregate: bool) {
    let mut k = KinesisConfig::for_stream(stream);
    k.endpoint = Some(endpoint.to_string());
    k.region = Some("us-east-1".into());
    k.aggregate = aggregate;
    k.aggregation_buckets = 4;
    config
        .sinks
        .insert("telemetry".into(), SinkConfig::Kinesis(k));
    config.routes.insert(
        "raw".into(),
        RouteConfig {
            from: "dt/#".into(),
            to: "telemetry".into(),
        },
    );
}

async fn wait_records(moto: &Moto, stream: &str, at_least: usize) -> Vec<StreamRecord> {
    for _ in 0..200 {
        let records = moto.read_stream(stream).await;
        if records.len() >= at_least {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stream {stream} never held {at_least} records");
}

fn json(data: &[u8]) -> serde_json::Value {
    serde_json::from_slice(data).unwrap()
}

/// `(thing, n)` of every envelope, grouped by thing in arrival order.
fn per_thing(envelopes: &[serde_json::Value]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in envelopes {
        out.entry(e["thing_name"].as_str().unwrap().to_string())
            .or_default()
            .push(e["payload"]["n"].as_u64().unwrap());
    }
    out
}

async fn publish_from(
    site: &Site,
    things: &[&str],
    per_thing: u64,
) -> Vec<sitegate::identity::pki::IssuedDevice> {
    let mut devices = Vec::new();
    for t in things {
        devices.push(site.device(t).await);
    }
    for n in 0..per_thing {
        for d in &devices {
            let o = site
                .publish(
                    d,
                    &format!("dt/{}/temp", d.thing),
                    &format!(r#"{{"n":{n},"t":-18}}"#),
                    1,
                    n % 2 == 0,
                )
                .await;
            assert!(o.status.success(), "{}", text(&o));
        }
    }
    devices
}

#[tokio::test(flavor = "multi_thread")]
async fn records_keep_the_device_identity_and_partition_key() {
    let moto = Moto::start().await;
    moto.create_stream("site-telemetry", 2).await;
    let site =
        Site::start_with(|c| route_to_kinesis(c, &moto.endpoint, "site-telemetry", false)).await;
    let devices = publish_from(&site, &["sensor-1", "sensor-2", "door-3"], 4).await;
    let records = wait_records(&moto, "site-telemetry", 12).await;
    assert_eq!(records.len(), 12);
    let envelopes: Vec<_> = records.iter().map(|r| json(&r.data)).collect();
    for (r, e) in records.iter().zip(&envelopes) {
        assert_eq!(
            r.partition_key, e["thing_name"],
            "partition key is the thing name"
        );
        let device = devices.iter().find(|d| d.thing == r.partition_key).unwrap();
        assert_eq!(e["cert_id"], device.cert_id);
        assert_eq!(e["topic"], format!("dt/{}/temp", device.thing));
        assert_eq!(e["rule"], "raw");
        assert_eq!(e["site"], "test");
        assert!(e["record_id"].as_u64().unwrap() >= 1);
    }
    for (thing, ns) in per_thing(&envelopes) {
        assert_eq!(
            ns,
            vec![0, 1, 2, 3],
            "{thing}'s records in order on its shard"
        );
    }
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_buffers_in_the_spool_and_drains_after_with_nothing_lost() {
    let moto = Moto::start().await;
    moto.create_stream("site-telemetry", 1).await;
    let relay = Relay::start(&moto.endpoint).await;
    relay.set(false);
    let site =
        Site::start_with(|c| route_to_kinesis(c, &relay.endpoint(), "site-telemetry", false)).await;
    publish_from(&site, &["sensor-1", "sensor-2"], 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = site.spool_status().await;
    assert_eq!(
        status.queues[0].records, 10,
        "held in the spool during the outage: {status:?}"
    );
    assert!(moto.read_stream("site-telemetry").await.is_empty());
    site.wait_for("a failed send", |s| s.sink_send_failures > 0)
        .await;
    // Long enough for the drain's backoff to reach its cap.
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.set(true);
    let back = std::time::Instant::now();
    let records = wait_records(&moto, "site-telemetry", 10).await;
    // A figure for the record, not a bound.
    println!(
        "Kinesis: records in the stream {:?} after the endpoint returned (backoff cap {:?})",
        back.elapsed(),
        sitegate::delivery::drain::BACKOFF_MAX
    );
    assert_eq!(records.len(), 10);
    let envelopes: Vec<_> = records.iter().map(|r| json(&r.data)).collect();
    for (_, ns) in per_thing(&envelopes) {
        assert_eq!(ns, vec![0, 1, 2, 3, 4]);
    }
    for _ in 0..50 {
        if site.spool_status().await.queues[0].records == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(site.spool_status().await.queues[0].records, 0);
    site.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregated_records_deaggregate_with_aws_kinesis_agg() {
    let moto = Moto::start().await;
    moto.create_stream("site-telemetry", 2).await;
    let site =
        Site::start_with(|c| route_to_kinesis(c, &moto.endpoint, "site-telemetry", true)).await;
    let things = ["sensor-1", "sensor-2", "door-3", "door-4", "sensor-5"];
    let per = 6;
    // Publish everything before the drain's linger runs out, so aggregates fill up.
    publish_from(&site, &things, per).await;
    let expected = things.len() * per as usize;
    let (raw, users) = read_deaggregated(&moto, "site-telemetry", expected).await;
    assert_eq!(users.len(), expected, "every device message comes back out");
    assert!(
        raw.len() < expected,
        "{} Kinesis records for {expected} messages",
        raw.len()
    );
    println!(
        "{} Kinesis records carried {expected} device messages",
        raw.len()
    );
    let mut envelopes = Vec::new();
    for u in &users {
        let data = base64::engine::general_purpose::STANDARD
            .decode(u["data"].as_str().unwrap())
            .unwrap();
        let e = json(&data);
        assert_eq!(
            u["partitionKey"], e["thing_name"],
            "the user record keeps its own partition key"
        );
        envelopes.push(e);
    }
    for (thing, ns) in per_thing(&envelopes) {
        assert_eq!(ns, (0..per).collect::<Vec<_>>(), "{thing}");
    }
    site.stop().await;
}

/// The stream's records and the user records aws-kinesis-agg finds in them, once there are
/// `expected` of those (or after 20 s).
async fn read_deaggregated(
    moto: &Moto,
    stream: &str,
    expected: usize,
) -> (Vec<StreamRecord>, Vec<serde_json::Value>) {
    let mut found = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let raw = moto.read_stream(stream).await;
        let users = deaggregate(&raw).await;
        let done = users.len() >= expected;
        found = (raw, users);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    found
}

async fn deaggregate(raw: &[StreamRecord]) -> Vec<serde_json::Value> {
    // moto numbers records per shard, so the sequence number given here is the record's place
    // in `raw`: each user record names the Kinesis record it came in.
    let input: Vec<serde_json::Value> = raw
        .iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::json!({
                "partitionKey": r.partition_key,
                "sequenceNumber": i.to_string(),
                "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
            })
        })
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/deaggregate.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "aws-kinesis-agg (pip install aws-kinesis-agg): {}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_sends_to_an_emulated_kinesis() {
    let moto = Moto::start().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sitegate"))
        .args([
            "demo",
            "--seconds",
            "3",
            "--kinesis-endpoint",
            &moto.endpoint,
        ])
        .env("AWS_REGION", "us-east-1")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let records = moto.read_stream("sitegate-demo").await;
    assert!(!records.is_empty(), "{}", text(&out));
    let e = json(&records[0].data);
    assert_eq!(e["site"], "demo");
    assert_eq!(records[0].partition_key, e["thing_name"]);
}

/// A frozen endpoint (it accepts connections and never answers) is reported after one
/// attempt, not after `max_attempts` attempt timeouts: the drain counts the failure while
/// the endpoint has seen a single connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_endpoint_is_reported_at_the_first_failed_attempt() {
    common::aws::fake_credentials();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    let site = Site::start_with(|c| route_to_kinesis(c, &endpoint, "site-telemetry", false)).await;
    let started = std::time::Instant::now();
    publish_from(&site, &["sensor-1"], 1).await;
    for _ in 0..600 {
        if site.snapshot().sink_send_failures > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_report = accepted.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "frozen Kinesis endpoint reported after {:?} ({at_report} connection)",
        started.elapsed()
    );
    assert!(site.snapshot().sink_send_failures > 0, "never reported");
    assert_eq!(
        at_report, 1,
        "attempts were retried inside the sink before the drain heard"
    );
    assert_eq!(
        site.spool_status().await.queues[0].records,
        1,
        "kept in the spool"
    );
    site.stop().await;
}

/// A steady flow, as a site has it, packed per destination shard as the KPL does: 10 devices
/// publishing for 5 s into a 2-shard stream. aws-kinesis-agg gives back every acknowledged
/// message with its own partition key, each device's messages all came on the one shard its
/// key hashes to (MD5 into the ListShards ranges), in order. Prints the records and 25 KB
/// payload units per message for the closing note (issue 19: the linger is the knob).
#[tokio::test(flavor = "multi_thread")]
async fn a_steady_flow_is_packed_per_destination_shard() {
    let moto = Moto::start().await;
    moto.create_stream("steady", 2).await;
    let site = Site::start_with(|c| route_to_kinesis(c, &moto.endpoint, "steady", true)).await;
    let s = simulate(
        &site,
        &[
            "--devices",
            "10",
            "--rate",
            "400",
            "--duration",
            "5",
            "--prefix",
            "sensor",
            "--profile",
            "freezer",
            "--approve-as",
            "sensors",
            "--quiet",
        ],
    )
    .await;
    let expected = s.acknowledged as usize;
    assert!(expected > 0, "{s:?}");
    let (raw, users) = read_deaggregated(&moto, "steady", expected).await;
    assert_eq!(
        users.len(),
        expected,
        "every acknowledged message comes back out"
    );

    let k = moto.kinesis(&moto.endpoint).await;
    let listed = k.list_shards().stream_name("steady").send().await.unwrap();
    let ranges: Vec<(String, u128, u128)> = listed
        .shards()
        .iter()
        .map(|s| {
            let r = s.hash_key_range().unwrap();
            (
                s.shard_id().to_string(),
                r.starting_hash_key().parse().unwrap(),
                r.ending_hash_key().parse().unwrap(),
            )
        })
        .collect();
    let mut envelopes = Vec::new();
    for u in &users {
        let key = u["partitionKey"].as_str().unwrap();
        let carrier: usize = u["sequenceNumber"].as_str().unwrap().parse().unwrap();
        let landed = raw[carrier].shard_id.as_str();
        let hash = sitegate_plugins::kinesis::shards::hash_key(key);
        let (own, ..) = ranges
            .iter()
            .find(|(_, start, end)| (*start..=*end).contains(&hash))
            .unwrap();
        assert_eq!(landed, own, "{key} lands on the shard its key hashes to");
        let data = base64::engine::general_purpose::STANDARD
            .decode(u["data"].as_str().unwrap())
            .unwrap();
        let e = json(&data);
        assert_eq!(u["partitionKey"], e["thing_name"]);
        envelopes.push(e);
    }
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &envelopes {
        seqs.entry(e["thing_name"].as_str().unwrap().to_string())
            .or_default()
            .push(e["payload"]["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs.len(), 10);
    for (thing, ns) in seqs {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{thing} in order: {ns:?}"
        );
    }
    let units: usize = raw
        .iter()
        .map(|r| (r.data.len() + r.partition_key.len()).div_ceil(25 * 1024))
        .sum();
    println!(
        "steady flow: {expected} messages in {} Kinesis records ({:.1} messages per record), {units} PUT payload units ({:.1} messages per unit), {} shards",
        raw.len(),
        expected as f64 / raw.len() as f64,
        expected as f64 / units as f64,
        ranges.len()
    );
    site.stop().await;
}
