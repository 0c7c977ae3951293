use std::collections::VecDeque;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use super::{EncryptionConfig, SpoolConfig};

fn config(dir: &Path, max_bytes: u64, when_full: WhenFull) -> SpoolConfig {
    SpoolConfig {
        max_bytes: sitegate_plugins::units::ByteSize(max_bytes),
        when_full,
        encryption: EncryptionConfig {
            key_file: Some(dir.join("kek")),
            ..EncryptionConfig::default()
        },
        ..SpoolConfig::default()
    }
}

async fn open(dir: &Path, cfg: &SpoolConfig, sinks: &[&str]) -> Spool {
    reopen(dir, cfg, sinks).await
}

fn entry(n: u64) -> Entry {
    Entry {
        received_at_ms: n,
        thing_name: format!("pump-{}", n % 7),
        cert_id: "c".repeat(64),
        topic: format!("dt/pump-{}/t", n % 7),
        rule: "raw".into(),
        payload: Bytes::from(format!("{{\"n\":{n}}}")),
        template_values: Vec::new(),
    }
}

/// Bytes LZ4 cannot shrink, so stored sizes are predictable.
fn incompressible(len: usize, seed: u64) -> Bytes {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn n_of(r: &Record) -> u64 {
    r.received_at_ms
}

#[tokio::test]
async fn appends_read_back_in_order_and_acks_delete_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
    let spool = open(dir.path(), &cfg, &["a", "b"]).await;
    spool
        .commit(&[
            ("a".into(), (0..5).map(entry).collect()),
            ("b".into(), vec![entry(100)]),
        ])
        .await
        .unwrap();
    spool
        .commit(&[("a".into(), (5..8).map(entry).collect())])
        .await
        .unwrap();
    let got = spool.read("a", 100).await.unwrap();
    assert_eq!(
        got.iter().map(n_of).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    assert_eq!(
        got.iter().map(|r| r.id).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    spool.ack("a", 6).unwrap();
    let rest = spool.read("a", 100).await.unwrap();
    assert_eq!(rest.iter().map(n_of).collect::<Vec<_>>(), vec![6, 7]);
    let status = spool.status().await;
    assert_eq!(status.queues[0].records, 2);
    assert_eq!(
        status.queues[0].blocks, 1,
        "the fully acknowledged first block is gone"
    );
    assert_eq!(status.queues[1].records, 1);
}

#[tokio::test]
async fn damaged_blocks_are_quarantined_and_the_rest_drains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
    {
        let spool = open(dir.path(), &cfg, &["a"]).await;
        for i in 0..3 {
            spool.commit(&[("a".into(), vec![entry(i)])]).await.unwrap();
        }
        spool.flush().await.unwrap();
    }
    {
        // Flip one byte in the middle block, as a failing disk would.
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let tree = db.open_tree("spool:a").unwrap();
        let key = 2u64.to_be_bytes();
        let mut value = tree.get(key).unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0xff;
        tree.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    let spool = open(dir.path(), &cfg, &["a"]).await;
    let got = spool.read("a", 10).await.unwrap();
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![0, 2]);
    let status = spool.status().await;
    assert_eq!(status.queues[0].quarantined_blocks, 1);
    drop(spool);
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .unwrap();
    assert_eq!(
        status::offline(&db, dir.path()).unwrap().queues[0].quarantined_blocks,
        1
    );
}

#[tokio::test]
async fn block_mode_refuses_when_full_and_drop_oldest_evicts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4096, WhenFull::Block);
    let spool = open(dir.path(), &cfg, &["a"]).await;
    let big = |n| Entry {
        payload: incompressible(1500, n),
        ..entry(n)
    };
    spool.commit(&[("a".into(), vec![big(1)])]).await.unwrap();
    spool.commit(&[("a".into(), vec![big(2)])]).await.unwrap();
    let err = spool
        .commit(&[("a".into(), vec![big(3)])])
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert!(err.to_string().contains("full"));
    // Delivering frees room.
    spool.ack("a", 1).unwrap();
    spool.commit(&[("a".into(), vec![big(3)])]).await.unwrap();
    drop(spool);

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4096, WhenFull::DropOldest);
    let spool = open(dir.path(), &cfg, &["a"]).await;
    let big = |n| Entry {
        payload: incompressible(1500, n),
        ..entry(n)
    };
    for n in 1..=6 {
        spool.commit(&[("a".into(), vec![big(n)])]).await.unwrap();
    }
    let got = spool.read("a", 10).await.unwrap();
    assert_eq!(got.last().map(n_of), Some(6), "the newest survives");
    assert!(got.len() < 6);
    let status = spool.status().await;
    assert_eq!(status.queues[0].dropped_records, 6 - got.len() as u64);
    assert!(status.queues[0].bytes <= 4096);
}

