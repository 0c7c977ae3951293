#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Once;

use bytes::Bytes;

use super::fake::fake_kinesis;
use super::*;
use crate::record::sample;

fn fake_credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    });
}

async fn sink(endpoint: &str, max_attempts: u32) -> KinesisSink {
    fake_credentials();
    let mut config = KinesisConfig::for_stream("telemetry");
    config.endpoint = Some(endpoint.to_string());
    config.region = Some("us-east-1".into());
    config.max_attempts = max_attempts;
    KinesisSink::new("kinesis", "plant-7", config).await
}

fn batch(count: u64) -> Vec<Record> {
    (0..count)
        .map(|n| sample(n, &format!("pump-{}", n % 3), &format!(r#"{{"n":{n}}}"#)))
        .collect()
}

#[tokio::test]
async fn only_the_failed_entries_are_retried_in_their_order() {
    // First request: entries 1, 3 and 4 are throttled; every later request succeeds.
    let (endpoint, seen) = fake_kinesis(|req, n| req == 1 && matches!(n, 1 | 3 | 4)).await;
    let mut sink = sink(&endpoint, 5).await;
    let ack = sink.send(&batch(6)).await.unwrap();
    assert_eq!(ack, Ack::all(6));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec![vec![0, 1, 2, 3, 4, 5], vec![1, 3, 4]]);
    assert_eq!(sink.kinesis_records, 6);
}

#[tokio::test]
async fn entries_still_failing_leave_the_rest_to_the_spool() {
    // Entry 2 is throttled on every try: records 0 and 1 are done, 2 onwards go back.
    let (endpoint, seen) = fake_kinesis(|_, n| n == 2).await;
    let mut sink = sink(&endpoint, 3).await;
    let ack = sink.send(&batch(5)).await.unwrap();
    assert_eq!(ack.done, 2);
    assert_eq!(seen.lock().unwrap().len(), 3, "one request and two retries");
}

#[tokio::test]
async fn oversize_records_are_rejected_with_the_reason_not_sent() {
    let (endpoint, seen) = fake_kinesis(|_, _| false).await;
    let mut sink = sink(&endpoint, 1).await;
    let mut records = batch(3);
    records[1].entry.payload = Bytes::from(format!(
        r#"{{"n":1,"pad":"{}"}}"#,
        "x".repeat(MAX_RECORD_BYTES)
    ));
    let ack = sink.send(&records).await.unwrap();
    assert_eq!(ack.done, 3);
    assert_eq!(ack.rejected.len(), 1);
    assert_eq!(ack.rejected[0].index, 1);
    assert!(
        ack.rejected[0].reason.contains("at most 1048576"),
        "{}",
        ack.rejected[0].reason
    );
    assert_eq!(seen.lock().unwrap().clone(), vec![vec![0, 2]]);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_retryable_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sink = sink(&format!("http://127.0.0.1:{port}"), 1).await;
    let err = sink.send(&batch(2)).await.unwrap_err();
    assert!(err.retryable(), "{err}");
}

#[test]
fn requests_respect_the_count_and_size_limits() {
    let entry = |size: usize| Entry {
        key: "k".into(),
        data: vec![0; size],
        covers: vec![0],
        routed: None,
    };
    let counts: Vec<usize> = requests((0..1200).map(|_| entry(10)).collect())
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(counts, vec![500, 500, 200]);
    let big: Vec<usize> = requests((0..12).map(|_| entry(1 << 20)).collect())
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(
        big,
        vec![4, 4, 4],
        "5 MiB per request, counting partition keys"
    );
}

#[tokio::test]
async fn aggregation_keeps_each_device_in_one_bucket_and_fewer_records() {
    let (endpoint, seen) = fake_kinesis(|_, _| false).await;
    let _ = seen;
    let mut sink = sink(&endpoint, 1).await;
    sink.config.aggregate = true;
    sink.config.aggregation_buckets = 4;
    let (entries, rejected) = sink.entries(&batch(300));
    assert!(rejected.is_empty());
    assert!(
        entries.len() <= 3,
        "three devices, at most three buckets: {}",
        entries.len()
    );
    for e in &entries {
        assert!(e.data.starts_with(&aggregate::MAGIC));
        assert!(e.key.starts_with("plant-7-agg-"));
        assert!(
            e.covers.windows(2).all(|w| w[0] < w[1]),
            "records keep their order inside an aggregate"
        );
    }
    let covered: usize = entries.iter().map(|e| e.covers.len()).sum();
    assert_eq!(covered, 300);
}

#[tokio::test]
async fn aggregates_are_packed_per_shard_and_routed_into_its_range() {
    let (endpoint, _) = fake_kinesis(|_, _| false).await;
    let mut sink = sink(&endpoint, 1).await;
    sink.config.aggregate = true;
    let half = u128::MAX / 2;
    sink.assume_shards(vec![
        Shard {
            id: "shardId-000000000000".into(),
            start: 0,
            end: half,
        },
        Shard {
            id: "shardId-000000000001".into(),
            start: half + 1,
            end: u128::MAX,
        },
    ]);
    let records: Vec<Record> = (0..400)
        .map(|n| {
            let mut r = batch(1).remove(0);
            r.id = n + 1;
            r.entry.thing_name = format!("dev-{}", n % 40);
            r
        })
        .collect();
    let (entries, rejected) = sink.entries(&records);
    assert!(rejected.is_empty());
    assert_eq!(
        entries.len(),
        2,
        "forty devices, two shards: two aggregates"
    );
    for e in &entries {
        let (hash, shard) = e.routed.clone().expect("routed to a shard");
        let hash: u128 = hash.parse().unwrap();
        let want = if shard.ends_with('0') {
            0..=half
        } else {
            half + 1..=u128::MAX
        };
        assert!(
            want.contains(&hash),
            "the explicit hash key is in {shard}'s range"
        );
        // Every record inside belongs to that shard.
        for &i in &e.covers {
            assert!(want.contains(&shards::hash_key(&records[i].entry.thing_name)));
        }
    }
    let covered: usize = entries.iter().map(|e| e.covers.len()).sum();
    assert_eq!(covered, 400);
}
