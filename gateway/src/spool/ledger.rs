//! The ledger: each queue's high-water marks, kept outside sled so that losing sled's files
//! (a truncated log, a store set aside) cannot take the record of what was promised with it.
//!
//! On-disk format of `<data_dir>/spool.ledger`: two slots of [`SLOT_BYTES`] each, written in
//! turn, so that a torn write spoils at most the slot being written and the other still holds
//! the previous state. A slot is
//!
//! ```text
//! magic "SGL1" | seq u64 | len u32 | JSON state [len] | CRC-32 of seq, len and state (u32)
//! ```
//!
//! (integers little-endian). The valid slot with the higher `seq` wins. The file is written
//! and fdatasynced beside every sled flush, before PUBACKs go out; `committed` only ever
//! names records an earlier flush made durable, so it never claims one sled did not have.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The ledger's file name under data_dir.
pub const LEDGER_FILE: &str = "spool.ledger";
/// Bytes per slot: room for the marks of a few hundred sinks.
pub const SLOT_BYTES: usize = 64 * 1024;
const MAGIC: &[u8; 4] = b"SGL1";
const SLOT_HEADER: usize = 4 + 8 + 4;

/// The marks of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// The last record id acknowledged to a device (durable in sled when it was written).
    pub committed: u64,
    /// The last id being flushed when this was written: never handed out again, but not
    /// checked (it may not have been acknowledged).
    #[serde(default)]
    pub pending: u64,
    /// Every id up to this one was delivered or dropped.
    pub acked: u64,
    /// Id ranges `(first, last)` found missing from the store: promised, then lost.
    #[serde(default)]
    pub lost: Vec<(u64, u64)>,
    /// Old ids of records `spool recover` put back (under new ids): gaps that are accounted
    /// for. Dropped once the ack point passes them.
    #[serde(default)]
    pub recovered: Vec<(u64, u64)>,
}

/// Adds `(first, last)` to sorted, disjoint `ranges`, merging neighbours.
fn add_range(ranges: &mut Vec<(u64, u64)>, first: u64, last: u64) {
    ranges.push((first, last));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges.drain(..) {
        match merged.last_mut() {
            Some(prev) if a <= prev.1.saturating_add(1) => prev.1 = prev.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    *ranges = merged;
}

fn contains(ranges: &[(u64, u64)], id: u64) -> bool {
    ranges.iter().any(|&(a, b)| a <= id && id <= b)
}

impl Marks {
    /// Records in the lost ranges.
    pub fn lost_records(&self) -> u64 {
        self.lost.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// Adds `(first, last)` to the lost ranges, merging neighbours.
    pub fn add_lost(&mut self, first: u64, last: u64) {
        add_range(&mut self.lost, first, last);
    }

    /// Accounts for ids `first..=last` that no block holds: those neither lost nor recovered
    /// before become lost. Returns how many did.
    pub fn account_gap(&mut self, first: u64, last: u64) -> u64 {
        let mut newly = 0;
        let mut run: Option<(u64, u64)> = None;
        let mut runs = Vec::new();
        for id in first..=last {
            if contains(&self.recovered, id) {
                runs.extend(run.take());
                continue;
            }
            if !contains(&self.lost, id) {
                newly += 1;
            }
            run = Some(run.map_or((id, id), |(a, _)| (a, id)));
        }
        runs.extend(run);
        for (a, b) in runs {
            add_range(&mut self.lost, a, b);
        }
        newly
    }

    /// Forgets recovered ranges the ack point has passed.
    pub fn prune(&mut self) {
        let acked = self.acked;
        self.recovered.retain(|&(_, b)| b > acked);
    }

    /// Takes `id` out of the lost ranges and marks it recovered; whether it was lost.
    pub fn recover(&mut self, id: u64) -> bool {
        if !self.remove_lost(id) {
            return false;
        }
        add_range(&mut self.recovered, id, id);
        true
    }

    /// Takes `id` out of the lost ranges; whether it was in one.
    fn remove_lost(&mut self, id: u64) -> bool {
        let Some(i) = self.lost.iter().position(|&(a, b)| a <= id && id <= b) else {
            return false;
        };
        let (a, b) = self.lost.remove(i);
        if id > a {
            self.lost.insert(i, (a, id - 1));
        }
        if id < b {
            let at = if id > a { i + 1 } else { i };
            self.lost.insert(at, (id + 1, b));
        }
        true
    }
}

/// Everything the ledger holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub sinks: BTreeMap<String, Marks>,
}

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("spool ledger {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool ledger {path}: the state is {len} bytes, more than a {SLOT_BYTES}-byte slot")]
    TooLarge { path: PathBuf, len: usize },
}

/// The open ledger file.
pub struct Ledger {
    path: PathBuf,
    file: File,
    seq: u64,
    state: State,
}

