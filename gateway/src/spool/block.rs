//! Spool blocks: many records encoded together, compressed with LZ4, sealed with AES-256-GCM.
//!
//! Stored layout (all integers little-endian):
//!
//! ```text
//! magic "SGB3" | key_id u32 | nonce [12] | first_id u64 | count u32 | created_ms u64
//!              | sealed_len u32 | sealed [sealed_len]
//! ```
//!
//! The sealed part is LZ4 (size prepended) of `count` records, each
//!
//! ```text
//! received_at_ms u64 | thing_name | cert_id | topic | rule | payload
//!                    | values u32 | value × values        (each text: len u32 | bytes)
//! ```
//!
//! where the values are the record's template values (`Entry::template_values`).
//!
//! `sealed_len` makes a block self-delimiting, so `spool recover` can find whole blocks in a
//! damaged store's raw files. Blocks written before it are still read: "SGB2" (records
//! without template values) and "SGB1" (no `sealed_len` either, the sealed part running to
//! the end of the value).
//!
//! The associated data is the sink name followed by the whole header, so a block moved to
//! another sink's queue, renumbered, or given another key fails authentication. The header
//! carries only numbers: no topic, thing name or payload byte is ever outside the sealed part.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bytes::Bytes;
use sitegate_plugins::{Entry, Record};

/// The magic of blocks written now.
pub const MAGIC: &[u8; 4] = b"SGB3";
/// The magic of each version a block may have, by version (1, 2, 3).
pub const MAGICS: [&[u8; 4]; 3] = [b"SGB1", b"SGB2", MAGIC];
/// The version of blocks written now.
const VERSION: u8 = 3;
const HEADER_LEN_V1: usize = 4 + 4 + 12 + 8 + 4 + 8;
/// Bytes before the sealed part.
pub const HEADER_LEN: usize = HEADER_LEN_V1 + 4;
/// AES-GCM's tag.
const TAG_LEN: usize = 16;

/// Bytes `entry` takes in a block before compression.
pub fn encoded_len(entry: &Entry) -> usize {
    8 + 6 * 4
        + entry.thing_name.len()
        + entry.cert_id.len()
        + entry.topic.len()
        + entry.rule.len()
        + entry.payload.len()
        + entry
            .template_values
            .iter()
            .map(|v| 4 + v.len())
            .sum::<usize>()
}

/// The clear-text header of a stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub key_id: u32,
    pub nonce: [u8; 12],
    pub first_id: u64,
    pub count: u32,
    pub created_ms: u64,
    /// Bytes of the sealed part; `None` in a version 1 block.
    pub sealed_len: Option<u32>,
    /// 1, 2 or 3 (see the module docs).
    pub version: u8,
}

impl Header {
    /// Bytes of the header itself.
    pub fn header_len(&self) -> usize {
        if self.sealed_len.is_some() {
            HEADER_LEN
        } else {
            HEADER_LEN_V1
        }
    }

    /// Id of the last record in the block.
    pub fn last_id(&self) -> u64 {
        self.first_id + u64::from(self.count.max(1)) - 1
    }