#[tokio::test]
async fn a_wrong_key_file_keeps_blocks_instead_of_destroying_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
    {
        let spool = open(dir.path(), &cfg, &["a"]).await;
        spool.commit(&[("a".into(), vec![entry(1)])]).await.unwrap();
    }
    std::fs::remove_file(dir.path().join("kek")).unwrap();
    keys::generate_kek(&dir.path().join("kek")).unwrap();
    let spool = open(dir.path(), &cfg, &["a"]).await;
    let err = spool.read("a", 10).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    assert!(err.to_string().contains("configured key file"), "{err}");
    assert_eq!(spool.status().await.queues[0].records, 1);
    assert_eq!(spool.status().await.queues[0].quarantined_blocks, 0);
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Read(u8),
    AckSome(u8),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..30).prop_map(Op::Append),
        3 => (1u8..40).prop_map(Op::Read),
        3 => any::<u8>().prop_map(Op::AckSome),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Against a plain queue: whatever sequence of appends, reads, acknowledgements and clean
    /// restarts, reads return exactly the unacknowledged records, in order, with stable ids.
    #[test]
    fn behaves_like_a_queue(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
            let mut spool = Some(open(dir.path(), &cfg, &["q"]).await);
            let mut model: VecDeque<(u64, u64)> = VecDeque::new(); // (id, n)
            let mut next_n = 0u64;
            let mut last_read: Vec<Record> = Vec::new();
            for op in ops {
                let s = spool.as_ref().unwrap();
                match op {
                    Op::Append(k) => {
                        let entries: Vec<_> = (0..u64::from(k)).map(|i| entry(next_n + i)).collect();
                        s.commit(&[("q".into(), entries)]).await.unwrap();
                        let first_id = model.back().map(|(id, _)| id + 1);
                        let _ = first_id;
                        for i in 0..u64::from(k) {
                            model.push_back((0, next_n + i));
                        }
                        next_n += u64::from(k);
                    }
                    Op::Read(max) => {
                        last_read = s.read("q", usize::from(max)).await.unwrap();
                        let expect: Vec<u64> = model.iter().take(usize::from(max)).map(|(_, n)| *n).collect();
                        let got: Vec<u64> = last_read.iter().map(n_of).collect();
                        prop_assert_eq!(&got, &expect);
                        for (slot, r) in model.iter_mut().zip(&last_read) {
                            prop_assert!(slot.0 == 0 || slot.0 == r.id, "ids are stable across reads");
                            slot.0 = r.id;
                        }
                        prop_assert!(last_read.windows(2).all(|w| w[0].id < w[1].id));
                    }
                    Op::AckSome(k) => {
                        if !last_read.is_empty() {
                            let upto = usize::from(k) % last_read.len();
                            let through = last_read[upto].id;
                            s.ack("q", through).unwrap();
                            while model.front().is_some_and(|(id, _)| *id != 0 && *id <= through) {
                                model.pop_front();
                            }
                            last_read.clear();
                        }
                    }
                    Op::Restart => {
                        let s = spool.take().unwrap();
                        s.flush().await.unwrap();
                        drop(s);
                        spool = Some(open(dir.path(), &cfg, &["q"]).await);
                        last_read.clear();
                    }
                }
            }
            let s = spool.as_ref().unwrap();
            let rest: Vec<u64> = s.read("q", usize::MAX).await.unwrap().iter().map(n_of).collect();
            let expect: Vec<u64> = model.iter().map(|(_, n)| *n).collect();
            prop_assert_eq!(rest, expect);
            prop_assert_eq!(s.status().await.queues[0].records, model.len() as u64);
            Ok(())
        })?;
    }
}

