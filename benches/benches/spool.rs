//! The spool's write and drain paths against the plainest durable peer.
//!
//! - `commit/*`: one group commit of N 100-byte records: encode, LZ4, AES-256-GCM seal, sled
//!   insert and flush (fsync). The peer, `raw_fs_append_fsync/*`, appends the same records'
//!   bytes to a file with `std::fs` and fsyncs at the same cadence (once per N records).
//! - `drain`: read 500 records from a full queue, decrypt, and acknowledge them (deleting
//!   blocks), as a sink's drain does.
//!
//! - `session_queue_<N>/*`: N QoS 1 messages for persistent sessions whose device is away
//!   (MQTT 5 PUBLISH packets of the same 100-byte payloads, each with its queued-at time),
//!   each sealed and put into the `session_messages` tree in one batch, then flushed, as the
//!   offline queues do for one handover to the fabric; in the same group the group commit of
//!   the same N records, its peer. N = 1 is one publish at a time.
//!
//! Throughput is per record, so criterion prints records/s; MB/s is records/s × 100 bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sitegate_plugins::Entry;

const PAYLOAD: usize = 100;

fn entry(n: u64) -> Entry {
    // 100 bytes of JSON telemetry, varied so compression does not flatter us.
    let mut payload = format!(
        r#"{{"n":{n},"temp":{}.{},"hum":{},"door":"closed","pad":""#,
        20 + n % 9,
        n % 10,
        40 + n % 13
    );
    while payload.len() < PAYLOAD - 2 {
        payload.push(char::from(
            b'a' + (n.wrapping_mul(31).wrapping_add(payload.len() as u64) % 26) as u8,
        ));
    }
    payload.push_str("\"}");
    Entry {
        received_at_ms: 1_700_000_000_000 + n,
        thing_name: format!("freezer-{:04}", n % 1000),
        cert_id: format!("{:064x}", n % 1000),
        topic: format!("dt/freezer-{:04}/temp", n % 1000),
        rule: "telemetry".into(),
        payload: Bytes::from(payload),
        template_values: Vec::new(),
    }
}

/// The bytes a plain appender would write for the same records (the fields, length-prefixed).
fn raw_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in entries {
        for f in [
            d.thing_name.as_bytes(),
            d.cert_id.as_bytes(),
            d.topic.as_bytes(),
            d.rule.as_bytes(),
            &d.payload,
        ] {
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
    }
    out
}

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for batch in [100usize, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let spool = sitegate_benches::fixtures::open_spool(&rt, dir.path());
        let entries: Vec<Entry> = (0..batch as u64).map(entry).collect();
        let raw = raw_bytes(&entries);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("raw.log"))
            .unwrap();

        let mut g = c.benchmark_group(format!("spool_write_{batch}_per_fsync"));
        g.throughput(Throughput::Elements(batch as u64));
        let batches = vec![("bench".to_string(), entries)];
        g.bench_function("commit_encrypted_sled", |b| {
            b.iter(|| rt.block_on(spool.commit(&batches)).unwrap());
        });
        g.bench_function("raw_fs_append_fsync", |b| {
            b.iter(|| {
                file.write_all(&raw).unwrap();
                file.sync_data().unwrap();
            });
        });
        g.finish();
    }
}

fn drain(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = sitegate_benches::fixtures::open_spool(&rt, dir.path());
    let mut g = c.benchmark_group("spool_drain");
    g.throughput(Throughput::Elements(500));
    let mut next = 0u64;
    g.bench_function("read_500_decrypt_ack", |b| {
        b.iter_batched(
            || {
                let entries: Vec<Entry> = (next..next + 500).map(entry).collect();
                next += 500;
                rt.block_on(spool.commit(&[("bench".to_string(), entries)]))
                    .unwrap();
            },
            |()| {
                let records = rt.block_on(spool.read("bench", 500)).unwrap();
                assert_eq!(records.len(), 500);
                spool.ack("bench", records[499].id).unwrap();
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

/// A queued message's bytes: queued-at time, then an MQTT 5 PUBLISH packet of the record's
/// topic and payload (what the edge writes; the spool sees opaque bytes).
fn queued_message(d: &Entry) -> Vec<u8> {
    let mut out = 1_700_000_000_000u64.to_le_bytes().to_vec();
    let len = 2 + d.topic.len() + 2 + 1 + d.payload.len();
    out.push(0x32);
    out.push(len as u8);
    out.extend_from_slice(&(d.topic.len() as u16).to_be_bytes());
    out.extend_from_slice(d.topic.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.push(0);
    out.extend_from_slice(&d.payload);
    out
}

fn session_queue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for queued in [1usize, 100] {
        let dir = tempfile::tempdir().unwrap();
        let spool = sitegate_benches::fixtures::open_spool(&rt, dir.path());
        let entries: Vec<Entry> = (0..queued as u64).map(entry).collect();
        let messages: Vec<Vec<u8>> = entries.iter().map(queued_message).collect();
        let ids: Vec<String> = (0..queued)
            .map(|i| format!("freezer-{:04}", i % 1000))
            .collect();
        let batches = vec![("bench".to_string(), entries)];
        let mut g = c.benchmark_group(format!("session_queue_{queued}"));
        g.throughput(Throughput::Elements(queued as u64));
        let mut seq = 0u64;
        g.bench_function("put_session_messages_flush", |b| {
            b.iter(|| {
                seq += 1;
                let rows: Vec<(&str, u64, &[u8])> = ids
                    .iter()
                    .zip(&messages)
                    .map(|(id, m)| (id.as_str(), seq, m.as_slice()))
                    .collect();
                rt.block_on(async {
                    spool.put_session_messages(&rows).await.unwrap();
                    spool.flush().await.unwrap();
                });
            });
        });
        g.bench_function("commit_encrypted_sled", |b| {
            b.iter(|| rt.block_on(spool.commit(&batches)).unwrap());
        });
        g.finish();
    }
}

criterion_group!(benches, commit, drain, session_queue);
criterion_main!(benches);
