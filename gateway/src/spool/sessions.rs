//! Persistent MQTT sessions kept across a restart, sealed like the spool's blocks.
//!
//! One value per client id in the sled tree `sessions`. The edge decides what a session's
//! bytes are (its subscriptions, expiry and queued messages); here they are only sealed, so
//! nothing of a filter, topic or payload is on disk in the clear.
//!
//! On-disk format of a value: magic `SGS1`, key id (u32 LE), nonce (12 bytes), then
//! AES-256-GCM over LZ4(plain) with the associated data `sessions` ‖ 0 ‖ client id ‖ the 20
//! header bytes, so a value moved to another client id fails to open.

use aes_gcm::Aes256Gcm;
use rand::RngCore;

use super::block::{aead_open, aead_seal, BlockError};
use super::{Spool, SpoolError};

const TREE: &str = "sessions";
const MAGIC: &[u8; 4] = b"SGS1";
const HEADER_LEN: usize = 4 + 4 + 12;

fn associated_data(client_id: &str, header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(TREE.len() + 1 + client_id.len() + header.len());
    aad.extend_from_slice(TREE.as_bytes());
    aad.push(0);
    aad.extend_from_slice(client_id.as_bytes());
    aad.extend_from_slice(header);
    aad
}

fn seal(
    client_id: &str,
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
    let aad = associated_data(client_id, &out);
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

fn open(client_id: &str, cipher: &Aes256Gcm, stored: &[u8]) -> Result<Vec<u8>, BlockError> {
    key_id(stored)?;
    let (header, sealed) = stored.split_at(HEADER_LEN);
    let aad = associated_data(client_id, header);
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

    /// Keeps `plain` as the session of `client_id`, sealed under the current data key. Not
    /// flushed here: sled writes it out within its flush interval, and [`Spool::flush`] at a
    /// stop.
    pub async fn put_session(&self, client_id: &str, plain: &[u8]) -> Result<(), SpoolError> {
        let (key_id, cipher) = self.keys.sealing_key().await?;
        let stored = seal(client_id, &cipher, key_id, plain)?;
        self.sessions_tree()?
            .insert(client_id.as_bytes(), stored)
            .map_err(|e| self.store_failed("write a session", SpoolError::Store(e)))?;
        Ok(())
    }

    /// Forgets the session of `client_id`.
    pub fn remove_session(&self, client_id: &str) -> Result<(), SpoolError> {
        self.sessions_tree()?
            .remove(client_id.as_bytes())
            .map_err(|e| self.store_failed("remove a session", SpoolError::Store(e)))?;
        Ok(())
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
                    Ok(cipher) => open(&client_id, &cipher, &stored).ok(),
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
    fn a_sealed_session_opens_only_for_its_client_id_and_hides_its_bytes() {
        let cipher = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
        let plain = b"cmd/pump-1/# and a payload".repeat(4);
        let stored = seal("pump-1", &cipher, 3, &plain).unwrap();
        assert_eq!(key_id(&stored).unwrap(), 3);
        assert!(!stored.windows(8).any(|w| w == b"cmd/pump"));
        assert_eq!(open("pump-1", &cipher, &stored).unwrap(), plain);
        assert!(open("pump-2", &cipher, &stored).is_err());
        let mut flipped = stored.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(open("pump-1", &cipher, &flipped).is_err());
        assert!(open("pump-1", &cipher, b"SGS1").is_err());
    }
}