/// The store of `dir` through [`store::open`], waiting for a dropped one's lock to go.
async fn open_store(dir: &Path) -> (sled::Db, store::Repairs) {
    for _ in 0..200 {
        match store::open(dir, store::OnDamage::SetAside) {
            Ok(opened) => return opened,
            Err(store::StoreError::Locked { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("store still locked");
}

async fn reopen(dir: &Path, cfg: &SpoolConfig, sinks: &[&str]) -> Spool {
    if cfg.encryption.key_file.is_some() && !dir.join("kek").exists() {
        keys::generate_kek(&dir.join("kek")).unwrap();
    }
    let (db, _) = open_store(dir).await;
    Spool::open(db, cfg, dir, sinks.iter().map(|s| s.to_string()))
        .await
        .unwrap()
}

/// Blocks of queue `q` as stored, by first id.
fn stored_blocks(db: &sled::Db, sink: &str) -> Vec<(u64, Vec<u8>)> {
    db.open_tree(format!("{TREE_PREFIX}{sink}"))
        .unwrap()
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (
                u64::from_be_bytes(k.as_ref().try_into().unwrap()),
                v.to_vec(),
            )
        })
        .collect()
}

#[tokio::test]
async fn records_a_store_lost_are_counted_once_and_their_ids_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
    {
        let spool = reopen(dir.path(), &cfg, &["a"]).await;
        for i in 0..3 {
            let entries = (i * 3..i * 3 + 3).map(entry).collect();
            spool.commit(&[("a".into(), entries)]).await.unwrap();
        }
        spool.ack("a", 2).unwrap();
        spool.settle().await.unwrap();
    }
    {
        // The last block goes, as with a truncated log.
        let (db, _) = open_store(dir.path()).await;
        db.open_tree("spool:a")
            .unwrap()
            .remove(7u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let spool = reopen(dir.path(), &cfg, &["a"]).await;
    assert_eq!(spool.lost_records("a"), 3);
    assert_eq!(spool.status().await.queues[0].lost_records, 3);
    let left: Vec<u64> = spool
        .read("a", 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, vec![3, 4, 5, 6]);
    spool
        .commit(&[("a".into(), vec![entry(99)])])
        .await
        .unwrap();
    let ids: Vec<u64> = spool
        .read("a", 100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        ids,
        vec![3, 4, 5, 6, 10],
        "ids 7..=9 were promised once and are not reused"
    );
    spool.settle().await.unwrap();
    drop(spool);
    let spool = reopen(dir.path(), &cfg, &["a"]).await;
    assert_eq!(
        spool.lost_records("a"),
        3,
        "counted once, not again at each start"
    );
}

#[tokio::test]
async fn a_store_set_aside_keeps_its_keys_and_recover_brings_its_records_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
    {
        let spool = reopen(dir.path(), &cfg, &["a", "b"]).await;
        spool
            .commit(&[
                ("a".into(), (0..5).map(entry).collect()),
                ("b".into(), vec![entry(50)]),
            ])
            .await
            .unwrap();
        spool
            .commit(&[("a".into(), (5..8).map(entry).collect())])
            .await
            .unwrap();
        spool.ack("a", 3).unwrap();
        spool.settle().await.unwrap();
    }
    // The whole store is lost (as when sled cannot open it and it is set aside).
    let damaged = dir.path().join("db.damaged-1");
    for _ in 0..100 {
        if std::fs::rename(dir.path().join("db"), &damaged).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let spool = reopen(dir.path(), &cfg, &["a", "b"]).await;
    assert_eq!((spool.lost_records("a"), spool.lost_records("b")), (5, 1));
    // Devices go on being served while the old store waits.
    spool
        .commit(&[("a".into(), vec![entry(100)])])
        .await
        .unwrap();
    let report = salvage::recover(&spool, &damaged).await.unwrap();
    assert_eq!(report.recovered.get("a"), Some(&5));
    assert_eq!(report.recovered.get("b"), Some(&1));
    assert!(report.still_lost.is_empty(), "{report:?}");
    let a: Vec<u64> = spool
        .read("a", 100)
        .await
        .unwrap()
        .iter()
        .map(n_of)
        .collect();
    assert_eq!(
        a,
        vec![100, 3, 4, 5, 6, 7],
        "recovered records follow what arrived meanwhile"
    );
    assert_eq!(spool.lost_records("a"), 0);
    let again = salvage::recover(&spool, &damaged).await.unwrap();
    assert!(
        again.recovered.is_empty(),
        "nothing is recovered twice: {again:?}"
    );
}

#[tokio::test]
async fn a_deleted_default_key_file_is_an_error_while_blocks_wait() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig::default();
    {
        let spool = reopen(dir.path(), &cfg, &["a"]).await;
        spool.commit(&[("a".into(), vec![entry(1)])]).await.unwrap();
        spool.settle().await.unwrap();
    }
    std::fs::remove_file(dir.path().join("spool.kek")).unwrap();
    let (db, _) = open_store(dir.path()).await;
    let err = Spool::open(db.clone(), &cfg, dir.path(), ["a".to_string()])
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("spool.kek is missing"), "{err}");
    assert!(err.contains("1 sealed blocks"), "{err}");
    assert!(
        !dir.path().join("spool.kek").exists(),
        "no new key is made over the old one"
    );
    // Once the queue is empty (here: acknowledged by hand), a new key may be made.
    db.open_tree("spool:a").unwrap().clear().unwrap();
    let spool = Spool::open(db, &cfg, dir.path(), ["a".to_string()])
        .await
        .unwrap();
    spool.commit(&[("a".into(), vec![entry(2)])]).await.unwrap();
    assert!(dir.path().join("spool.kek").exists());
}

#[tokio::test]
async fn below_the_disk_reserve_block_waits_and_drop_oldest_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
    let mut spool = open(dir.path(), &cfg, &["a"]).await;
    spool.commit(&[("a".into(), vec![entry(1)])]).await.unwrap();
    spool.disk = DiskGuard::new(dir.path(), u64::MAX / 4);
    let err = spool
        .commit(&[("a".into(), vec![entry(2)])])
        .await
        .unwrap_err();
    assert!(matches!(err, SpoolError::DiskLow(_)), "{err}");
    assert!(err.retryable());
    assert_eq!(spool.status().await.queues[0].records, 1, "nothing written");
    drop(spool);

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1 << 30, WhenFull::DropOldest);
    let mut spool = open(dir.path(), &cfg, &["a"]).await;
    for i in 0..3 {
        spool.commit(&[("a".into(), vec![entry(i)])]).await.unwrap();
    }
    spool.disk = DiskGuard::new(dir.path(), u64::MAX / 4);
    spool.commit(&[("a".into(), vec![entry(3)])]).await.unwrap();
    let left: Vec<u64> = spool
        .read("a", 10)
        .await
        .unwrap()
        .iter()
        .map(n_of)
        .collect();
    assert_eq!(
        left,
        vec![1, 2, 3],
        "the oldest block made room for the newest"
    );
    assert_eq!(spool.status().await.queues[0].dropped_records, 1);
}