impl Ledger {
    /// Opens (or creates) the ledger in `data_dir`. A file with no valid slot reads as empty;
    /// [`Ledger::damaged`] then tells whether that was damage rather than a first start.
    pub fn open(data_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = data_dir.join(LEDGER_FILE);
        let io = |source| LedgerError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        let (seq, state) = read_slots(&bytes).unwrap_or_default();
        if bytes.len() < 2 * SLOT_BYTES {
            // Allocated once, so that later writes rewrite blocks in place and need no new
            // space on a full disk.
            file.set_len((2 * SLOT_BYTES) as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(Ledger {
            path,
            file,
            seq,
            state,
        })
    }

    /// The marks as last written.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Writes `state` to the older slot and waits until it is on disk.
    pub fn write(&mut self, state: State) -> Result<(), LedgerError> {
        if state == self.state {
            return Ok(());
        }
        let seq = self.seq + 1;
        let slot = encode_slot(seq, &state).ok_or_else(|| LedgerError::TooLarge {
            path: self.path.clone(),
            len: serde_json::to_vec(&state).map(|v| v.len()).unwrap_or(0),
        })?;
        let offset = (seq % 2) * SLOT_BYTES as u64;
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all_at(&slot, offset).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.seq = seq;
        self.state = state;
        Ok(())
    }
}

fn encode_slot(seq: u64, state: &State) -> Option<Vec<u8>> {
    let json = serde_json::to_vec(state).ok()?;
    if SLOT_HEADER + json.len() + 4 > SLOT_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(SLOT_HEADER + json.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&u32::try_from(json.len()).ok()?.to_le_bytes());
    out.extend_from_slice(&json);
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Some(out)
}

fn decode_slot(slot: &[u8]) -> Option<(u64, State)> {
    if slot.len() < SLOT_HEADER + 4 || &slot[..4] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(slot[4..12].try_into().ok()?);
    let len = usize::try_from(u32::from_le_bytes(slot[12..16].try_into().ok()?)).ok()?;
    let end = SLOT_HEADER.checked_add(len)?;
    let crc = slot.get(end..end + 4)?;
    if crc32fast::hash(&slot[4..end]).to_le_bytes() != crc {
        return None;
    }
    let state = serde_json::from_slice(&slot[SLOT_HEADER..end]).ok()?;
    Some((seq, state))
}

/// The newest valid slot of a ledger file's bytes.
pub fn read_slots(bytes: &[u8]) -> Option<(u64, State)> {
    bytes
        .chunks(SLOT_BYTES)
        .take(2)
        .filter_map(decode_slot)
        .max_by_key(|(seq, _)| *seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(committed: u64, acked: u64) -> State {
        let mut s = State::default();
        s.sinks.insert(
            "k".into(),
            Marks {
                committed,
                acked,
                ..Marks::default()
            },
        );
        s
    }

    #[test]
    fn the_newest_whole_slot_wins_and_a_torn_one_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        l.write(marks(10, 2)).unwrap();
        l.write(marks(20, 5)).unwrap();
        drop(l);
        assert_eq!(Ledger::open(dir.path()).unwrap().state(), &marks(20, 5));
        // Spoil the slot written last (seq 2, slot 0): the one before it is read.
        let path = dir.path().join(LEDGER_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Ledger::open(dir.path()).unwrap().state(), &marks(10, 2));
    }

    #[test]
    fn lost_ranges_merge_and_split() {
        let mut m = Marks::default();
        m.add_lost(5, 9);
        m.add_lost(10, 12);
        m.add_lost(20, 20);
        assert_eq!(m.lost, vec![(5, 12), (20, 20)]);
        assert_eq!(m.lost_records(), 9);
        assert!(m.remove_lost(7));
        assert!(m.remove_lost(20));
        assert!(!m.remove_lost(30));
        assert_eq!(m.lost, vec![(5, 6), (8, 12)]);
        assert!(m.remove_lost(5));
        assert!(m.remove_lost(12));
        assert_eq!(m.lost, vec![(6, 6), (8, 11)]);
    }

    #[test]
    fn a_recovered_gap_is_not_lost_again() {
        let mut m = Marks::default();
        assert_eq!(m.account_gap(1, 10), 10);
        assert_eq!(m.account_gap(1, 10), 0, "counted once");
        for id in 3..=5 {
            assert!(m.recover(id));
        }
        assert!(!m.recover(4));
        assert_eq!(m.account_gap(1, 10), 0);
        assert_eq!(m.lost, vec![(1, 2), (6, 10)]);
        assert_eq!(m.recovered, vec![(3, 5)]);
        m.acked = 5;
        m.prune();
        assert!(m.recovered.is_empty());
    }

    proptest::proptest! {
        /// Whatever bytes a damaged ledger holds, reading it never panics, and what it
        /// returns is a state that was written (slot checksums).
        #[test]
        fn damaged_ledger_bytes_never_panic(
            flips in proptest::collection::vec((0usize..2 * SLOT_BYTES, 0u8..8), 0..8),
            cut in proptest::option::of(0usize..2 * SLOT_BYTES),
        ) {
            let written = [marks(1, 0), marks(2, 1), marks(3, 3)];
            let mut bytes = vec![0u8; 2 * SLOT_BYTES];
            for (seq, s) in written.iter().enumerate() {
                let slot = encode_slot(seq as u64 + 1, s).unwrap();
                let at = ((seq + 1) % 2) * SLOT_BYTES;
                bytes[at..at + slot.len()].copy_from_slice(&slot);
            }
            for (at, bit) in flips {
                bytes[at] ^= 1 << bit;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            if let Some((_, state)) = read_slots(&bytes) {
                proptest::prop_assert!(written.contains(&state));
            }
        }
    }
}
