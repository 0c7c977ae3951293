//! The spool: one durable, encrypted queue per sink in sled, between the rules and the sinks.
//!
//! Records are appended in blocks (one per sink per group commit), each compressed and then
//! sealed with AES-256-GCM under a data key from [`keys`]. A commit returns only after sled
//! has flushed, which is when QoS 1 publishes are acknowledged to devices. Each sink's drain
//! reads from the oldest unacknowledged record and acknowledges by id; whole blocks are deleted
//! once every record in them is acknowledged.
//!
//! Storage faults: the spool never writes into the disk's last `disk_reserve` bytes (it acts as
//! full instead); any error sled returns is taken as fatal for the store, reported through
//! [`Spool::failed`] so the daemon exits and its supervisor restarts it (sled does not recover
//! in place); the ledger, outside sled, lets a restart count records a damaged or truncated
//! store no longer holds.
//!
//! Layout:
//! - `config`: the `[spool]` section.
//! - `block`: the sealed block format (header, LZ4, AES-256-GCM with sink and position bound in).
//! - `keys`: data keys wrapped by KMS or a local key file; rotation; offline fallback.
//! - `queue`: the in-memory index of one sink's blocks (depth, bytes, age, ack point).
//! - `ledger`: each queue's high-water marks and lost ranges, in a sidecar file.
//! - `store`: opening sled's files; damage repaired or set aside.
//! - `salvage`: `sitegate spool recover`, sealed blocks found in a damaged store's raw files.
//! - `sessions`: persistent MQTT sessions kept across a restart, sealed like the blocks.
//! - `status`: depth and health per sink, live or read from a stopped gateway's data_dir.

pub mod block;
mod config;
pub mod keys;
pub mod ledger;
pub mod queue;
pub mod salvage;
mod sessions;
pub mod status;
pub mod store;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::Aes256Gcm;
use rand::RngCore;
use sitegate_plugins::{Entry, Record};
use tokio::sync::{watch, Notify};

use block::{BlockError, Header};
pub use config::{EncryptionConfig, QueueOverride, SpoolConfig, WhenFull};
pub use keys::{KeyError, KeyRing};
use queue::QueueIndex;
pub use status::{QueueStatus, SpoolStatus};

use crate::disk::{DiskGuard, DiskLow};
use ledger::{Ledger, LedgerError};

/// Records per block at most; larger commits are split.
pub const MAX_BLOCK_RECORDS: usize = 1_000;
/// Encoded bytes per block at most (before compression); larger commits are split.
pub const MAX_BLOCK_BYTES: usize = 1 << 20;

const TREE_PREFIX: &str = "spool:";
const META_TREE: &str = "spool-meta";
const QUARANTINE_TREE: &str = "spool-quarantine";

/// Why the spool could not take or give records.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// `when_full = "block"` and the queue is at `max_bytes`: wait for the drain.
    #[error("spool queue `{sink}` is full ({bytes} of {max_bytes} bytes); holding new data until it drains")]
    Full {
        sink: String,
        bytes: u64,
        max_bytes: u64,
    },
    /// The disk is below `disk_reserve`; in `block` mode the commit waits for space.
    #[error("spool: {0}; holding new data until space returns")]
    DiskLow(#[from] DiskLow),
    #[error("no spool queue for sink `{0}`")]
    UnknownSink(String),
    /// sled failed; the store is taken as broken and the gateway restarts (see [`Spool::failed`]).
    #[error("spool storage: {0}")]
    Store(#[from] sled::Error),
    /// The store failed earlier in this run; nothing more is taken until a restart.
    #[error("spool storage failed earlier ({0}); the gateway restarts")]
    Failed(String),
    /// sled did not finish a flush within [`FLUSH_DEADLINE`].
    #[error("spool storage: a flush did not finish within {0:?}")]
    Stalled(std::time::Duration),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("spool block: {0}")]
    Block(#[from] BlockError),
    /// A queue could not be opened (at start, or for a sink added while running).
    #[error("spool queue `{sink}`: {source}")]
    Queue {
        sink: String,
        source: Box<SpoolError>,
    },
}

impl SpoolError {
    /// Whether the same operation may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            SpoolError::Full { .. } | SpoolError::DiskLow(_) => true,
            // After a restart of the gateway, which these make happen.
            SpoolError::Store(_)
            | SpoolError::Failed(_)
            | SpoolError::Stalled(_)
            | SpoolError::Ledger(_) => true,
            SpoolError::Key(k) => k.retryable(),
            SpoolError::UnknownSink(_) | SpoolError::Block(_) => false,
            SpoolError::Queue { source, .. } => source.retryable(),
        }
    }
}

