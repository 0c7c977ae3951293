//! `sitegate spool status`: depth and health per sink, from the live gateway or from the
//! `data_dir` of a stopped one (headers only; no key is needed to count).

use serde::{Deserialize, Serialize};

use super::keys::{key_status, KeyStatus};
use super::queue::QueueIndex;
use super::{ack_key, quarantine_prefix, META_TREE, QUARANTINE_TREE, TREE_PREFIX};
use crate::clock::now_ms;

/// One queue's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueStatus {
    pub sink: String,
    /// Records waiting for the sink.
    pub records: u64,
    /// Bytes stored (compressed and sealed).
    pub bytes: u64,
    pub blocks: u64,
    /// Age of the oldest stored block, in milliseconds.
    pub oldest_age_ms: Option<u64>,
    /// Every record id up to this one has been delivered.
    pub acked_through: u64,
    /// Records evicted by `when_full = "drop_oldest"` since start.
    pub dropped_records: u64,
    /// Records evicted for exceeding `max_age` since start.
    pub expired_records: u64,
    /// Damaged blocks set aside (kept in the quarantine tree, still sealed).
    pub quarantined_blocks: u64,
    /// Records acknowledged to devices that the store lost (damaged or truncated files), as
    /// the ledger counts them; `sitegate spool recover` takes back what it finds.
    #[serde(default)]
    pub lost_records: u64,
    /// The queue's `max_bytes` (0 when read offline).
    pub max_bytes: u64,
}

/// The whole spool's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpoolStatus {
    pub queues: Vec<QueueStatus>,
    pub keys: KeyStatus,
}

pub(super) fn quarantined(tree: &sled::Tree, sink: &str) -> u64 {
    tree.scan_prefix(quarantine_prefix(sink)).count() as u64
}

/// Read the status from a database no gateway has open, and the ledger in `data_dir`.
pub fn offline(db: &sled::Db, data_dir: &std::path::Path) -> Result<SpoolStatus, sled::Error> {
    let ledger = std::fs::read(data_dir.join(super::ledger::LEDGER_FILE))
        .ok()
        .and_then(|b| super::ledger::read_slots(&b))
        .map(|(_, state)| state)
        .unwrap_or_default();
    let meta = db.open_tree(META_TREE)?;
    let quarantine = db.open_tree(QUARANTINE_TREE)?;
    let now = now_ms();
    let mut queues = Vec::new();
    for name in db.tree_names() {
        let Some(sink) = std::str::from_utf8(&name)
            .ok()
            .and_then(|n| n.strip_prefix(TREE_PREFIX))
        else {
            continue;
        };
        let acked = meta
            .get(ack_key(sink))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let tree = db.open_tree(&name)?;
        let (index, damaged) = QueueIndex::scan(&tree, acked)?;
        queues.push(QueueStatus {
            sink: sink.to_string(),
            records: index.pending_records(),
            bytes: index.bytes,
            blocks: index.blocks.len() as u64,
            oldest_age_ms: index.oldest_ms().map(|t| now.saturating_sub(t)),
            acked_through: index.acked,
            dropped_records: 0,
            expired_records: 0,
            quarantined_blocks: quarantined(&quarantine, sink) + damaged.len() as u64,
            lost_records: ledger
                .sinks
                .get(sink)
                .map_or(0, super::ledger::Marks::lost_records),
            max_bytes: 0,
        });
    }
    Ok(SpoolStatus {
        queues,
        keys: key_status(&db.open_tree("spool-keys")?, None),
    })
}

/// A table for people.
pub fn render(status: &SpoolStatus) -> String {
    let mut out = format!(
        "{:<20} {:>10} {:>12} {:>8} {:>12} {:>8} {:>11} {:>8}\n",
        "SINK", "RECORDS", "BYTES", "BLOCKS", "OLDEST", "DROPPED", "QUARANTINED", "LOST"
    );
    for q in &status.queues {
        let age = q
            .oldest_age_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20} {:>10} {:>12} {:>8} {:>12} {:>8} {:>11} {:>8}\n",
            q.sink,
            q.records,
            q.bytes,
            q.blocks,
            age,
            q.dropped_records + q.expired_records,
            q.quarantined_blocks,
            q.lost_records
        ));
    }
    let key = match (&status.keys.current_key, &status.keys.wrapped_by) {
        (Some(id), Some(by)) => format!(
            "key {id} (wrapped by {by}), {} keys on record",
            status.keys.keys
        ),
        _ => "no data key yet".to_string(),
    };
    out.push_str(&key);
    out.push('\n');
    out
}
