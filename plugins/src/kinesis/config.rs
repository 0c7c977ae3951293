//! `type = "kinesis"`: Amazon Kinesis Data Streams via PutRecords.

use serde::{Deserialize, Serialize};

use crate::template::Template;
use crate::units::Period;

/// Default partition key: each device's records stay in order on one shard.
pub const DEFAULT_PARTITION_KEY: &str = "${thing_name}";
/// PutRecords takes at most this many entries.
pub const MAX_RECORDS_PER_REQUEST: usize = 500;
/// PutRecords takes at most this many bytes (data and partition keys).
pub const MAX_BYTES_PER_REQUEST: usize = 5 << 20;
/// One Kinesis record (data and partition key) is at most this large.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// A partition key is at most this many characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;
/// How long a drain waits for more records before sending a short batch.
pub const DEFAULT_LINGER_MS: u64 = 100;
/// The same with `aggregate`: a longer wait fills each shard's aggregate, which is what the
/// stream is billed by (records and 25 KB payload units).
pub const DEFAULT_AGGREGATE_LINGER_MS: u64 = 1000;
/// Aggregation buckets when `aggregation_buckets` is not given.
pub const DEFAULT_AGGREGATION_BUCKETS: u32 = 16;
/// Attempts for the failed entries of one PutRecords before the drain takes over.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// `[sinks.NAME]` with `type = "kinesis"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    /// Stream name.
    pub stream: String,
    /// Template for each record's partition key, e.g. "${thing_name}" or "${site}/${topic(2)}".
    #[serde(default = "default_partition_key")]
    pub partition_key: Template,
    /// Endpoint URL override, for emulators (e.g. "http://127.0.0.1:5000").
    #[serde(default)]
    pub endpoint: Option<String>,
    /// AWS region; default from the environment (Greengrass sets AWS_REGION).
    #[serde(default)]
    pub region: Option<String>,
    /// Pack many device records into each Kinesis record in the KPL aggregation format
    /// (consumers de-aggregate with the KCL or aws-kinesis-agg).
    #[serde(default)]
    pub aggregate: bool,
    /// With `aggregate`: records are packed per bucket of partition keys, and the Kinesis
    /// record's partition key names the bucket, so one device's records always share a shard
    /// and stay in order. Use at least the stream's shard count.
    #[serde(default = "default_aggregation_buckets")]
    pub aggregation_buckets: u32,
    /// Wait this long for more records before sending a batch smaller than 500: the
    /// cost/latency knob (longer fills aggregates, so fewer Kinesis records). Default 100ms,
    /// or 1s with `aggregate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linger: Option<Period>,
    /// Tries for failed entries within one send before handing back to the spool drain.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_partition_key() -> Template {
    // The constant is a valid template; the fallback keeps this infallible anyway.
    Template::parse(DEFAULT_PARTITION_KEY).unwrap_or_else(|_| Template::literal("sitegate"))
}
fn default_aggregation_buckets() -> u32 {
    DEFAULT_AGGREGATION_BUCKETS
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

impl KinesisConfig {
    /// A config for `stream` with every other key at its default.
    pub fn for_stream(stream: &str) -> Self {
        KinesisConfig {
            stream: stream.to_string(),
            partition_key: default_partition_key(),
            endpoint: None,
            region: None,
            aggregate: false,
            aggregation_buckets: DEFAULT_AGGREGATION_BUCKETS,
            linger: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
        }
    }

    /// The linger in force: the configured one, or the default for the mode.
    pub fn linger(&self) -> Period {
        self.linger
            .unwrap_or(Period::from_millis(if self.aggregate {
                DEFAULT_AGGREGATE_LINGER_MS
            } else {
                DEFAULT_LINGER_MS
            }))
    }

    /// Pure checks; errors name the key below `[sinks.NAME]`.
    pub fn validate(&self) -> Result<(), String> {
        let valid_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if self.stream.is_empty() || self.stream.len() > 128 || !self.stream.chars().all(valid_name)
        {
            return Err(format!(
                "`stream` {:?} is not a Kinesis stream name (1-128 of A-Z a-z 0-9 _ - .)",
                self.stream
            ));
        }
        if self.aggregation_buckets == 0 || self.aggregation_buckets > 10_000 {
            return Err("`aggregation_buckets` must be between 1 and 10000".into());
        }
        if self.max_attempts == 0 {
            return Err("`max_attempts` must be at least 1".into());
        }
        if self.linger().0 > std::time::Duration::from_secs(10) {
            return Err("`linger` above 10s holds data back too long".into());
        }
        Ok(())
    }
}