/// Limits of one queue, after per-sink overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_bytes: u64,
    pub max_age_ms: u64,
    pub when_full: WhenFull,
}

/// A sled flush that takes longer than this is taken as a store that will not recover
/// (sled's I/O threads stay parked after some write errors).
pub const FLUSH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

/// One sink's queue.
pub struct Queue {
    sink: String,
    tree: sled::Tree,
    limits: QueueLimits,
    index: Mutex<QueueIndex>,
    /// Every id up to this one was flushed by sled (what the ledger may call committed).
    durable: AtomicU64,
    /// Woken when records are appended, so the drain need not poll.
    pub appended: Notify,
}

impl Queue {
    fn index(&self) -> MutexGuard<'_, QueueIndex> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than stopping the spool would, so keep going with it.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sink this queue feeds.
    pub fn sink(&self) -> &str {
        &self.sink
    }
}

/// The spool of one gateway.
pub struct Spool {
    db: sled::Db,
    meta: sled::Tree,
    quarantine: sled::Tree,
    keys: KeyRing,
    /// One queue per sink; a sink added by a live reconfiguration adds one.
    queues: std::sync::RwLock<BTreeMap<String, Arc<Queue>>>,
    /// Woken when acknowledgements or evictions free space.
    pub space: Notify,
    disk: DiskGuard,
    ledger: Arc<Mutex<Ledger>>,
    /// Set once with the reason when the store fails; never cleared (restart to recover).
    failure: watch::Sender<Option<String>>,
}

fn ack_key(sink: &str) -> Vec<u8> {
    format!("acked/{sink}").into_bytes()
}

fn quarantine_prefix(sink: &str) -> Vec<u8> {
    let mut k = sink.as_bytes().to_vec();
    k.push(0);
    k
}

impl Spool {
    /// Open the queues for `sinks` in `db`, verify every stored block, and quarantine the
    /// damaged ones. Blocks whose key is unavailable now (KMS down) are kept unverified.
    ///
    /// The ledger in `data_dir` is checked against what the store holds: records it promised
    /// that the store lost are counted (and logged), and ids are never handed out twice.
    pub async fn open(
        db: sled::Db,
        config: &SpoolConfig,
        data_dir: &Path,
        sinks: impl IntoIterator<Item = String>,
    ) -> Result<Spool, SpoolError> {
        let ledger = Ledger::open(data_dir)?;
        let keys = KeyRing::open(&db, &config.encryption, data_dir).await?;
        let meta = db.open_tree(META_TREE)?;
        let quarantine = db.open_tree(QUARANTINE_TREE)?;
        let spool = Spool {
            db,
            meta,
            quarantine,
            keys,
            queues: Default::default(),
            space: Notify::new(),
            disk: DiskGuard::new(data_dir, config.disk_reserve.0),
            ledger: Arc::new(Mutex::new(ledger)),
            failure: watch::channel(None).0,
        };
        // Queues the ledger knows but the config no longer names still hold records.
        let known: Vec<String> = spool.ledger().state().sinks.keys().cloned().collect();
        let mut names: Vec<String> = sinks.into_iter().collect();
        for k in known {
            if !names.contains(&k) && spool.has_tree(&k) {
                names.push(k);
            }
        }
        for sink in names {
            spool.add_queue(&sink, config).await?;
        }
        spool.db.flush_async().await?;
        spool.write_ledger()?;
        Ok(spool)
    }

    fn has_tree(&self, sink: &str) -> bool {
        let name = format!("{TREE_PREFIX}{sink}");
        self.db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock_ledger(&self.ledger)
    }

