//! The Kinesis sink: PutRecords in batches of up to 500 records and 5 MiB, a partition key per
//! record from a template (default the thing name), optional KPL aggregation per destination
//! shard, and retries of only the failed entries. Nothing is acknowledged before Kinesis
//! accepted it.
//!
//! Layout: `config` (the sink's section), `aggregate` (the KPL record format), `shards` (the
//! stream's shard map, for packing per shard), `fake` (a stand-in endpoint for tests and
//! benches), here the sink.

pub mod aggregate;
mod config;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod shards;
#[cfg(test)]
mod tests;

pub use config::*;

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use crate::backoff::Backoff;
use crate::record::Record;
use crate::sink::{Ack, Rejected, Sink, SinkError};
use aggregate::Aggregate;
use shards::{Shard, ShardMap};

/// First wait before retrying failed entries.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two tries within one send.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One Kinesis record to put, and which records of the batch it carries.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    data: Vec<u8>,
    covers: Vec<usize>,
    /// An aggregate packed for one shard: the hash key that routes it there (decimal), and
    /// the shard it should land in.
    routed: Option<(String, String)>,
}

impl Entry {
    fn size(&self) -> usize {
        self.key.len() + self.data.len()
    }
}

/// Puts records into one stream.
pub struct KinesisSink {
    name: String,
    site: String,
    config: KinesisConfig,
    client: aws_sdk_kinesis::Client,
    /// Kinesis records put since start (aggregates count once).
    pub kinesis_records: u64,
    /// The stream's shards, once learnt (with `aggregate`).
    shard_map: Option<ShardMap>,
    /// ListShards failed last time: said once in the log until it answers again.
    shard_map_failing: bool,
}

impl KinesisSink {
    /// A sink for `config.stream`, with credentials from the standard chain.
    pub async fn new(name: &str, site: &str, config: KinesisConfig) -> Self {
        let target = crate::aws::AwsTarget {
            endpoint: config.endpoint.as_deref(),
            region: config.region.as_deref(),
            // This sink retries failed entries itself, and the drain retries whole sends.
            max_attempts: 1,
        };
        let sdk = crate::aws::sdk_config(&target).await;
        KinesisSink {
            name: name.into(),
            site: site.into(),
            config,
            client: aws_sdk_kinesis::Client::new(&sdk),
            kinesis_records: 0,
            shard_map: None,
            shard_map_failing: false,
        }
    }

    /// Learns the stream's open shards again when the map is missing, old or stale. Without
    /// an answer (no `kinesis:ListShards` permission, an outage) the map learnt before stays,
    /// and with none the records are packed per bucket of partition keys instead.
    async fn refresh_shards(&mut self) {
        if self.shard_map.as_ref().is_some_and(|m| !m.needs_refresh()) {
            return;
        }
        match self.list_shards().await {
            Ok(Some(map)) => {
                if self.shard_map_failing {
                    tracing::info!(sink = %self.name, shards = map.len(), "ListShards answers again; aggregating per shard");
                }
                self.shard_map_failing = false;
                self.shard_map = Some(map);
            }
            Ok(None) => {}
            Err(e) => {
                if !self.shard_map_failing {
                    tracing::warn!(sink = %self.name, error = %e, "ListShards failed; aggregating per bucket of partition keys (aggregation_buckets) until it answers");
                }
                self.shard_map_failing = true;
            }
        }
    }

