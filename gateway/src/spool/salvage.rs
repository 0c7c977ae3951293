//! `sitegate spool recover DIR`: records salvaged from a store sled can no longer open.
//!
//! sled's files are not parsed. Spool blocks are self-delimiting (magic, header with the
//! sealed length) and authenticated, so every file under DIR is scanned for the block magic
//! and each candidate is tried against every queue's name (bound into the tag) with the data
//! key its header names (keys survive in `spool.keys`). Whatever passes the tag is a block
//! exactly as it was sealed; anything else is noise or damage and is skipped.
//!
//! Only records the ledger lists as lost are taken (each once, however many stale copies of
//! its block sled's log holds): those were acknowledged to devices and are missing from the
//! live store. They are appended to their queue as new records (new ids, at the back), since
//! the queue's ack point may have passed their old ids, and are taken off the lost ranges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::block::{self, Header, MAGICS};
use super::{Spool, SpoolError};
use sitegate_plugins::Entry;

/// What a recovery found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Places in the files where a block header parsed.
    pub candidates: usize,
    /// Candidates that passed authentication for some queue.
    pub blocks: usize,
    /// Records put back, per sink.
    pub recovered: BTreeMap<String, u64>,
    /// Records still listed as lost after this recovery, per sink.
    pub still_lost: BTreeMap<String, u64>,
    /// Files read.
    pub files: usize,
}

/// Why a recovery stopped.
#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a folder (give the damaged store, `db.damaged-…` under data_dir)")]
    NotAFolder(PathBuf),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Every sealed block of a queue of `spool` found in the files under `damaged`, whose
/// records the ledger lists as lost, appended back to its queue.
pub async fn recover(spool: &Spool, damaged: &Path) -> Result<Report, SalvageError> {
    if !damaged.is_dir() {
        return Err(SalvageError::NotAFolder(damaged.to_owned()));
    }
    let mut report = Report::default();
    let sinks = spool.sinks();
    let mut wanted: BTreeMap<String, super::ledger::Marks> = spool
        .ledger()
        .state()
        .sinks
        .iter()
        .filter(|(s, m)| sinks.contains(s) && !m.lost.is_empty())
        .map(|(s, m)| (s.clone(), m.clone()))
        .collect();
    // Recovered entries by sink, by their old id (which orders them and removes duplicates).
    let mut found: BTreeMap<String, BTreeMap<u64, Entry>> = BTreeMap::new();
    let mut seen: BTreeSet<(String, u64)> = BTreeSet::new();
    for path in files_under(damaged)? {
        let bytes = std::fs::read(&path).map_err(|source| SalvageError::Read {
            path: path.clone(),
            source,
        })?;
        report.files += 1;
        for at in candidates(&bytes) {
            let Ok((header, len)) = Header::parse_prefix(&bytes[at..]) else {
                continue;
            };
            report.candidates += 1;
            let stored = &bytes[at..at + len];
            let Some((sink, records)) = open_any(spool, &wanted, &header, stored).await else {
                continue;
            };
            if !seen.insert((sink.clone(), header.first_id)) {
                continue;
            }
            report.blocks += 1;
            let Some(marks) = wanted.get_mut(&sink) else {
                continue;
            };
            for r in records {
                if marks.recover(r.id) {
                    found.entry(sink.clone()).or_default().insert(r.id, r.entry);
                }
            }
        }
    }
    for (sink, entries) in found {
        let n = entries.len() as u64;
        let entries: Vec<Entry> = entries.into_values().collect();
        spool.commit(&[(sink.clone(), entries)]).await?;
        report.recovered.insert(sink, n);
    }
    // The lost ranges shrink only after the records are durable again.
    {
        let mut ledger = spool.ledger();
        let mut state = ledger.state().clone();
        for (sink, marks) in &wanted {
            if let Some(m) = state.sinks.get_mut(sink) {
                m.lost = marks.lost.clone();
                m.recovered = marks.recovered.clone();
            }
        }
        ledger.write(state).map_err(SpoolError::from)?;
    }
    for sink in sinks {
        let lost = spool.lost_records(&sink);
        if lost > 0 {
            report.still_lost.insert(sink, lost);
        }
    }
    Ok(report)
}

/// Opens `stored` as a block of one of the queues in `wanted`.
async fn open_any(
    spool: &Spool,
    wanted: &BTreeMap<String, super::ledger::Marks>,
    header: &Header,
    stored: &[u8],
) -> Option<(String, Vec<sitegate_plugins::Record>)> {
    let cipher = spool.keys.opening_key(header.key_id).await.ok()?;
    wanted.keys().find_map(|sink| {
        block::open(sink, &cipher, stored)
            .ok()
            .map(|records| (sink.clone(), records))
    })
}

/// Offsets of a block magic (any version's) in `bytes`.
fn candidates(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| MAGICS.iter().any(|m| w == m))
        .map(|(i, _)| i)
}

/// Regular files under `dir`, depth first.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, SalvageError> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| SalvageError::Read {
            path: d.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}