    /// Writes the ledger now (at open, and by `spool recover`).
    fn write_ledger(&self) -> Result<(), SpoolError> {
        let queues = self.queues();
        let mut ledger = self.ledger();
        let state = marks_of(&queues, ledger.state());
        ledger.write(state).map_err(|e| self.ledger_failed(e))
    }

    fn ledger_failed(&self, e: LedgerError) -> SpoolError {
        tracing::error!(error = %e, "spool ledger write failed");
        SpoolError::Ledger(e)
    }

    /// Flushes sled and, at the same time, writes the ledger. The ledger calls committed only
    /// what an earlier flush made durable (and names the ids being flushed as `pending`, so
    /// they are never handed out again); acknowledgements in it may run ahead of sled's,
    /// since the sink has those records already. Both writes overlap, so a commit waits for
    /// one disk round trip, not two; the price is that the last commit before a crash is
    /// not checked at the next start.
    async fn flush_with_ledger(&self) -> Result<(), SpoolError> {
        let queues = self.queues();
        let flushing: Vec<u64> = queues
            .iter()
            .map(|q| q.index().next_id.saturating_sub(1))
            .collect();
        let ledger = Arc::clone(&self.ledger);
        let snapshot = queues.clone();
        let write = tokio::task::spawn_blocking(move || {
            let mut ledger = lock_ledger(&ledger);
            let state = marks_of(&snapshot, ledger.state());
            ledger.write(state)
        });
        let (flushed, written) = tokio::join!(self.flush(), write);
        flushed?;
        for (q, id) in queues.iter().zip(flushing) {
            q.durable.fetch_max(id, Relaxed);
        }
        match written {
            Ok(result) => result.map_err(|e| self.ledger_failed(e)),
            Err(join) => Err(self.ledger_failed(LedgerError::Io {
                path: Path::new(ledger::LEDGER_FILE).to_owned(),
                source: std::io::Error::other(join.to_string()),
            })),
        }
    }

    /// Records acknowledged to devices that the store no longer holds, per sink, as found
    /// when the spool opened (and not recovered since).
    pub fn lost_records(&self, sink: &str) -> u64 {
        self.ledger()
            .state()
            .sinks
            .get(sink)
            .map_or(0, ledger::Marks::lost_records)
    }

    /// Resolves with the reason once the store has failed. The store then takes nothing
    /// more; the gateway should stop and be restarted.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    /// Counts, logs and remembers a store failure; returns it as the caller's error.
    fn store_failed(&self, what: &str, error: SpoolError) -> SpoolError {
        let reason = format!("{what}: {error}");
        let first = self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if first {
            tracing::error!(%reason, "the spool's store failed; the gateway stops so that it can be restarted (sled does not recover in place)");
        }
        error
    }

