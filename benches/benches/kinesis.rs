//! Kinesis: building PutRecords bodies (plain and KPL-aggregated) and draining a spool into a
//! local stand-in Kinesis endpoint over HTTP, through the real sink and the SDK.
//!
//! Prints, once, how many Kinesis records 1,000 device messages become with and without
//! aggregation (the per-shard record rate and the per-record cost follow from it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sitegate_plugins::kinesis::{fake::fake_kinesis, KinesisConfig, KinesisSink};
use sitegate_plugins::{Entry, Record, Sink};

fn records(count: u64, devices: u64) -> Vec<Record> {
    (0..count)
        .map(|n| Record {
            id: n + 1,
            entry: Entry {
                received_at_ms: 1_700_000_000_000 + n,
                thing_name: format!("freezer-{:04}", n % devices),
                cert_id: format!("{:064x}", n % devices),
                topic: format!("dt/freezer-{:04}/temp", n % devices),
                rule: "telemetry".into(),
                payload: Bytes::from(format!(
                    r#"{{"n":{n},"temp":-18.{},"door":"closed"}}"#,
                    n % 10
                )),
                template_values: Vec::new(),
            },
        })
        .collect()
}

fn sink(rt: &tokio::runtime::Runtime, endpoint: &str, aggregate: bool) -> KinesisSink {
    std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
    let mut config = KinesisConfig::for_stream("bench");
    config.endpoint = Some(endpoint.to_string());
    config.region = Some("us-east-1".into());
    config.aggregate = aggregate;
    config.aggregation_buckets = 16;
    rt.block_on(KinesisSink::new("bench", "plant-7", config))
}

fn kinesis(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (endpoint, log) = rt.block_on(fake_kinesis(|_, _| false));
    let plain = sink(&rt, &endpoint, false);
    let aggregated = sink(&rt, &endpoint, true);
    let batch = records(500, 100);

    let thousand = records(1000, 100);
    let (p, _) = plain.encode(&thousand);
    let (a, _) = aggregated.encode(&thousand);
    let mut per_shard = sink(&rt, &endpoint, true);
    // Four shards splitting the key space evenly, as CreateStream makes them.
    let quarter = u128::MAX / 4;
    per_shard.assume_shards(
        (0..4u128)
            .map(|i| sitegate_plugins::kinesis::shards::Shard {
                id: format!("shardId-{i:012}"),
                start: i * quarter + i.min(1),
                end: if i == 3 { u128::MAX } else { (i + 1) * quarter },
            })
            .collect(),
    );
    let (s, _) = per_shard.encode(&thousand);
    println!("Kinesis records per 1,000 device messages from 100 devices: plain {}, aggregated {} (16 buckets), {} (per shard, 4 shards)", p.len(), a.len(), s.len());

    let mut g = c.benchmark_group("kinesis_encode_500");
    g.throughput(Throughput::Elements(500));
    g.bench_function("plain", |b| b.iter(|| plain.encode(&batch)));
    g.bench_function("aggregated", |b| b.iter(|| aggregated.encode(&batch)));
    g.finish();

    // The drain's loop: read 500 from the spool, PutRecords to the local endpoint, acknowledge.
    let dir = tempfile::tempdir().unwrap();
    let spool = sitegate_benches::fixtures::open_spool(&rt, dir.path());
    let mut g = c.benchmark_group("kinesis_drain_500_from_spool_to_local_endpoint");
    g.throughput(Throughput::Elements(500));
    for (name, mut sink) in [("plain", plain), ("aggregated", aggregated)] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let entries: Vec<Entry> =
                        records(500, 100).into_iter().map(|r| r.entry).collect();
                    rt.block_on(spool.commit(&[("bench".to_string(), entries)]))
                        .unwrap();
                },
                |()| {
                    let batch = rt.block_on(spool.read("bench", 500)).unwrap();
                    let ack = rt.block_on(sink.send(&batch)).unwrap();
                    spool.ack("bench", batch[ack.done - 1].id).unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
    log.lock().unwrap().clear();
}

criterion_group!(benches, kinesis);
criterion_main!(benches);
