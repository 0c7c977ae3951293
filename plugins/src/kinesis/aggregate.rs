//! The Kinesis Producer Library's aggregation format, so KCL consumers (and AWS's
//! aws-kinesis-agg) de-aggregate what sitegate puts.
//!
//! `F3 89 9A C2` ‖ protobuf `AggregatedRecord` ‖ MD5 of the protobuf bytes, where
//! `AggregatedRecord { repeated string partition_key_table = 1; repeated string
//! explicit_hash_key_table = 2; repeated Record records = 3; }` and `Record { required uint64
//! partition_key_index = 1; optional uint64 explicit_hash_key_index = 2; required bytes data = 3; }`.

use md5::{Digest, Md5};

/// The four bytes every aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Magic plus MD5: what an aggregate costs beyond its protobuf body.
pub const OVERHEAD: usize = MAGIC.len() + 16;

/// Builds one aggregated record from user records.
#[derive(Debug, Default)]
pub struct Aggregate {
    keys: Vec<String>,
    records: Vec<u8>,
    count: usize,
    body_len: usize,
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    let mut n = 1;
    let mut v = v >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Field 1/3 tags with wire types: 0x0A = field 1 length-delimited, 0x08 = field 1 varint,
/// 0x1A = field 3 length-delimited.
const TAG_KEY_TABLE: u8 = 0x0A;
const TAG_RECORDS: u8 = 0x1A;
const TAG_KEY_INDEX: u8 = 0x08;
const TAG_DATA: u8 = 0x1A;

impl Aggregate {
    /// Records in the aggregate.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the finished aggregate if `data` under `key` were added.
    pub fn size_with(&self, key: &str, data: &[u8]) -> usize {
        let new_key = if self.keys.iter().any(|k| k == key) {
            0
        } else {
            1 + varint_len(key.len() as u64) + key.len()
        };
        let index = self.keys.len() as u64;
        let inner = 1 + varint_len(index) + 1 + varint_len(data.len() as u64) + data.len();
        OVERHEAD + self.body_len + new_key + 1 + varint_len(inner as u64) + inner
    }

    /// Add one user record.
    pub fn push(&mut self, key: &str, data: &[u8]) {
        let index = match self.keys.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                self.keys.push(key.to_string());
                self.body_len += 1 + varint_len(key.len() as u64) + key.len();
                self.keys.len() - 1
            }
        };
        let mut inner = Vec::with_capacity(data.len() + 8);
        inner.push(TAG_KEY_INDEX);
        varint(index as u64, &mut inner);
        inner.push(TAG_DATA);
        varint(data.len() as u64, &mut inner);
        inner.extend_from_slice(data);
        let before = self.records.len();
        self.records.push(TAG_RECORDS);
        varint(inner.len() as u64, &mut self.records);
        self.records.extend_from_slice(&inner);
        self.body_len += self.records.len() - before;
        self.count += 1;
    }

    /// The finished bytes: magic, protobuf, MD5.
    pub fn finish(self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.body_len);
        for key in &self.keys {
            body.push(TAG_KEY_TABLE);
            varint(key.len() as u64, &mut body);
            body.extend_from_slice(key.as_bytes());
        }
        body.extend_from_slice(&self.records);
        let mut out = Vec::with_capacity(OVERHEAD + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }
}

/// The bucket a partition key falls in, stable across restarts and versions.
pub fn bucket(key: &str, buckets: u32) -> u32 {
    let digest = Md5::digest(key.as_bytes());
    let head = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    head % buckets.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicted_size_is_the_real_size() {
        let mut agg = Aggregate::default();
        for (key, data) in [
            ("pump-1", vec![1u8; 10]),
            ("pump-2", vec![2; 300]),
            ("pump-1", vec![3; 200]),
        ] {
            let predicted = agg.size_with(key, &data);
            agg.push(key, &data);
            let mut copy = Aggregate::default();
            std::mem::swap(&mut copy, &mut agg);
            let keys = copy.keys.clone();
            let records = copy.records.clone();
            let (count, body_len) = (copy.count, copy.body_len);
            assert_eq!(copy.finish().len(), predicted);
            agg = Aggregate {
                keys,
                records,
                count,
                body_len,
            };
        }
        assert_eq!(agg.len(), 3);
    }

    #[test]
    fn starts_with_magic_and_ends_with_the_md5_of_the_body() {
        let mut agg = Aggregate::default();
        agg.push("k", b"hello");
        let bytes = agg.finish();
        assert_eq!(&bytes[..4], &MAGIC);
        let body = &bytes[4..bytes.len() - 16];
        assert_eq!(&bytes[bytes.len() - 16..], Md5::digest(body).as_slice());
        // partition_key_table = ["k"], records = [{index 0, data "hello"}]
        assert_eq!(
            body,
            &[0x0A, 1, b'k', 0x1A, 9, 0x08, 0, 0x1A, 5, b'h', b'e', b'l', b'l', b'o']
        );
    }
}