    fn check_healthy(&self) -> Result<(), SpoolError> {
        match self.failure.borrow().as_ref() {
            Some(reason) => Err(SpoolError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Opens the queue for `sink` unless it is open (a sink added while running). A queue
    /// whose sink is removed stays: its records wait for the sink's return, or expire.
    pub async fn add_queue(&self, sink: &str, config: &SpoolConfig) -> Result<(), SpoolError> {
        if self.queue(sink).is_some() {
            return Ok(());
        }
        let queue = self
            .open_queue(sink, config.limits_for(sink))
            .await
            .map_err(|e| SpoolError::Queue {
                sink: sink.to_owned(),
                source: Box::new(e),
            })?;
        if let Ok(mut queues) = self.queues.write() {
            queues.entry(sink.to_string()).or_insert(Arc::new(queue));
        }
        Ok(())
    }

    async fn open_queue(&self, sink: &str, limits: QueueLimits) -> Result<Queue, SpoolError> {
        let tree = self.db.open_tree(format!("{TREE_PREFIX}{sink}"))?;
        let acked = self
            .meta
            .get(ack_key(sink))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let marks = self.ledger().state().sinks.get(sink).cloned();
        let acked = acked.max(marks.as_ref().map_or(0, |m| m.acked));
        let (mut index, damaged) = QueueIndex::scan(&tree, acked)?;
        for d in damaged {
            self.quarantine_block(sink, &tree, &d.key, &d.error.to_string())?;
        }
        // Verify every block's tag now, so damage is reported at start and not mid-drain.
        let mut unverified = 0u64;
        let firsts: Vec<u64> = index.blocks.keys().copied().collect();
        for first in firsts {
            let Some(stored) = tree.get(first.to_be_bytes())? else {
                continue;
            };
            let key_id = index.blocks.get(&first).map(|b| b.key_id).unwrap_or(0);
            match self.keys.opening_key(key_id).await {
                Ok(cipher) => {
                    if let Err(e) = block::verify(sink, &cipher, &stored) {
                        self.quarantine_block(sink, &tree, &first.to_be_bytes(), &e.to_string())?;
                        index.remove(first);
                    }
                }
                Err(e) if e.retryable() => unverified += 1,
                Err(e) => {
                    self.quarantine_block(sink, &tree, &first.to_be_bytes(), &e.to_string())?;
                    index.remove(first);
                }
            }
        }
        if let Some(marks) = marks {
            self.count_missing(sink, &mut index, &marks);
        }
        if unverified > 0 {
            tracing::warn!(
                sink,
                blocks = unverified,
                "spool blocks kept unverified: their key is not available yet (KMS unreachable?)"
            );
        }
        tracing::info!(
            sink,
            records = index.pending_records(),
            bytes = index.bytes,
            "spool queue open"
        );
        Ok(Queue {
            sink: sink.to_string(),
            tree,
            limits,
            durable: AtomicU64::new(index.next_id.saturating_sub(1)),
            index: Mutex::new(index),
            appended: Notify::new(),
        })
    }

    /// Compares the ledger's promise with the blocks found: every id after the ack point and
    /// up to `committed` that no block holds is lost. Adds them to the ledger's lost ranges
    /// (once), and moves `next_id` past `committed` so no id is handed out twice.
    fn count_missing(&self, sink: &str, index: &mut QueueIndex, marks: &ledger::Marks) {
        index.next_id = index
            .next_id
            .max(marks.committed + 1)
            .max(marks.pending + 1);
        let mut updated = marks.clone();
        let mut found = 0u64;
        for (first, last) in index.gaps(marks.committed) {
            found += updated.account_gap(first, last);
        }
        if found > 0 {
            tracing::error!(
                sink,
                lost_records = found,
                acked_through = index.acked,
                committed_through = marks.committed,
                "spool records acknowledged to devices are missing from the store (damaged or truncated files); counted in sitegate_spool_lost_records_total"
            );
            let mut ledger = self.ledger();
            let mut state = ledger.state().clone();
            state.sinks.insert(sink.to_string(), updated);
            if let Err(e) = ledger.write(state) {
                tracing::error!(error = %e, "spool ledger write failed");
            }
        }
    }

    fn quarantine_block(
        &self,
        sink: &str,
        tree: &sled::Tree,
        key: &[u8],
        reason: &str,
    ) -> Result<(), SpoolError> {
        let Some(value) = tree.remove(key)? else {
            return Ok(());
        };
        let mut qkey = quarantine_prefix(sink);
        qkey.extend_from_slice(key);
        let mut record = (reason.len() as u32).to_le_bytes().to_vec();
        record.extend_from_slice(reason.as_bytes());
        record.extend_from_slice(&value);
        self.quarantine.insert(qkey, record)?;
        tracing::error!(sink, block = %hex::encode(key), %reason, "spool block quarantined; the rest of the queue carries on");
        Ok(())
    }

    /// The queue feeding `sink`.
    pub fn queue(&self, sink: &str) -> Option<Arc<Queue>> {
        self.queues.read().ok()?.get(sink).cloned()
    }

    /// Names of all queues.
    pub fn sinks(&self) -> Vec<String> {
        self.queues().into_iter().map(|q| q.sink.clone()).collect()
    }

    fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues
            .read()
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Append records for several sinks as one commit, and return once they are on disk.
    ///
    /// All or nothing for `Full`: if any `block`-mode queue lacks room, nothing is written.
    pub async fn commit(&self, batches: &[(String, Vec<Entry>)]) -> Result<(), SpoolError> {
        self.check_healthy()?;
        let mut planned = Vec::with_capacity(batches.len());
        for (sink, entries) in batches {
            if entries.is_empty() {
                continue;
            }
            let queue = self
                .queue(sink)
                .ok_or_else(|| SpoolError::UnknownSink(sink.clone()))?;
            let incoming: u64 = entries.iter().map(|d| block::encoded_len(d) as u64).sum();
            self.make_room(&queue, incoming)?;
            planned.push((queue, entries, incoming));
        }
        if planned.is_empty() {
            return Ok(());
        }
        self.make_disk_room(&planned)?;
        let (key_id, cipher) = self.keys.sealing_key().await?;
        let created = crate::clock::now_ms();
        for (queue, entries, _) in planned {
            for chunk in chunks(entries) {
                self.append_block(&queue, key_id, &cipher, created, chunk)?;
            }
            queue.appended.notify_one();
        }
        self.flush_with_ledger().await?;
        Ok(())
    }

    /// Make sled durable up to now. A failed or stalled flush fails the store.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.check_healthy()?;
        match tokio::time::timeout(FLUSH_DEADLINE, self.db.flush_async()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.store_failed("flush", SpoolError::Store(e))),
            Err(_) => Err(self.store_failed("flush", SpoolError::Stalled(FLUSH_DEADLINE))),
        }
    }

    /// Makes acknowledgements durable, in sled and in the ledger, so that a restart does not
    /// send again what the sinks already have. The drains call it after each batch.
    pub async fn settle(&self) -> Result<(), SpoolError> {
        self.flush_with_ledger().await?;
        // Once more, so that the ledger calls committed what the flush just made durable
        // (a clean stop leaves nothing unchecked). Unchanged marks cost no write.
        let queues = self.queues();
        let mut ledger = self.ledger();
        let state = marks_of(&queues, ledger.state());
        ledger.write(state).map_err(|e| self.ledger_failed(e))
    }

    /// Keeps the disk's reserve: below it, `block` queues refuse the commit (the committer
    /// waits and tries again), `drop_oldest` queues hold their size from the moment the disk
    /// went low, giving up their oldest blocks for new data (sled reuses the space). With
    /// nothing left to drop, the commit waits too.
    fn make_disk_room(&self, planned: &[(Arc<Queue>, &Vec<Entry>, u64)]) -> Result<(), SpoolError> {
        let incoming: u64 = planned.iter().map(|(_, _, n)| *n).sum();
        let Err(low) = self.disk.check(incoming) else {
            for (queue, _, _) in planned {
                queue.index().disk_cap = None;
            }
            return Ok(());
        };
        let must_wait = planned.iter().any(|(queue, _, _)| {
            queue.limits.when_full != WhenFull::DropOldest || queue.index().blocks.is_empty()
        });
        if must_wait {
            return Err(low.into());
        }
        for (queue, _, wanted) in planned {
            let mut index = queue.index();
            if index.disk_cap.is_none() {
                tracing::warn!(sink = %queue.sink, free = low.free, reserve = low.reserve, bytes = index.bytes, "disk below the spool's reserve: the queue keeps its size, dropping its oldest blocks for new data (when_full = drop_oldest)");
            }
            let bytes = index.bytes;
            let cap = *index.disk_cap.get_or_insert(bytes);
            while index.bytes + wanted > cap {
                let Some((&first, _)) = index.blocks.iter().next() else {
                    break;
                };
                self.evict(queue, &mut index, first, false)?;
            }
        }
        Ok(())
    }

    fn make_room(&self, queue: &Queue, incoming: u64) -> Result<(), SpoolError> {
        let max = queue.limits.max_bytes;
        let mut index = queue.index();
        if index.bytes + incoming <= max || index.blocks.is_empty() {
            return Ok(());
        }
        match queue.limits.when_full {
            WhenFull::Block => Err(SpoolError::Full {
                sink: queue.sink.clone(),
                bytes: index.bytes,
                max_bytes: max,
            }),
            WhenFull::DropOldest => {
                while index.bytes + incoming > max {
                    let Some((&first, _)) = index.blocks.iter().next() else {
                        break;
                    };
                    self.evict(queue, &mut index, first, false)?;
                }
                Ok(())
            }
        }
    }

    /// Remove the block at `first` before it was delivered (full or too old); counted.
    fn evict(
        &self,
        queue: &Queue,
        index: &mut QueueIndex,
        first: u64,
        expired: bool,
    ) -> Result<(), SpoolError> {
        queue.tree.remove(first.to_be_bytes())?;
        if let Some(info) = index.remove(first) {
            let lost = info.last_id - first.max(index.acked + 1) + 1;
            let lost = if info.last_id > index.acked { lost } else { 0 };
            index.acked = index.acked.max(info.last_id);
            self.meta
                .insert(ack_key(&queue.sink), &index.acked.to_be_bytes())?;
            if expired {
                index.expired_records += lost;
            } else {
                index.dropped_records += lost;
                index.dropped_blocks += 1;
            }
            tracing::warn!(sink = %queue.sink, records = lost, reason = if expired { "older than max_age" } else { "queue full (when_full = drop_oldest)" }, "spool dropped a block");
        }
        Ok(())
    }

    fn append_block(
        &self,
        queue: &Queue,
        key_id: u32,
        cipher: &Aes256Gcm,
        created: u64,
        entries: &[Entry],
    ) -> Result<(), SpoolError> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut index = queue.index();
        let first = index.next_id;
        let stored = block::seal(&queue.sink, cipher, key_id, nonce, first, created, entries)?;
        let header = Header::parse(&stored)?;
        let len = stored.len() as u64;
        queue
            .tree
            .insert(first.to_be_bytes(), stored)
            .map_err(|e| self.store_failed("write", SpoolError::Store(e)))?;
        index.insert(header, len);
        Ok(())
    }

