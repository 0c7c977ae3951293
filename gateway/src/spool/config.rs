//! `[spool]`: queue limits, group commit and encryption of the per-sink queues.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sitegate_plugins::units::{ByteSize, Period};

use crate::invalid::Invalid;

/// Stored bytes per sink queue when `[spool] max_bytes` is not given.
pub(super) const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Age limit of spooled records when `[spool] max_age` is not given (7 days).
pub(super) const DEFAULT_SPOOL_MAX_AGE_SECS: u64 = 7 * 86_400;
/// Free space kept on the data_dir filesystem when `[spool] disk_reserve` is not given: room
/// for sled's own segment writes and the device registry after the spool stops taking data.
pub(super) const DEFAULT_DISK_RESERVE: u64 = 64 << 20;
/// Group commit interval in milliseconds.
pub(super) const DEFAULT_COMMIT_INTERVAL_MS: u64 = 5;
/// Group commit size in messages.
pub(super) const DEFAULT_COMMIT_RECORDS: usize = 2_000;
/// Messages waiting for a commit before sessions wait.
pub(super) const DEFAULT_MAX_PENDING: usize = 20_000;
/// Blocks sealed under one data key before a new one is made (random 96-bit nonces stay far
/// below the 2^32 messages-per-key bound).
pub(super) const DEFAULT_ROTATE_BLOCKS: u64 = 1 << 20;
/// Age of a data key before a new one is made (1 day).
pub(super) const DEFAULT_ROTATE_AFTER_SECS: u64 = 86_400;

/// What a full queue does with new data.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Hold new data (and so the devices' PUBACKs) until the sink drains some.
    #[default]
    Block,
    /// Evict the oldest blocks, counted, to make room.
    DropOldest,
}

/// `[spool]`: limits and group commit of the per-sink queues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Stored bytes per sink queue at most.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: ByteSize,
    /// Records older than this are dropped (counted) even if undelivered.
    #[serde(default = "default_spool_max_age")]
    pub max_age: Period,
    /// What a full queue does: "block" or "drop_oldest".
    #[serde(default)]
    pub when_full: WhenFull,
    /// Free space the spool leaves on the data_dir filesystem. Below it, every queue acts as
    /// if at `max_bytes` (`when_full` applies) and new devices are not registered, so sled
    /// never meets a full disk; both resume by themselves when space returns. 0 turns it off.
    #[serde(default = "default_disk_reserve")]
    pub disk_reserve: ByteSize,
    /// Group commit: a commit (one fsync) happens this long after the first waiting message…
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Period,
    /// …or as soon as this many messages wait, whichever comes first.
    #[serde(default = "default_commit_records")]
    pub commit_records: usize,
    /// Messages waiting for a commit at most; beyond this, device sessions wait (backpressure).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How spool blocks are encrypted.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// Per-sink overrides of `max_bytes`, `max_age` and `when_full`.
    #[serde(default)]
    pub sinks: BTreeMap<String, QueueOverride>,
}

/// `[spool.sinks.NAME]`: limits for one sink's queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueOverride {
    /// Stored bytes for this queue at most.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// Age limit for this queue.
    #[serde(default)]
    pub max_age: Option<Period>,
    /// Full behaviour for this queue.
    #[serde(default)]
    pub when_full: Option<WhenFull>,
}

/// `[spool.encryption]`: data keys wrapped by KMS, by a local key file, or both.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// KMS key (id, ARN or alias) that wraps data keys via GenerateDataKey.
    #[serde(default)]
    pub kms_key_id: Option<String>,
    /// KMS endpoint override (an emulator such as "http://127.0.0.1:5000").
    #[serde(default)]
    pub endpoint: Option<String>,
    /// AWS region for KMS; default from the environment.
    #[serde(default)]
    pub region: Option<String>,
    /// Local key-encryption key (32 random bytes, mode 0600). With `kms_key_id` too, it is the
    /// fallback that lets the hub accept data while KMS is unreachable. Without either, one is
    /// created at `<data_dir>/spool.kek`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A new data key after this many sealed blocks.
    #[serde(default = "default_rotate_blocks")]
    pub rotate_blocks: u64,
    /// A new data key after this long.
    #[serde(default = "default_rotate_after")]
    pub rotate_after: Period,
}