    fn write(&self, out: &mut Vec<u8>) {
        let v = usize::from(self.version.clamp(1, VERSION)) - 1;
        out.extend_from_slice(MAGICS[v]);
        out.extend_from_slice(&self.key_id.to_le_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.first_id.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        if let Some(len) = self.sealed_len {
            out.extend_from_slice(&len.to_le_bytes());
        }
    }

    /// Parse the header of a stored block.
    pub fn parse(stored: &[u8]) -> Result<Header, BlockError> {
        let (header, len) = Header::parse_prefix(stored)?;
        if len != stored.len() {
            return Err(BlockError::Content(
                "length does not match the stored value",
            ));
        }
        Ok(header)
    }

    /// Parse a header at the start of `buf`, which may go on past the block; returns the
    /// header and the whole block's length (for a version 1 block, all of `buf`).
    pub fn parse_prefix(buf: &[u8]) -> Result<(Header, usize), BlockError> {
        let version = match buf.get(..4) {
            Some(m) => match MAGICS.iter().position(|magic| m == *magic) {
                // At most 3: the position in a 3-element array.
                Some(i) => i as u8 + 1,
                None => return Err(BlockError::BadMagic),
            },
            None => return Err(BlockError::Truncated(buf.len())),
        };
        let v2 = version >= 2;
        let header_len = if v2 { HEADER_LEN } else { HEADER_LEN_V1 };
        if buf.len() < header_len + TAG_LEN {
            return Err(BlockError::Truncated(buf.len()));
        }
        let mut r = Reader {
            buf: &buf[4..header_len],
        };
        let key_id = r.u32()?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(r.take(12)?);
        let first_id = r.u64()?;
        let count = r.u32()?;
        let created_ms = r.u64()?;
        let sealed_len = if v2 { Some(r.u32()?) } else { None };
        let total = match sealed_len {
            Some(n) => header_len.saturating_add(n as usize),
            None => buf.len(),
        };
        if total > buf.len() || total < header_len + TAG_LEN {
            return Err(BlockError::Truncated(buf.len()));
        }
        Ok((
            Header {
                key_id,
                nonce,
                first_id,
                count,
                created_ms,
                sealed_len,
                version,
            },
            total,
        ))
    }
}

/// Why a stored block cannot be read. All of these mean the block is damaged: the spool
/// quarantines it and carries on with the next.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("block is {0} bytes, shorter than a header and tag")]
    Truncated(usize),
    #[error("block does not start with the spool's magic bytes")]
    BadMagic,
    #[error("block failed authentication (corrupt, or moved from another queue or position)")]
    Authentication,
    #[error("block content is damaged: {0}")]
    Content(&'static str),
}

fn associated_data(sink: &str, header_bytes: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(sink.len() + 1 + header_bytes.len());
    aad.extend_from_slice(sink.as_bytes());
    aad.push(0);
    aad.extend_from_slice(header_bytes);
    aad
}

/// Encode, compress and seal `entries` as the block starting at record `first_id`.
pub fn seal(
    sink: &str,
    cipher: &Aes256Gcm,
    key_id: u32,
    nonce: [u8; 12],
    first_id: u64,
    created_ms: u64,
    entries: &[Entry],
) -> Result<Vec<u8>, BlockError> {
    seal_as(
        VERSION, sink, cipher, key_id, nonce, first_id, created_ms, entries,
    )
}

/// [`seal`] in block version 2 or 3 (the tests write older blocks with it).
#[allow(clippy::too_many_arguments)]
fn seal_as(
    version: u8,
    sink: &str,
    cipher: &Aes256Gcm,
    key_id: u32,
    nonce: [u8; 12],
    first_id: u64,
    created_ms: u64,
    entries: &[Entry],
) -> Result<Vec<u8>, BlockError> {
    let plain_len: usize = entries.iter().map(encoded_len).sum();
    let mut plain = Vec::with_capacity(plain_len);
    let put = |plain: &mut Vec<u8>, field: &[u8]| {
        let len =
            u32::try_from(field.len()).map_err(|_| BlockError::Content("field over 4 GiB"))?;
        plain.extend_from_slice(&len.to_le_bytes());
        plain.extend_from_slice(field);
        Ok::<_, BlockError>(())
    };
    for d in entries {
        plain.extend_from_slice(&d.received_at_ms.to_le_bytes());
        for field in [
            d.thing_name.as_bytes(),
            d.cert_id.as_bytes(),
            d.topic.as_bytes(),
            d.rule.as_bytes(),
            &d.payload,
        ] {
            put(&mut plain, field)?;
        }
        if version >= 3 {
            let n = u32::try_from(d.template_values.len())
                .map_err(|_| BlockError::Content("too many template values"))?;
            plain.extend_from_slice(&n.to_le_bytes());
            for v in &d.template_values {
                put(&mut plain, v.as_bytes())?;
            }
        }
    }
    let compressed = lz4_flex::compress_prepend_size(&plain);
    let sealed_len = u32::try_from(compressed.len() + TAG_LEN)
        .map_err(|_| BlockError::Content("block over 4 GiB"))?;
    let header = Header {
        key_id,
        nonce,
        first_id,
        count: u32::try_from(entries.len()).map_err(|_| BlockError::Content("too many records"))?,
        created_ms,
        sealed_len: Some(sealed_len),
        version,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len() + 16);
    header.write(&mut out);
    let aad = associated_data(sink, &out);
    out.extend_from_slice(&aead_seal(cipher, &nonce, &compressed, &aad)?);
    Ok(out)
}

/// AES-256-GCM over `msg` with `aad`: how every sealed value of the spool is sealed.
pub(super) fn aead_seal(
    cipher: &Aes256Gcm,
    nonce: &[u8; 12],
    msg: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, BlockError> {
    cipher
        .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| BlockError::Authentication)
}

/// The other way of [`aead_seal`]; a wrong key, nonce, `aad` or a changed byte fails it.
pub(super) fn aead_open(
    cipher: &Aes256Gcm,
    nonce: &[u8],
    msg: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, BlockError> {
    if nonce.len() != 12 {
        return Err(BlockError::Authentication);
    }
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| BlockError::Authentication)
}

/// Check a stored block's tag without decoding it.
pub fn verify(sink: &str, cipher: &Aes256Gcm, stored: &[u8]) -> Result<Header, BlockError> {
    let header = Header::parse(stored)?;
    decrypt(sink, cipher, &header, stored)?;
    Ok(header)
}

fn decrypt(
    sink: &str,
    cipher: &Aes256Gcm,
    header: &Header,
    stored: &[u8],
) -> Result<Vec<u8>, BlockError> {
    let aad = associated_data(sink, &stored[..header.header_len()]);
    aead_open(cipher, &header.nonce, &stored[header.header_len()..], &aad)
}

/// Authenticate, decompress and decode a stored block into its records.
pub fn open(sink: &str, cipher: &Aes256Gcm, stored: &[u8]) -> Result<Vec<Record>, BlockError> {
    let header = Header::parse(stored)?;
    let compressed = decrypt(sink, cipher, &header, stored)?;
    let plain = lz4_flex::decompress_size_prepended(&compressed)
        .map_err(|_| BlockError::Content("LZ4 data does not decompress"))?;
    let mut r = Reader { buf: &plain };
    let mut records = Vec::with_capacity(header.count as usize);
    for i in 0..u64::from(header.count) {
        let received_at_ms = r.u64()?;
        let thing_name = r.string()?;
        let cert_id = r.string()?;
        let topic = r.string()?;
        let rule = r.string()?;
        let payload = Bytes::copy_from_slice(r.field()?);
        let mut template_values = Vec::new();
        if header.version >= 3 {
            let n = r.u32()?;
            // Each value takes at least its length's 4 bytes: a count beyond what is left
            // is damage, not a reason to reserve memory.
            if n as usize > r.buf.len() / 4 {
                return Err(BlockError::Content("template values run past the block"));
            }
            template_values.reserve(n as usize);
            for _ in 0..n {
                template_values.push(r.string()?);
            }
        }
        let entry = Entry {
            received_at_ms,
            thing_name,
            cert_id,
            topic,
            rule,
            payload,
            template_values,
        };
        records.push(Record {
            id: header.first_id + i,
            entry,
        });
    }
    if !r.buf.is_empty() {
        return Err(BlockError::Content("bytes after the last record"));
    }
    Ok(records)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BlockError> {
        if self.buf.len() < n {
            return Err(BlockError::Content("record runs past the end of the block"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, BlockError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, BlockError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn field(&mut self) -> Result<&'a [u8], BlockError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn string(&mut self) -> Result<String, BlockError> {
        String::from_utf8(self.field()?.to_vec())
            .map_err(|_| BlockError::Content("text field is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use aes_gcm::KeyInit;
    use proptest::prelude::*;

    fn cipher(byte: u8) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&[byte; 32]).unwrap()
    }

    fn entry(thing: &str, payload: &[u8]) -> Entry {
        Entry {
            received_at_ms: 42,
            thing_name: thing.into(),
            cert_id: "ab".repeat(32),
            topic: format!("dt/{thing}/t"),
            rule: "raw".into(),
            payload: Bytes::copy_from_slice(payload),
            template_values: Vec::new(),
        }
    }

    #[test]
    fn a_block_cannot_move_between_sinks_positions_or_keys() {
        let entries = vec![entry("pump-1", b"{\"t\":1}")];
        let stored = seal("kinesis", &cipher(1), 1, [7; 12], 100, 5, &entries).unwrap();
        assert_eq!(open("kinesis", &cipher(1), &stored).unwrap()[0].id, 100);
        assert_eq!(
            open("archive", &cipher(1), &stored),
            Err(BlockError::Authentication)
        );
        assert_eq!(
            open("kinesis", &cipher(2), &stored),
            Err(BlockError::Authentication)
        );
        let mut renumbered = stored.clone();
        renumbered[4 + 4 + 12] ^= 1; // first_id
        assert_eq!(
            open("kinesis", &cipher(1), &renumbered),
            Err(BlockError::Authentication)
        );
        assert_eq!(
            open("kinesis", &cipher(1), &stored[..30]),
            Err(BlockError::Truncated(30))
        );
        let n = stored.len();
        assert!(open("kinesis", &cipher(1), &stored[..n - 1]).is_err());
    }

    #[test]
    fn a_block_is_found_in_surrounding_bytes_by_its_length() {
        let stored = seal("q", &cipher(4), 2, [3; 12], 9, 5, &[entry("a", b"xyz")]).unwrap();
        let mut around = b"noise".to_vec();
        around.extend_from_slice(&stored);
        around.extend_from_slice(b"more noise after the block");
        let (header, len) = Header::parse_prefix(&around[5..]).unwrap();
        assert_eq!((header.first_id, len), (9, stored.len()));
        assert_eq!(open("q", &cipher(4), &around[5..5 + len]).unwrap()[0].id, 9);
    }

    #[test]
    fn version_1_blocks_are_still_read() {
        let entries = [entry("old", b"{}")];
        // Versions 1 and 2 encode records alike; 1 has no `sealed_len`.
        let v2 = seal_as(2, "q", &cipher(5), 1, [4; 12], 3, 5, &entries).unwrap();
        let mut h = Header::parse(&v2).unwrap();
        h.sealed_len = None;
        h.version = 1;
        let mut v1 = Vec::new();
        h.write(&mut v1);
        let aad = associated_data("q", &v1);
        let plain = decrypt("q", &cipher(5), &Header::parse(&v2).unwrap(), &v2).unwrap();
        let sealed = cipher(5)
            .encrypt(
                Nonce::from_slice(&h.nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .unwrap();
        v1.extend_from_slice(&sealed);
        assert_eq!(open("q", &cipher(5), &v1).unwrap()[0].thing_name, "old");
    }

    /// Version 3 keeps each record's template values; a version 2 block (written before
    /// them) is read with none, so its records render field names from their payload.
    #[test]
    fn template_values_are_kept_and_version_2_blocks_have_none() {
        let mut with = entry("a", b"{}");
        with.template_values = vec!["B".into(), String::new(), "été/x".into()];
        let entries = [with.clone(), entry("b", b"{}")];
        let v3 = seal("q", &cipher(6), 1, [5; 12], 7, 5, &entries).unwrap();
        assert_eq!(&v3[..4], b"SGB3");
        let back = open("q", &cipher(6), &v3).unwrap();
        assert_eq!(back[0].entry, with);
        assert!(back[1].template_values.is_empty());
        let v2 = seal_as(2, "q", &cipher(6), 1, [5; 12], 7, 5, &entries).unwrap();
        assert_eq!(&v2[..4], b"SGB2");
        let back = open("q", &cipher(6), &v2).unwrap();
        assert!(back[0].template_values.is_empty());
        assert_eq!(back[0].payload, with.payload);
    }

    #[test]
    fn nothing_readable_outside_the_sealed_part() {
        let entries = vec![entry(
            "MARKER-thing",
            b"MARKER-payload MARKER-payload MARKER-payload",
        )];
        let stored = seal("s", &cipher(3), 1, [1; 12], 1, 5, &entries).unwrap();
        assert!(!stored.windows(6).any(|w| w == b"MARKER"));
    }

    proptest! {
        #[test]
        fn round_trips_any_records(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..20),
            thing in "[a-z0-9-]{1,20}",
            first_id in 0u64..u64::MAX / 2,
        ) {
            let entries: Vec<_> = payloads.iter().map(|p| entry(&thing, p)).collect();
            let stored = seal("q", &cipher(9), 3, [2; 12], first_id, 7, &entries).unwrap();
            let records = open("q", &cipher(9), &stored).unwrap();
            prop_assert_eq!(records.len(), entries.len());
            for (i, (r, d)) in records.iter().zip(&entries).enumerate() {
                prop_assert_eq!(r.id, first_id + i as u64);
                prop_assert_eq!(&r.payload, &d.payload);
                prop_assert_eq!(&r.thing_name, &d.thing_name);
            }
        }

        #[test]
        fn any_flipped_byte_is_caught(flip in 0usize..200, bit in 0u8..8) {
            let stored = seal("q", &cipher(9), 3, [2; 12], 1, 7, &[entry("a", &[5; 100])]).unwrap();
            let mut bad = stored.clone();
            let at = flip % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(open("q", &cipher(9), &bad).is_err());
        }
    }
}