    /// Up to `max` records of `sink` after the acknowledged point, oldest first.
    ///
    /// Damaged blocks met on the way are quarantined and skipped. A block whose key is not
    /// available yet stops the read there (`Err` if nothing was read before it), so order holds.
    pub async fn read(&self, sink: &str, max: usize) -> Result<Vec<Record>, SpoolError> {
        let queue = self
            .queue(sink)
            .ok_or_else(|| SpoolError::UnknownSink(sink.into()))?;
        let mut out: Vec<Record> = Vec::new();
        let mut after = queue.index().acked;
        while out.len() < max {
            let (first, last_id, cached, key_id) = {
                let index = queue.index();
                let Some((first, info)) = index.block_after(after) else {
                    break;
                };
                let cached = index
                    .cache
                    .as_ref()
                    .filter(|(f, _)| *f == first)
                    .map(|(_, r)| r.clone());
                (first, info.last_id, cached, info.key_id)
            };
            let records = match cached {
                Some(r) => r,
                None => match self.open_block(&queue, first, key_id).await {
                    Ok(Some(r)) => r,
                    Ok(None) => continue, // quarantined or gone: the next block follows
                    Err(e) if out.is_empty() => return Err(e),
                    Err(_) => break,
                },
            };
            for r in records.iter().filter(|r| r.id > after) {
                if out.len() == max {
                    break;
                }
                out.push(r.clone());
            }
            after = after.max(last_id);
        }
        Ok(out)
    }

