//! Wall-clock time as the records, the ledger and the rules see it.

/// Unix time in milliseconds; 0 on a clock set before 1970, so a bad clock never stops ingest.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