    async fn list_shards(&self) -> Result<Option<ShardMap>, SinkError> {
        let mut open = Vec::new();
        let mut token: Option<String> = None;
        // A stream has at most a few thousand shards; 1,000 per page.
        for _ in 0..100 {
            let request = self.client.list_shards();
            let request = match &token {
                Some(t) => request.next_token(t),
                None => request.stream_name(&self.config.stream),
            };
            let page = request.send().await.map_err(classify)?;
            for s in page.shards() {
                let closed = s
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .is_some();
                let range = s.hash_key_range();
                let parse = |v: Option<&str>| v.and_then(|v| v.parse::<u128>().ok());
                let (Some(start), Some(end)) = (
                    parse(range.map(|r| r.starting_hash_key())),
                    parse(range.map(|r| r.ending_hash_key())),
                ) else {
                    continue;
                };
                if !closed {
                    open.push(Shard {
                        id: s.shard_id().to_string(),
                        start,
                        end,
                    });
                }
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(ShardMap::new(open))
    }

    /// Packs per shard of `shards` from now on, as if ListShards had answered them (benches
    /// and tests that have no stream to ask).
    pub fn assume_shards(&mut self, shards: Vec<Shard>) {
        self.shard_map = ShardMap::new(shards);
    }

    /// Create the stream with `shards` shards unless it exists, and wait until it is active.
    /// For demos against an emulator; production streams are made by infrastructure code.
    pub async fn create_stream_if_missing(&self, shards: i32) -> Result<(), SinkError> {
        let exists = self
            .client
            .describe_stream_summary()
            .stream_name(&self.config.stream)
            .send()
            .await
            .is_ok();
        if !exists {
            self.client
                .create_stream()
                .stream_name(&self.config.stream)
                .shard_count(shards)
                .send()
                .await
                .map_err(classify)?;
        }
        for _ in 0..100 {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(&self.config.stream)
                .send()
                .await
                .map_err(classify)?;
            let active = summary
                .stream_description_summary()
                .is_some_and(|d| d.stream_status().as_str() == "ACTIVE");
            if active {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(SinkError::Server(format!(
            "stream {} did not become active",
            self.config.stream
        )))
    }

    /// The Kinesis records (partition key, data) a batch becomes, and how many records were
    /// refused; what `send` would put, without sending. For benches and capacity planning.
    pub fn encode(&self, batch: &[Record]) -> (Vec<(String, Vec<u8>)>, usize) {
        let (entries, rejected) = self.entries(batch);
        (
            entries.into_iter().map(|e| (e.key, e.data)).collect(),
            rejected.len(),
        )
    }

    /// Turn a batch into Kinesis records; records that can never fit are rejected.
    fn entries(&self, batch: &[Record]) -> (Vec<Entry>, Vec<Rejected>) {
        let mut singles = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, record) in batch.iter().enumerate() {
            let mut key = self.config.partition_key.render(record, &self.site);
            if key.is_empty() {
                key = record.thing_name.clone();
            }
            if key.chars().count() > MAX_PARTITION_KEY_CHARS {
                rejected.push(Rejected {
                    index,
                    reason: format!("partition key is over {MAX_PARTITION_KEY_CHARS} characters"),
                });
                continue;
            }
            let data = record.envelope_bytes(&self.site);
            let entry = Entry {
                key,
                data,
                covers: vec![index],
                routed: None,
            };
            let limit = if self.config.aggregate {
                MAX_RECORD_BYTES - aggregate::OVERHEAD - 64
            } else {
                MAX_RECORD_BYTES
            };
            if entry.size() > limit {
                rejected.push(Rejected {
                    index,
                    reason: format!("record is {} bytes with its partition key; a Kinesis record holds at most {MAX_RECORD_BYTES}", entry.size()),
                });
                continue;
            }
            singles.push(entry);
        }
        if !self.config.aggregate {
            return (singles, rejected);
        }
        (self.aggregate(singles), rejected)
    }

    /// Pack records per destination shard (per bucket of partition keys while no shard map
    /// is known), in order, each aggregate under 1 MiB.
    fn aggregate(&self, singles: Vec<Entry>) -> Vec<Entry> {
        let map = self.shard_map.as_ref();
        let buckets = self.config.aggregation_buckets;
        // One open aggregate per group: (group, aggregate, records covered, first key).
        let mut open: Vec<(u64, Aggregate, Vec<usize>, String)> = Vec::new();
        let mut done: Vec<Entry> = Vec::new();
        let finish = |group: u64, agg: Aggregate, covers: Vec<usize>, first: String| match map
            .and_then(|m| m.shard(usize::try_from(group).ok()?))
        {
            Some(shard) => Entry {
                routed: Some((shards::hash_key(&first).to_string(), shard.id.clone())),
                key: first,
                data: agg.finish(),
                covers,
            },
            None => Entry {
                key: format!("{}-agg-{group}", self.site),
                data: agg.finish(),
                covers,
                routed: None,
            },
        };
        for single in singles {
            let by_shard = map.and_then(|m| m.index_of(shards::hash_key(&single.key)));
            // A key in a gap of the map (mid-reshard) goes by bucket, above the shard groups.
            let group = match by_shard {
                Some(i) => i as u64,
                None => (1 << 32) + u64::from(aggregate::bucket(&single.key, buckets)),
            };
            let slot = match open.iter().position(|(g, ..)| *g == group) {
                Some(i) => i,
                None => {
                    open.push((group, Aggregate::default(), Vec::new(), single.key.clone()));
                    open.len() - 1
                }
            };
            // The outer key: the aggregate's first inner key, or the bucket name.
            let outer = open[slot].3.len().max(self.site.len() + 24);
            if open[slot].1.size_with(&single.key, &single.data) + outer > MAX_RECORD_BYTES {
                let fresh = (group, Aggregate::default(), Vec::new(), single.key.clone());
                let (g, full, covers, first) = std::mem::replace(&mut open[slot], fresh);
                done.push(finish(g, full, covers, first));
            }
            let (_, agg, covers, _) = &mut open[slot];
            agg.push(&single.key, &single.data);
            covers.extend(single.covers);
        }
        for (g, agg, covers, first) in open {
            if !agg.is_empty() {
                done.push(finish(g, agg, covers, first));
            }
        }
        // Send in the order of each aggregate's first record.
        done.sort_by_key(|e| e.covers.first().copied().unwrap_or(usize::MAX));
        done
    }

    /// Put `entries` (at most one request's worth), retrying only the failed ones. Returns the
    /// entries still not accepted when the attempts ran out.
    async fn put(&mut self, mut pending: Vec<Entry>) -> Result<Vec<Entry>, SinkError> {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        for attempt in 1..=self.config.max_attempts {
            let request: Vec<PutRecordsRequestEntry> = pending
                .iter()
                .map(|e| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&e.key)
                        .set_explicit_hash_key(e.routed.as_ref().map(|(hash, _)| hash.clone()))
                        .data(Blob::new(e.data.clone()))
                        .build()
                })
                .collect::<Result<_, _>>()
                .map_err(|e| SinkError::BadRequest(e.to_string()))?;
            let result = self
                .client
                .put_records()
                .stream_name(&self.config.stream)
                .set_records(Some(request))
                .send()
                .await;
            let out = match result {
                Ok(out) => out,
                Err(e) => {
                    let error = classify(e);
                    // An endpoint that cannot be reached is the drain's to retry: it reports
                    // at once and its backoff is short, where attempts here would each wait
                    // out a full attempt timeout before anyone heard of the outage.
                    if !error.retryable()
                        || attempt == self.config.max_attempts
                        || matches!(error, SinkError::Network(_))
                    {
                        return Err(error);
                    }
                    if matches!(error, SinkError::Throttled(_)) {
                        backoff.slow_down();
                    }
                    let delay = backoff.step();
                    tracing::warn!(sink = %self.name, %error, attempt, of = self.config.max_attempts, retry_in_ms = delay.as_millis() as u64, "PutRecords failed; retrying");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let mut failed = Vec::new();
            let mut throttled = false;
            for (entry, result) in pending.into_iter().zip(out.records()) {
                match result.error_code() {
                    None => {
                        self.kinesis_records += 1;
                        let predicted = entry.routed.as_ref().map(|(_, shard)| shard.as_str());
                        if predicted.is_some_and(|p| result.shard_id() != Some(p)) {
                            // Resharded: learn the map again before the next send.
                            if let Some(m) = self.shard_map.as_mut() {
                                m.mark_stale();
                            }
                        }
                    }
                    Some(code) => {
                        throttled |= code == "ProvisionedThroughputExceededException";
                        failed.push(entry);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(failed);
            }
            tracing::debug!(sink = %self.name, failed = failed.len(), throttled, attempt, "PutRecords partly failed; retrying those entries");
            pending = failed;
            if attempt == self.config.max_attempts {
                break;
            }
            if throttled {
                backoff.slow_down();
            }
            tokio::time::sleep(backoff.step()).await;
        }
        Ok(pending)
    }
}

/// Split into requests of at most 500 entries and 5 MiB, in order.
fn requests(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut out: Vec<Vec<Entry>> = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        let size = entry.size();
        match out.last_mut() {
            Some(last)
                if last.len() < MAX_RECORDS_PER_REQUEST
                    && bytes + size <= MAX_BYTES_PER_REQUEST =>
            {
                bytes += size;
                last.push(entry);
            }
            _ => {
                bytes = size;
                out.push(vec![entry]);
            }
        }
    }
    out
}

fn classify<E, R>(e: SdkError<E, R>) -> SinkError
where
    E: aws_sdk_kinesis::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let text = DisplayErrorContext(&e).to_string();
    match &e {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            match code {
                "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "ThrottlingException" => SinkError::Throttled(text),
                "AccessDeniedException"
                | "KMSAccessDeniedException"
                | "UnrecognizedClientException"
                | "ExpiredTokenException" => SinkError::AccessDenied(text),
                "ResourceNotFoundException"
                | "InvalidArgumentException"
                | "ValidationException"
                | "ResourceInUseException" => SinkError::BadRequest(text),
                _ => SinkError::Server(text),
            }
        }
        SdkError::ConstructionFailure(_) => SinkError::Config(text),
        _ => SinkError::Network(text),
    }
}

#[async_trait]
impl Sink for KinesisSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError> {
        if self.config.aggregate {
            self.refresh_shards().await;
        }
        let (entries, rejected) = self.entries(batch);
        // The first record (by batch index) that Kinesis has not accepted; everything before it
        // is done.
        let mut first_unsent = batch.len();
        let mut outcome: Result<(), SinkError> = Ok(());
        for request in requests(entries) {
            match self.put(request.clone()).await {
                Ok(left) => {
                    if let Some(i) = left.iter().flat_map(|e| e.covers.iter().copied()).min() {
                        first_unsent = first_unsent.min(i);
                    }
                }
                Err(e) => {
                    if let Some(i) = request.iter().flat_map(|e| e.covers.iter().copied()).min() {
                        first_unsent = first_unsent.min(i);
                    }
                    outcome = Err(e);
                    break;
                }
            }
            if first_unsent < batch.len() {
                // Later requests would only be sent again with the unsent records.
                break;
            }
        }
        let rejected: Vec<Rejected> = rejected
            .into_iter()
            .filter(|r| r.index < first_unsent)
            .collect();
        match outcome {
            Err(e) if first_unsent == 0 => Err(e),
            _ => Ok(Ack {
                done: first_unsent,
                rejected,
            }),
        }
    }
}