    /// Decrypt one block; `Ok(None)` when it was damaged (and is now quarantined) or is gone.
    async fn open_block(
        &self,
        queue: &Queue,
        first: u64,
        key_id: u32,
    ) -> Result<Option<Arc<Vec<Record>>>, SpoolError> {
        let Some(stored) = queue.tree.get(first.to_be_bytes())? else {
            queue.index().remove(first);
            return Ok(None);
        };
        let cipher = match self.keys.opening_key(key_id).await {
            Ok(c) => c,
            Err(e) if e.retryable() => return Err(e.into()),
            Err(e) => return self.set_aside(queue, first, &e.to_string()),
        };
        match block::open(&queue.sink, &cipher, &stored) {
            Ok(records) => {
                let records = Arc::new(records);
                queue.index().cache = Some((first, records.clone()));
                Ok(Some(records))
            }
            Err(e) => self.set_aside(queue, first, &e.to_string()),
        }
    }

    /// Quarantine the live queue's block at `first` and drop it from the index.
    fn set_aside(
        &self,
        queue: &Queue,
        first: u64,
        reason: &str,
    ) -> Result<Option<Arc<Vec<Record>>>, SpoolError> {
        self.quarantine_block(&queue.sink, &queue.tree, &first.to_be_bytes(), reason)?;
        queue.index().remove(first);
        Ok(None)
    }