fn default_spool_max_bytes() -> ByteSize {
    ByteSize(DEFAULT_SPOOL_MAX_BYTES)
}
fn default_disk_reserve() -> ByteSize {
    ByteSize(DEFAULT_DISK_RESERVE)
}
fn default_spool_max_age() -> Period {
    Period::from_secs(DEFAULT_SPOOL_MAX_AGE_SECS)
}
fn default_commit_interval() -> Period {
    Period::from_millis(DEFAULT_COMMIT_INTERVAL_MS)
}
fn default_commit_records() -> usize {
    DEFAULT_COMMIT_RECORDS
}
fn default_max_pending() -> usize {
    DEFAULT_MAX_PENDING
}
fn default_rotate_blocks() -> u64 {
    DEFAULT_ROTATE_BLOCKS
}
fn default_rotate_after() -> Period {
    Period::from_secs(DEFAULT_ROTATE_AFTER_SECS)
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: default_spool_max_bytes(),
            max_age: default_spool_max_age(),
            when_full: WhenFull::Block,
            disk_reserve: default_disk_reserve(),
            commit_interval: default_commit_interval(),
            commit_records: DEFAULT_COMMIT_RECORDS,
            max_pending: DEFAULT_MAX_PENDING,
            encryption: EncryptionConfig::default(),
            sinks: BTreeMap::new(),
        }
    }
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            kms_key_id: None,
            endpoint: None,
            region: None,
            key_file: None,
            rotate_blocks: DEFAULT_ROTATE_BLOCKS,
            rotate_after: default_rotate_after(),
        }
    }
}

impl SpoolConfig {
    /// The limits of `sink`'s queue, overrides applied.
    pub fn limits_for(&self, sink: &str) -> super::QueueLimits {
        let o = self.sinks.get(sink).cloned().unwrap_or_default();
        super::QueueLimits {
            max_bytes: o.max_bytes.unwrap_or(self.max_bytes).0,
            max_age_ms: u64::from(o.max_age.unwrap_or(self.max_age)),
            when_full: o.when_full.unwrap_or(self.when_full),
        }
    }

    /// Checks limits, overrides (against the configured sinks) and encryption; names the key.
    pub fn validate(
        &self,
        sinks: &BTreeMap<String, sitegate_plugins::SinkConfig>,
    ) -> Result<(), Invalid> {
        let sizes = std::iter::once(("spool.max_bytes".to_string(), Some(self.max_bytes))).chain(
            self.sinks
                .iter()
                .map(|(n, o)| (format!("spool.sinks.{n}.max_bytes"), o.max_bytes)),
        );
        for (key, size) in sizes {
            if size.is_some_and(|s| s.0 < 4096) {
                return Err(Invalid::new(key, "must be at least 4KiB"));
            }
        }
        for name in self.sinks.keys() {
            if !sinks.contains_key(name) {
                return Err(Invalid::new(
                    format!("spool.sinks.{name}"),
                    "no such sink in [sinks]",
                ));
            }
        }
        if self.commit_interval.0.is_zero() || self.commit_interval.0 > Duration::from_secs(1) {
            return Err(Invalid::new(
                "spool.commit_interval",
                "must be between 1ms and 1s",
            ));
        }
        for (key, value) in [
            ("spool.commit_records", self.commit_records),
            ("spool.max_pending", self.max_pending),
        ] {
            if value == 0 {
                return Err(Invalid::new(key, "must be greater than 0"));
            }
        }
        let e = &self.encryption;
        if e.kms_key_id.as_deref().is_some_and(str::is_empty) {
            return Err(Invalid::new(
                "spool.encryption.kms_key_id",
                "must not be empty",
            ));
        }
        if e.endpoint.is_some() && e.kms_key_id.is_none() {
            return Err(Invalid::new(
                "spool.encryption.endpoint",
                "set only with kms_key_id",
            ));
        }
        if e.rotate_blocks == 0 || e.rotate_blocks > 1 << 30 {
            return Err(Invalid::new(
                "spool.encryption.rotate_blocks",
                "must be between 1 and 2^30",
            ));
        }
        Ok(())
    }
}
