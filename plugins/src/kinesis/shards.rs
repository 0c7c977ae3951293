//! Where Kinesis puts a partition key, so aggregation can pack per destination shard as the
//! KPL does: the stream's open shards and their hash-key ranges, learnt with ListShards.
//!
//! Kinesis maps a partition key to the 128-bit integer of its MD5 (big-endian) and stores the
//! record in the open shard whose range holds it. An aggregate packs only records of one
//! shard and is sent with an ExplicitHashKey in that shard's range (its first record's hash),
//! so every device's records land where they would have alone, in order. The map is learnt
//! again every [`MAX_AGE`], and at once when a PutRecords answer names another shard than
//! the one predicted (the stream was resharded).

use std::time::{Duration, Instant};

use md5::{Digest, Md5};

/// How long a learnt shard map is used before it is asked for again.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// One open shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub id: String,
    /// Its hash-key range, inclusive.
    pub start: u128,
    pub end: u128,
}

/// The open shards of a stream, by start of range.
#[derive(Debug, Clone)]
pub struct ShardMap {
    shards: Vec<Shard>,
    learnt: Instant,
    stale: bool,
}

/// The hash key Kinesis gives `partition_key`.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

impl ShardMap {
    /// A map of `shards` (open ones only); `None` when there are none.
    pub fn new(mut shards: Vec<Shard>) -> Option<ShardMap> {
        if shards.is_empty() {
            return None;
        }
        shards.sort_by_key(|s| s.start);
        Some(ShardMap {
            shards,
            learnt: Instant::now(),
            stale: false,
        })
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard whose range holds `hash`, by its place in the map; `None` in a gap (a map
    /// caught mid-reshard).
    pub fn index_of(&self, hash: u128) -> Option<usize> {
        let after = self.shards.partition_point(|s| s.start <= hash);
        let i = after.checked_sub(1)?;
        self.shards.get(i).filter(|s| hash <= s.end).map(|_| i)
    }

    pub fn shard(&self, index: usize) -> Option<&Shard> {
        self.shards.get(index)
    }

    /// Marks the map as out of date (Kinesis put a record elsewhere than predicted).
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Whether to learn the map again before the next send.
    pub fn needs_refresh(&self) -> bool {
        self.stale || self.learnt.elapsed() >= MAX_AGE
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_fall_in_the_shard_whose_range_holds_their_md5() {
        // Two shards splitting the key space in half, as CreateStream makes them.
        let half = u128::MAX / 2;
        let map = ShardMap::new(vec![
            Shard {
                id: "shardId-000000000001".into(),
                start: half + 1,
                end: u128::MAX,
            },
            Shard {
                id: "shardId-000000000000".into(),
                start: 0,
                end: half,
            },
        ])
        .unwrap();
        assert_eq!(map.index_of(0), Some(0));
        assert_eq!(map.index_of(half), Some(0));
        assert_eq!(map.index_of(half + 1), Some(1));
        assert_eq!(map.index_of(u128::MAX), Some(1));
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661: below half.
        assert_eq!(hash_key("a") >> 120, 0x0c);
        assert_eq!(map.index_of(hash_key("a")), Some(0));
        assert!(!map.needs_refresh());
        let mut map = map;
        map.mark_stale();
        assert!(map.needs_refresh());
    }

    #[test]
    fn a_gap_between_ranges_has_no_shard() {
        let map = ShardMap::new(vec![Shard {
            id: "s".into(),
            start: 10,
            end: 20,
        }])
        .unwrap();
        assert_eq!(map.index_of(9), None);
        assert_eq!(map.index_of(21), None);
        assert!(ShardMap::new(Vec::new()).is_none());
    }
}