    /// Everything in `sink` up to and including record `through` is delivered: forget it.
    ///
    /// Not flushed on its own: the next commit or the periodic flush makes it durable, and a
    /// crash before that only means redelivery, which record ids make harmless.
    pub fn ack(&self, sink: &str, through: u64) -> Result<(), SpoolError> {
        let queue = self
            .queue(sink)
            .ok_or_else(|| SpoolError::UnknownSink(sink.into()))?;
        let freed = {
            let mut index = queue.index();
            if through <= index.acked {
                return Ok(());
            }
            index.acked = through;
            let failed = |e: sled::Error| self.store_failed("acknowledge", e.into());
            self.meta
                .insert(ack_key(sink), &through.to_be_bytes())
                .map_err(failed)?;
            let done = index.fully_acked();
            for first in &done {
                queue.tree.remove(first.to_be_bytes()).map_err(failed)?;
                index.remove(*first);
            }
            !done.is_empty()
        };
        if freed {
            self.space.notify_waiters();
        }
        Ok(())
    }

    /// Drop blocks older than each queue's `max_age`. Returns the records dropped.
    pub fn expire(&self) -> Result<u64, SpoolError> {
        let now = crate::clock::now_ms();
        let mut total = 0;
        for queue in self.queues() {
            let queue = &queue;
            let mut index = queue.index();
            let before = index.expired_records;
            while let Some((&first, info)) = index.blocks.iter().next() {
                if now.saturating_sub(info.created_ms) <= queue.limits.max_age_ms {
                    break;
                }
                self.evict(queue, &mut index, first, true)?;
            }
            total += index.expired_records - before;
        }
        if total > 0 {
            self.space.notify_waiters();
        }
        Ok(total)
    }

    /// Depth and health of every queue.
    pub async fn status(&self) -> SpoolStatus {
        let now = crate::clock::now_ms();
        let queues = self
            .queues()
            .iter()
            .map(|q| {
                // The ledger before the index: commits take the index, then the ledger.
                let lost_records = self.lost_records(&q.sink);
                let index = q.index();
                QueueStatus {
                    sink: q.sink.clone(),
                    records: index.pending_records(),
                    bytes: index.bytes,
                    blocks: index.blocks.len() as u64,
                    oldest_age_ms: index.oldest_ms().map(|t| now.saturating_sub(t)),
                    acked_through: index.acked,
                    dropped_records: index.dropped_records,
                    expired_records: index.expired_records,
                    quarantined_blocks: status::quarantined(&self.quarantine, &q.sink),
                    lost_records,
                    max_bytes: q.limits.max_bytes,
                }
            })
            .collect();
        SpoolStatus {
            queues,
            keys: self.keys.status().await,
        }
    }
}

fn lock_ledger(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// The marks of `queues` now, with the lost ranges already on record in `old`.
fn marks_of(queues: &[Arc<Queue>], old: &ledger::State) -> ledger::State {
    let mut state = ledger::State::default();
    for q in queues {
        let index = q.index();
        let mut marks = old.sinks.get(&q.sink).cloned().unwrap_or_default();
        marks.committed = marks.committed.max(q.durable.load(Relaxed));
        marks.pending = marks.pending.max(index.next_id.saturating_sub(1));
        marks.acked = marks.acked.max(index.acked);
        marks.prune();
        state.sinks.insert(q.sink.clone(), marks);
    }
    // A queue not open in this run keeps its marks.
    for (sink, marks) in &old.sinks {
        state
            .sinks
            .entry(sink.clone())
            .or_insert_with(|| marks.clone());
    }
    state
}

/// Split entries into blocks of at most `MAX_BLOCK_RECORDS` records and about `MAX_BLOCK_BYTES`.
fn chunks(entries: &[Entry]) -> Vec<&[Entry]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, d) in entries.iter().enumerate() {
        let len = block::encoded_len(d);
        if i > start && (i - start == MAX_BLOCK_RECORDS || bytes + len > MAX_BLOCK_BYTES) {
            out.push(&entries[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

#[cfg(test)]
mod tests;
