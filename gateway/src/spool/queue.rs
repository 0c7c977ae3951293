//! One sink's queue: sealed blocks in a sled tree keyed by their first record id, plus the
//! in-memory index that answers depth, age and "what comes next" without touching the disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use sitegate_plugins::Record;

use super::block::{BlockError, Header};

/// Index entry of one stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    pub last_id: u64,
    pub count: u32,
    pub stored_len: u64,
    pub created_ms: u64,
    pub key_id: u32,
}

/// What is in one queue, as far as the index knows.
#[derive(Debug, Default)]
pub struct QueueIndex {
    /// Blocks by first record id, oldest first.
    pub blocks: BTreeMap<u64, BlockInfo>,
    /// Every record id up to this one is delivered (or dropped) and may be forgotten.
    pub acked: u64,
    /// The id the next appended record gets.
    pub next_id: u64,
    /// Stored bytes of all blocks.
    pub bytes: u64,
    /// Records appended or dropped since start (counters for status and metrics).
    pub dropped_records: u64,
    pub dropped_blocks: u64,
    pub expired_records: u64,
    /// While the disk is below its reserve, a `drop_oldest` queue's size is held here.
    pub disk_cap: Option<u64>,
    /// The most recently opened block, so a retried drain does not decrypt it again.
    pub cache: Option<(u64, Arc<Vec<Record>>)>,
}

/// A block that could not be indexed at start-up.
pub struct Damaged {
    pub key: sled::IVec,
    pub error: BlockError,
}

impl QueueIndex {
    /// Build the index from the blocks in `tree` (headers only).
    pub fn scan(tree: &sled::Tree, acked: u64) -> Result<(QueueIndex, Vec<Damaged>), sled::Error> {
        let mut index = QueueIndex {
            acked,
            next_id: acked + 1,
            ..QueueIndex::default()
        };
        let mut damaged = Vec::new();
        for item in tree.iter() {
            let (key, value) = item?;
            match Header::parse(&value) {
                Ok(h) if key.as_ref() == h.first_id.to_be_bytes() && h.count > 0 => {
                    index.insert(h, value.len() as u64);
                }
                Ok(_) => damaged.push(Damaged {
                    key,
                    error: BlockError::Content("header does not match the block's position"),
                }),
                Err(error) => damaged.push(Damaged { key, error }),
            }
        }
        Ok((index, damaged))
    }

    /// Add a block to the index.
    pub fn insert(&mut self, h: Header, stored_len: u64) {
        let info = BlockInfo {
            last_id: h.last_id(),
            count: h.count,
            stored_len,
            created_ms: h.created_ms,
            key_id: h.key_id,
        };
        self.bytes += stored_len;
        self.next_id = self.next_id.max(info.last_id + 1);
        self.blocks.insert(h.first_id, info);
    }

    /// Drop a block from the index; returns it.
    pub fn remove(&mut self, first_id: u64) -> Option<BlockInfo> {
        let info = self.blocks.remove(&first_id)?;
        self.bytes -= info.stored_len;
        if self.cache.as_ref().is_some_and(|(id, _)| *id == first_id) {
            self.cache = None;
        }
        Some(info)
    }

    /// Records not yet acknowledged.
    pub fn pending_records(&self) -> u64 {
        self.blocks
            .iter()
            .map(|(&first, b)| {
                let from = first.max(self.acked + 1);
                if from > b.last_id {
                    0
                } else {
                    b.last_id - from + 1
                }
            })
            .sum()
    }

    /// The oldest block holding a record after `acked`.
    pub fn head(&self) -> Option<(u64, BlockInfo)> {
        self.blocks
            .iter()
            .find(|(_, b)| b.last_id > self.acked)
            .map(|(&f, &b)| (f, b))
    }

    /// The first block holding a record after `after`.
    pub fn block_after(&self, after: u64) -> Option<(u64, BlockInfo)> {
        self.blocks
            .iter()
            .find(|(_, b)| b.last_id > after)
            .map(|(&f, &b)| (f, b))
    }

    /// Blocks fully covered by `acked`, to delete.
    pub fn fully_acked(&self) -> Vec<u64> {
        self.blocks
            .iter()
            .take_while(|(_, b)| b.last_id <= self.acked)
            .map(|(&f, _)| f)
            .collect()
    }

    /// Id ranges after the ack point and up to `through` that no block holds.
    pub fn gaps(&self, through: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut next = self.acked + 1;
        for (&first, b) in &self.blocks {
            if next > through {
                break;
            }
            if first > next {
                out.push((next, (first - 1).min(through)));
            }
            next = next.max(b.last_id + 1);
        }
        if next <= through {
            out.push((next, through));
        }
        out
    }

    /// Creation time of the oldest block.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.blocks.values().map(|b| b.created_ms).min()
    }
}