#[derive(Debug, Clone)]
enum Damage {
    /// Blocks from this one on are gone (a truncated log).
    Truncate(u8),
    /// These blocks are gone.
    Holes(Vec<u8>),
    /// The whole store is set aside; `spool recover` then reads it.
    LoseStore,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<u8>().prop_map(Damage::Truncate),
        prop::collection::vec(any::<u8>(), 1..4).prop_map(Damage::Holes),
        Just(Damage::LoseStore),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever part of the store is lost after a clean stop, the next start accounts for
    /// every record acknowledged to a device: each is readable or counted lost, never both,
    /// ids are never handed out twice, and `spool recover` over a lost store gets all back.
    #[test]
    fn every_promised_record_is_readable_or_counted_lost(
        sizes in prop::collection::vec(1u8..6, 1..8),
        acked_blocks in 0usize..8,
        damage in damage(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let cfg = config(dir.path(), 1 << 30, WhenFull::Block);
            let mut n = 0u64;
            let acked;
            {
                let spool = reopen(dir.path(), &cfg, &["q"]).await;
                let mut ends = Vec::new();
                for k in &sizes {
                    let entries = (n..n + u64::from(*k)).map(entry).collect();
                    spool.commit(&[("q".into(), entries)]).await.unwrap();
                    n += u64::from(*k);
                    ends.push(n);
                }
                acked = ends.get(acked_blocks.min(ends.len()) .saturating_sub(1)).copied().filter(|_| acked_blocks > 0).unwrap_or(0);
                spool.ack("q", acked).unwrap();
                spool.settle().await.unwrap();
            }
            let committed = n;
            let mut lost_store = None;
            {
                let (db, _) = open_store(dir.path()).await;
                let blocks = stored_blocks(&db, "q");
                let tree = db.open_tree("spool:q").unwrap();
                match &damage {
                    Damage::Truncate(from) if !blocks.is_empty() => {
                        for (first, _) in &blocks[usize::from(*from) % blocks.len()..] {
                            tree.remove(first.to_be_bytes()).unwrap();
                        }
                    }
                    Damage::Holes(which) if !blocks.is_empty() => {
                        for w in which {
                            tree.remove(blocks[usize::from(*w) % blocks.len()].0.to_be_bytes()).unwrap();
                        }
                    }
                    Damage::LoseStore => lost_store = Some(dir.path().join("db.damaged-1")),
                    _ => {}
                }
                db.flush().unwrap();
            }
            if let Some(to) = &lost_store {
                for _ in 0..100 {
                    if std::fs::rename(dir.path().join("db"), to).is_ok() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            let spool = reopen(dir.path(), &cfg, &["q"]).await;
            let readable = spool.read("q", usize::MAX).await.unwrap();
            let lost = spool.lost_records("q");
            prop_assert_eq!(readable.len() as u64 + lost, committed - acked);
            spool.commit(&[("q".into(), vec![entry(1000)])]).await.unwrap();
            let newest = spool.read("q", usize::MAX).await.unwrap().last().unwrap().id;
            prop_assert_eq!(newest, committed + 1);
            if let Some(damaged) = &lost_store {
                salvage::recover(&spool, damaged).await.unwrap();
                prop_assert_eq!(spool.lost_records("q"), 0);
                let mut all: Vec<u64> = spool.read("q", usize::MAX).await.unwrap().iter().map(n_of).collect();
                all.retain(|n| *n != 1000);
                prop_assert_eq!(all, (acked..committed).collect::<Vec<_>>());
            }
            Ok(())
        })?;
    }
}
