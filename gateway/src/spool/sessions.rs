//! Persistent MQTT sessions and the messages queued for them, sealed like the spool's blocks.
//!
//! Two sled trees. `sessions` holds one value per client id: what the edge keeps of the
//! session (its subscriptions and expiry). `session_messages` holds each message queued for a
//! session whose device is away, under the key client id ‖ 0 ‖ sequence (u64 big-endian), so
//! a session's messages are one prefix in order. The edge decides what the bytes are; here
//! they are only sealed, so nothing of a filter, topic or payload is on disk in the clear.
//!
//! On-disk format of a value: magic `SGS1`, key id (u32 LE), nonce (12 bytes), then
//! AES-256-GCM over LZ4(plain) with the associated data tree name ‖ 0 ‖ key ‖ the 20 header
//! bytes, so a value moved to another client id (or another place in a queue) fails to open.

use aes_gcm::Aes256Gcm;
use rand::RngCore;

use super::block::{aead_open, aead_seal, BlockError};
use super::{Spool, SpoolError};

const TREE: &str = "sessions";
const MESSAGES: &str = "session_messages";
const MAGIC: &[u8; 4] = b"SGS1";
const HEADER_LEN: usize = 4 + 4 + 12;

fn associated_data(tree: &str, key: &[u8], header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(tree.len() + 1 + key.len() + header.len());
    aad.extend_from_slice(tree.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad.extend_from_slice(header);
    aad
}

/// The key of message `seq` of `client_id`'s queue.
fn message_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(client_id.len() + 9);
    key.extend_from_slice(client_id.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn queue_prefix(client_id: &str) -> Vec<u8> {
    let mut prefix = client_id.as_bytes().to_vec();
    prefix.push(0);
    prefix
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn seal(
    tree: &str,
    key: &[u8],
    cipher: &Aes256Gcm,
    key_id: u32,
    plain: &[u8],
) -> Result<Vec<u8>, BlockError> {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() / 2 + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key_id.to_le_bytes());
    out.extend_from_slice(&nonce);
    let compressed = lz4_flex::compress_prepend_size(plain);
    let aad = associated_data(tree, key, &out);
    out.extend_from_slice(&aead_seal(cipher, &nonce, &compressed, &aad)?);
    Ok(out)
}

/// The key id a stored value was sealed with.
fn key_id(stored: &[u8]) -> Result<u32, BlockError> {
    match stored.get(..HEADER_LEN) {
        Some(h) if &h[..4] == MAGIC => Ok(u32::from_le_bytes([h[4], h[5], h[6], h[7]])),
        _ => Err(BlockError::Content("not a sealed session")),
    }
}

fn open(tree: &str, key: &[u8], cipher: &Aes256Gcm, stored: &[u8]) -> Result<Vec<u8>, BlockError> {
    key_id(stored)?;
    let (header, sealed) = stored.split_at(HEADER_LEN);
    let aad = associated_data(tree, key, header);
    let compressed = aead_open(cipher, &header[8..], sealed, &aad)?;
    lz4_flex::decompress_size_prepended(&compressed)
        .map_err(|_| BlockError::Content("LZ4 data does not decompress"))
}

impl Spool {
    fn sessions_tree(&self) -> Result<sled::Tree, SpoolError> {
        self.db
            .open_tree(TREE)
            .map_err(|e| self.store_failed("open the sessions tree", SpoolError::Store(e)))
    }

    fn messages_tree(&self) -> Result<sled::Tree, SpoolError> {
        self.db
            .open_tree(MESSAGES)
            .map_err(|e| self.store_failed("open the session messages tree", SpoolError::Store(e)))
    }

    /// Adds messages to sessions' queues: each `(client id, sequence, plain)`, sealed under the
    /// current data key, in one sled batch. Not flushed here (see [`Spool::flush`]).
    pub async fn put_session_messages(
        &self,
        messages: &[(&str, u64, &[u8])],
    ) -> Result<(), SpoolError> {
        if messages.is_empty() {
            return Ok(());
        }
        let (key_id, cipher) = self.keys.sealing_key().await?;
        let mut batch = sled::Batch::default();
        for (client_id, seq, plain) in messages {
            let key = message_key(client_id, *seq);
            let stored = seal(MESSAGES, &key, &cipher, key_id, plain)?;
            batch.insert(key, stored);
        }
        self.messages_tree()?
            .apply_batch(batch)
            .map_err(|e| self.store_failed("write session messages", SpoolError::Store(e)))
    }

    /// The queue of `client_id`, opened, oldest first, with each message's sequence. A message
    /// that does not open is removed and counted in the second value.
    pub async fn session_messages(
        &self,
        client_id: &str,
    ) -> Result<(Vec<(u64, Vec<u8>)>, usize), SpoolError> {
        let tree = self.messages_tree()?;
        let mut out = Vec::new();
        let mut damaged = 0;
        for item in tree.scan_prefix(queue_prefix(client_id)) {
            let (key, stored) =
                item.map_err(|e| self.store_failed("read session messages", SpoolError::Store(e)))?;
            let opened = match (key_id(&stored), seq_of(&key)) {
                (Ok(id), Some(seq)) => match self.keys.opening_key(id).await {
                    Ok(cipher) => open(MESSAGES, &key, &cipher, &stored)
                        .ok()
                        .map(|p| (seq, p)),
                    Err(_) => None,
                },
                _ => None,
            };
            match opened {
                Some(m) => out.push(m),
                None => {
                    let _ = tree.remove(&key);
                    damaged += 1;
                }
            }
        }
        Ok((out, damaged))
    }

    /// How many messages `client_id`'s queue holds, and the highest sequence among them.
    pub fn session_queue(&self, client_id: &str) -> Result<(usize, Option<u64>), SpoolError> {
        let tree = self.messages_tree()?;
        let mut count = 0;
        let mut last = None;
        for item in tree.scan_prefix(queue_prefix(client_id)).keys() {
            let key =
                item.map_err(|e| self.store_failed("read session messages", SpoolError::Store(e)))?;
            count += 1;
            last = seq_of(&key).or(last);
        }
        Ok((count, last))
    }

    /// Removes messages `seqs` from `client_id`'s queue (delivered, or given up).
    pub fn remove_session_messages(&self, client_id: &str, seqs: &[u64]) -> Result<(), SpoolError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for seq in seqs {
            batch.remove(message_key(client_id, *seq));
        }
        self.messages_tree()?
            .apply_batch(batch)
            .map_err(|e| self.store_failed("remove session messages", SpoolError::Store(e)))
    }

    /// Keeps `plain` as the session of `client_id`, sealed under the current data key. Not
    /// flushed here: sled writes it out within its flush interval, and [`Spool::flush`] at a
    /// stop.
    pub async fn put_session(&self, client_id: &str, plain: &[u8]) -> Result<(), SpoolError> {
        let (key_id, cipher) = self.keys.sealing_key().await?;
        let stored = seal(TREE, client_id.as_bytes(), &cipher, key_id, plain)?;
        self.sessions_tree()?
            .insert(client_id.as_bytes(), stored)
            .map_err(|e| self.store_failed("write a session", SpoolError::Store(e)))?;
        Ok(())
    }

    /// Forgets the session of `client_id` and every message queued for it.
    pub fn remove_session(&self, client_id: &str) -> Result<(), SpoolError> {
        self.sessions_tree()?
            .remove(client_id.as_bytes())
            .map_err(|e| self.store_failed("remove a session", SpoolError::Store(e)))?;
        let tree = self.messages_tree()?;
        let mut batch = sled::Batch::default();
        for key in tree.scan_prefix(queue_prefix(client_id)).keys() {
            let key =
                key.map_err(|e| self.store_failed("read session messages", SpoolError::Store(e)))?;
            batch.remove(key);
        }
        tree.apply_batch(batch)
            .map_err(|e| self.store_failed("remove session messages", SpoolError::Store(e)))
    }

    /// Every kept session, opened. One that does not open (damaged, or its key is gone) is
    /// removed and named in the second list.
    pub async fn sessions(&self) -> Result<(Vec<(String, Vec<u8>)>, Vec<String>), SpoolError> {
        let tree = self.sessions_tree()?;
        let mut kept = Vec::new();
        let mut damaged = Vec::new();
        for item in tree.iter() {
            let (key, stored) =
                item.map_err(|e| self.store_failed("read sessions", SpoolError::Store(e)))?;
            let client_id = String::from_utf8_lossy(&key).into_owned();
            let opened = match key_id(&stored) {
                Ok(id) => match self.keys.opening_key(id).await {
                    Ok(cipher) => open(TREE, &key, &cipher, &stored).ok(),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            match opened {
                Some(plain) => kept.push((client_id, plain)),
                None => {
                    let _ = tree.remove(&key);
                    damaged.push(client_id);
                }
            }
        }
        Ok((kept, damaged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::KeyInit;

    #[test]
    fn a_queue_key_orders_by_sequence_and_keeps_client_ids_apart() {
        let a = message_key("pump-1", 2);
        assert!(message_key("pump-1", 1) < a && a < message_key("pump-1", 256));
        assert!(a.starts_with(&queue_prefix("pump-1")));
        assert!(!message_key("pump-10", 1).starts_with(&queue_prefix("pump-1")));
        assert_eq!(seq_of(&a), Some(2));
    }

    #[test]
    fn a_sealed_session_opens_only_for_its_client_id_and_hides_its_bytes() {
        let cipher = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
        let plain = b"cmd/pump-1/# and a payload".repeat(4);
        let stored = seal(TREE, b"pump-1", &cipher, 3, &plain).unwrap();
        assert_eq!(key_id(&stored).unwrap(), 3);
        assert!(!stored.windows(8).any(|w| w == b"cmd/pump"));
        assert_eq!(open(TREE, b"pump-1", &cipher, &stored).unwrap(), plain);
        assert!(open(TREE, b"pump-2", &cipher, &stored).is_err());
        assert!(open(MESSAGES, b"pump-1", &cipher, &stored).is_err());
        let mut flipped = stored.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(open(TREE, b"pump-1", &cipher, &flipped).is_err());
        assert!(open(TREE, b"pump-1", &cipher, b"SGS1").is_err());
    }
}
