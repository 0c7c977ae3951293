//! Data keys for sealing spool blocks, wrapped by AWS KMS or by a local key-encryption key.
//!
//! Only wrapped keys reach the disk (sled tree `spool-keys`). A key is made when the spool
//! first seals, and replaced after `rotate_blocks` blocks or `rotate_after`. With KMS
//! configured, `GenerateDataKey` makes each key. If KMS cannot be reached and a `key_file` is
//! configured too, new keys are wrapped by the key file instead, so a hub restarting offline
//! keeps accepting data; KMS is tried again on the next rotation. Blocks sealed under a
//! KMS-wrapped key wait, undamaged, until KMS answers the `Decrypt`.
//!
//! Each wrapped key is also appended to `<data_dir>/spool.keys`, outside sled, and fsynced
//! before its first block is sealed: a store that is damaged, truncated or set aside loses no
//! key, so its blocks can still be opened (`sitegate spool recover`). Format, repeated:
//! `magic "SGK1" | key_id u32 | len u32 | record [len] | CRC-32 of id, len and record`
//! (little-endian); a torn last entry is ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::EncryptionConfig;
use crate::clock::now_ms;

const KIND_KMS: u8 = 1;
const KIND_FILE: u8 = 2;
const KEK_LEN: usize = 32;
/// The keys' sidecar file under data_dir.
pub const KEYS_FILE: &str = "spool.keys";
const KEYS_MAGIC: &[u8; 4] = b"SGK1";
/// After KMS failed to make a key, wait this long before asking it again.
const KMS_RETRY: Duration = Duration::from_secs(30);

/// Why a key is not available.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// KMS or the key file is unreachable or refused; trying later can help. Blocks under this
    /// key are kept.
    #[error("spool key {key_id} unavailable: {reason}")]
    Unavailable { key_id: u32, reason: String },
    /// No key can be made to seal new blocks.
    #[error("no spool key can be made: {0}")]
    NoSealingKey(String),
    /// The key record is missing or damaged: blocks under it can never be opened.
    #[error("spool key {key_id} is damaged or missing: {reason}")]
    Lost { key_id: u32, reason: String },
    #[error("spool key store: {0}")]
    Store(#[from] sled::Error),
    /// A key-encryption key file cannot be read or made, or is not a key file.
    #[error("key file {}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    /// The default key file is gone while blocks sealed under keys it wrapped remain.
    #[error(
        "{} is missing, but the spool holds {blocks} sealed blocks under data keys wrapped by key file {}. \
         Put the key file back (from a backup) and start again. If it is lost for good, \
         those records cannot be read: stop the gateway, move {} and {} aside, and start on an empty spool",
        path.display(), wrapped.join(", "), store.display(), sidecar.display()
    )]
    KeyFileMissing {
        path: PathBuf,
        blocks: usize,
        wrapped: Vec<String>,
        store: PathBuf,
        sidecar: PathBuf,
    },
    /// The `spool.keys` sidecar could not be read.
    #[error("keys file {}: {source}", path.display())]
    Sidecar {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl KeyError {
    /// Whether blocks under this key could be read later (so must not be quarantined).
    pub fn retryable(&self) -> bool {
        match self {
            KeyError::Lost { .. } => false,
            // The files have to be put right first.
            KeyError::KeyFile { .. }
            | KeyError::KeyFileMissing { .. }
            | KeyError::Sidecar { .. } => false,
            KeyError::Unavailable { .. } | KeyError::NoSealingKey(_) | KeyError::Store(_) => true,
        }
    }
}

/// The key used for new blocks.
#[derive(Clone)]
struct Sealing {
    id: u32,
    cipher: Arc<Aes256Gcm>,
    kind: u8,
    blocks: u64,
    since: Instant,
}

/// What `spool status` shows about keys.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KeyStatus {
    /// Id of the key sealing new blocks, if one was made yet.
    pub current_key: Option<u32>,
    /// "kms:<key id>" or "file:<fingerprint>" for the current key.
    pub wrapped_by: Option<String>,
    /// Keys on record.
    pub keys: usize,
}

struct Kms {
    client: aws_sdk_kms::Client,
    key_id: String,
}

/// All data keys of one spool.
pub struct KeyRing {
    tree: sled::Tree,
    sidecar: PathBuf,
    kms: Option<Kms>,
    kek: Option<(Aes256Gcm, String)>,
    rotate_blocks: u64,
    rotate_after: Duration,
    opened: Mutex<HashMap<u32, Arc<Aes256Gcm>>>,
    sealing: tokio::sync::Mutex<Option<Sealing>>,
    kms_retry_at: Mutex<Option<Instant>>,
}

/// Read a key-encryption key file (32 raw bytes).
pub fn read_kek(path: &Path) -> Result<[u8; KEK_LEN], KeyError> {
    let bytes = std::fs::read(path).map_err(|e| KeyError::KeyFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    <[u8; KEK_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::KeyFile {
        path: path.to_owned(),
        reason: format!(
            "holds {} bytes; a spool key file is {KEK_LEN} random bytes (make one with `sitegate spool keygen`)",
            bytes.len()
        ),
    })
}

/// Make a new key-encryption key file, readable by its owner only. Never overwrites.
pub fn generate_kek(path: &Path) -> Result<(), KeyError> {
    let mut kek = [0u8; KEK_LEN];
    rand::rngs::OsRng.fill_bytes(&mut kek);
    crate::secret::write_secret(path, &kek).map_err(|e| KeyError::KeyFile {
        path: path.to_owned(),
        reason: format!("cannot create it: {e}"),
    })
}

/// Appends one key record to the sidecar and waits until it is on disk.
fn append_to_sidecar(path: &Path, id: u32, value: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut entry = KEYS_MAGIC.to_vec();
    entry.extend_from_slice(&id.to_le_bytes());
    entry.extend_from_slice(&(value.len() as u32).to_le_bytes());
    entry.extend_from_slice(value);
    let crc = crc32fast::hash(&entry[4..]);
    entry.extend_from_slice(&crc.to_le_bytes());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(&entry)?;
    file.sync_data()
}

/// The whole entries of a keys sidecar file, in order; stops at the first torn or damaged one.
pub fn read_sidecar(bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 12 && &rest[..4] == KEYS_MAGIC {
        let id = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let len = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
        let Some(crc) = rest.get(12 + len..16 + len) else {
            break;
        };
        if crc32fast::hash(&rest[4..12 + len]).to_le_bytes() != crc {
            break;
        }
        out.push((id, rest[12..12 + len].to_vec()));
        rest = &rest[16 + len..];
    }
    out
}

/// Puts keys the sidecar has and the tree lacks back into the tree; how many.
fn restore_from_sidecar(tree: &sled::Tree, path: &Path) -> Result<usize, KeyError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(KeyError::Sidecar {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut restored = 0;
    for (id, value) in read_sidecar(&bytes) {
        let key = id.to_be_bytes();
        if tree.get(key)?.is_none() {
            tree.insert(key, value)?;
            restored += 1;
        }
    }
    Ok(restored)
}

/// Blocks waiting in any queue of `db`.
fn sealed_blocks(db: &sled::Db) -> usize {
    db.tree_names()
        .iter()
        .filter(|n| n.starts_with(super::TREE_PREFIX.as_bytes()))
        .filter_map(|n| db.open_tree(n).ok())
        .map(|t| t.len())
        .sum()
}

/// Fingerprints of the key files that wrapped keys on record.
fn file_wrapped_keys(tree: &sled::Tree) -> Vec<String> {
    let mut out: Vec<String> = tree
        .iter()
        .filter_map(|item| item.ok())
        .filter(|(_, v)| v.first() == Some(&KIND_FILE) && v.len() >= 11)
        .filter_map(|(_, v)| {
            let n = u16::from_le_bytes([v[9], v[10]]) as usize;
            v.get(11..11 + n)
                .and_then(|w| std::str::from_utf8(w).ok())
                .map(str::to_string)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn fingerprint(kek: &[u8]) -> String {
    hex::encode(&Sha256::digest(kek)[..8])
}

fn dek_aad(key_id: u32) -> Vec<u8> {
    let mut aad = b"sitegate-spool-dek".to_vec();
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad
}

impl KeyRing {
    /// Open the key records in `db` and prepare the configured wrappers. Does no network I/O:
    /// KMS is first asked when a key is needed.
    pub async fn open(
        db: &sled::Db,
        config: &EncryptionConfig,
        data_dir: &Path,
    ) -> Result<Self, KeyError> {
        let tree = db.open_tree("spool-keys")?;
        let sidecar = data_dir.join(KEYS_FILE);
        let restored = restore_from_sidecar(&tree, &sidecar)?;
        if restored > 0 {
            tracing::warn!(keys = restored, file = %sidecar.display(), "spool data keys missing from the store were restored from the keys file");
        }
        let kek_path: Option<PathBuf> = match (&config.key_file, &config.kms_key_id) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(_)) => None,
            (None, None) => {
                // Nothing configured: a key file under data_dir keeps the spool encrypted; the
                // operator is told to move to KMS or to a key file on other media.
                let path = data_dir.join("spool.kek");
                if !path.exists() {
                    let blocks = sealed_blocks(db);
                    let wrapped = file_wrapped_keys(&tree);
                    if blocks > 0 && !wrapped.is_empty() {
                        return Err(KeyError::KeyFileMissing {
                            path,
                            blocks,
                            wrapped,
                            store: data_dir.join(super::store::STORE_DIR),
                            sidecar,
                        });
                    }
                    generate_kek(&path)?;
                    tracing::warn!(path = %path.display(), "no [spool.encryption] configured: created a local key file; use kms_key_id or a key_file kept off the data disk");
                }
                Some(path)
            }
        };
        let kek = match kek_path {
            Some(path) => {
                let raw = read_kek(&path)?;
                let cipher = Aes256Gcm::new_from_slice(&raw).map_err(|e| KeyError::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Some((cipher, fingerprint(&raw)))
            }
            None => None,
        };
        let kms = match &config.kms_key_id {
            Some(key_id) => {
                let target = sitegate_plugins::aws::AwsTarget {
                    endpoint: config.endpoint.as_deref(),
                    region: config.region.as_deref(),
                    max_attempts: 2,
                };
                let sdk = sitegate_plugins::aws::sdk_config(&target).await;
                Some(Kms {
                    client: aws_sdk_kms::Client::new(&sdk),
                    key_id: key_id.clone(),
                })
            }
            None => None,
        };
        Ok(KeyRing {
            tree,
            sidecar,
            kms,
            kek,
            rotate_blocks: config.rotate_blocks,
            rotate_after: config.rotate_after.0,
            opened: Mutex::new(HashMap::new()),
            sealing: tokio::sync::Mutex::new(None),
            kms_retry_at: Mutex::new(None),
        })
    }

    /// The key to seal the next block with; makes or rotates keys as needed.
    pub async fn sealing_key(&self) -> Result<(u32, Arc<Aes256Gcm>), KeyError> {
        let mut sealing = self.sealing.lock().await;
        if let Some(s) = sealing.as_mut() {
            let worn = s.blocks >= self.rotate_blocks || s.since.elapsed() >= self.rotate_after;
            // A key made with the file while KMS was down is replaced once KMS may be back.
            let kms_back = s.kind == KIND_FILE && self.kms.is_some() && self.kms_may_answer();
            if !worn && !kms_back {
                s.blocks += 1;
                return Ok((s.id, s.cipher.clone()));
            }
        }
        match self.make_key().await {
            Ok(fresh) => {
                *sealing = Some(fresh);
            }
            Err(e) => match sealing.as_ref() {
                // Rotation failed: keep sealing with the current key rather than refuse data.
                Some(_) => {
                    tracing::warn!(error = %e, "spool key rotation failed; keeping the current key")
                }
                None => return Err(e),
            },
        }
        let s = sealing
            .as_mut()
            .ok_or_else(|| KeyError::NoSealingKey("no key".into()))?;
        s.blocks += 1;
        Ok((s.id, s.cipher.clone()))
    }

    fn kms_may_answer(&self) -> bool {
        self.kms_retry_at
            .lock()
            .map(|at| at.is_none_or(|t| Instant::now() >= t))
            .unwrap_or(true)
    }

    fn next_id(&self) -> Result<u32, KeyError> {
        let last = self
            .tree
            .last()?
            .and_then(|(k, _)| <[u8; 4]>::try_from(k.as_ref()).ok());
        Ok(last.map(u32::from_be_bytes).unwrap_or(0) + 1)
    }

    async fn make_key(&self) -> Result<Sealing, KeyError> {
        let id = self.next_id()?;
        let mut plain = [0u8; 32];
        let mut kms_error = None;
        let mut made: Option<(u8, String, Vec<u8>)> = None;
        if let Some(kms) = &self.kms {
            if self.kms_may_answer() {
                match self.kms_generate(kms).await {
                    Ok((p, blob)) => {
                        plain = p;
                        made = Some((KIND_KMS, kms.key_id.clone(), blob));
                        if let Ok(mut at) = self.kms_retry_at.lock() {
                            *at = None;
                        }
                    }
                    Err(e) => {
                        if let Ok(mut at) = self.kms_retry_at.lock() {
                            *at = Some(Instant::now() + KMS_RETRY);
                        }
                        kms_error = Some(e);
                    }
                }
            } else {
                kms_error = Some("KMS failed recently; waiting before asking again".into());
            }
        }
        if made.is_none() {
            let Some((kek, fp)) = &self.kek else {
                return Err(KeyError::NoSealingKey(
                    kms_error.unwrap_or_else(|| "no KMS key and no key file".into()),
                ));
            };
            if let Some(e) = &kms_error {
                tracing::warn!(error = %e, "KMS unreachable: sealing new spool blocks under the local key file until it answers");
            }
            rand::rngs::OsRng.fill_bytes(&mut plain);
            let mut nonce = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            let aad = dek_aad(id);
            let wrapped = kek
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .map_err(|_| KeyError::NoSealingKey("local key wrap failed".into()))?;
            let mut blob = nonce.to_vec();
            blob.extend_from_slice(&wrapped);
            made = Some((KIND_FILE, fp.clone(), blob));
        }
        let Some((kind, wrapper, blob)) = made else {
            return Err(KeyError::NoSealingKey("no wrapper".into()));
        };
        let mut value = vec![kind];
        value.extend_from_slice(&now_ms().to_le_bytes());
        value.extend_from_slice(&(wrapper.len() as u16).to_le_bytes());
        value.extend_from_slice(wrapper.as_bytes());
        value.extend_from_slice(&blob);
        append_to_sidecar(&self.sidecar, id, &value).map_err(|e| {
            KeyError::NoSealingKey(format!("keys file {}: {e}", self.sidecar.display()))
        })?;
        self.tree.insert(id.to_be_bytes(), value)?;
        let cipher = Arc::new(
            Aes256Gcm::new_from_slice(&plain)
                .map_err(|_| KeyError::NoSealingKey("bad key length".into()))?,
        );
        if let Ok(mut opened) = self.opened.lock() {
            opened.insert(id, cipher.clone());
        }
        tracing::info!(
            key_id = id,
            wrapped_by = if kind == KIND_KMS { "kms" } else { "key file" },
            "new spool data key"
        );
        Ok(Sealing {
            id,
            cipher,
            kind,
            blocks: 0,
            since: Instant::now(),
        })
    }

    async fn kms_generate(&self, kms: &Kms) -> Result<([u8; 32], Vec<u8>), String> {
        let out = kms
            .client
            .generate_data_key()
            .key_id(&kms.key_id)
            .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "KMS GenerateDataKey: {}",
                    aws_sdk_kms::error::DisplayErrorContext(e)
                )
            })?;
        let plain = out
            .plaintext()
            .and_then(|b| <[u8; 32]>::try_from(b.as_ref()).ok())
            .ok_or("KMS GenerateDataKey returned no 32-byte key")?;
        let blob = out
            .ciphertext_blob()
            .ok_or("KMS GenerateDataKey returned no wrapped key")?;
        Ok((plain, blob.as_ref().to_vec()))
    }

    /// The key that sealed blocks stamped `key_id`, unwrapping it on first use.
    pub async fn opening_key(&self, key_id: u32) -> Result<Arc<Aes256Gcm>, KeyError> {
        if let Some(c) = self
            .opened
            .lock()
            .ok()
            .and_then(|o| o.get(&key_id).cloned())
        {
            return Ok(c);
        }
        let lost = |reason: &str| KeyError::Lost {
            key_id,
            reason: reason.into(),
        };
        let value = self
            .tree
            .get(key_id.to_be_bytes())?
            .ok_or_else(|| lost("no such key on record"))?;
        if value.len() < 11 {
            return Err(lost("key record truncated"));
        }
        let kind = value[0];
        let wrapper_len = u16::from_le_bytes([value[9], value[10]]) as usize;
        let wrapper = value
            .get(11..11 + wrapper_len)
            .and_then(|w| std::str::from_utf8(w).ok())
            .ok_or_else(|| lost("key record truncated"))?
            .to_string();
        let blob = &value[11 + wrapper_len..];
        let plain: Vec<u8> = match kind {
            KIND_FILE => {
                let Some((kek, fp)) = &self.kek else {
                    return Err(KeyError::Unavailable {
                        key_id,
                        reason: format!(
                            "sealed under key file {wrapper}, but no key_file is configured"
                        ),
                    });
                };
                if *fp != wrapper {
                    return Err(KeyError::Unavailable {
                        key_id,
                        reason: format!(
                            "sealed under key file {wrapper}, but the configured key file is {fp}"
                        ),
                    });
                }
                if blob.len() < 12 {
                    return Err(lost("wrapped key truncated"));
                }
                let aad = dek_aad(key_id);
                kek.decrypt(
                    Nonce::from_slice(&blob[..12]),
                    Payload {
                        msg: &blob[12..],
                        aad: &aad,
                    },
                )
                .map_err(|_| lost("wrapped key fails authentication"))?
            }
            KIND_KMS => {
                let Some(kms) = &self.kms else {
                    return Err(KeyError::Unavailable {
                        key_id,
                        reason: format!(
                            "sealed under KMS key {wrapper}, but no kms_key_id is configured"
                        ),
                    });
                };
                let out = kms
                    .client
                    .decrypt()
                    .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(blob.to_vec()))
                    .send()
                    .await
                    .map_err(|e| KeyError::Unavailable {
                        key_id,
                        reason: format!(
                            "KMS Decrypt: {}",
                            aws_sdk_kms::error::DisplayErrorContext(e)
                        ),
                    })?;
                out.plaintext()
                    .map(|b| b.as_ref().to_vec())
                    .ok_or_else(|| KeyError::Unavailable {
                        key_id,
                        reason: "KMS Decrypt returned no key".into(),
                    })?
            }
            _ => return Err(lost("unknown wrapper kind")),
        };
        let cipher =
            Arc::new(Aes256Gcm::new_from_slice(&plain).map_err(|_| lost("key is not 32 bytes"))?);
        if let Ok(mut opened) = self.opened.lock() {
            opened.insert(key_id, cipher.clone());
        }
        Ok(cipher)
    }

    /// Current key and how it is wrapped.
    pub async fn status(&self) -> KeyStatus {
        let sealing = self.sealing.lock().await.clone();
        key_status(&self.tree, sealing.map(|s| s.id))
    }
}

/// Key facts readable without KMS or the key file (for `spool status` on a stopped gateway).
pub fn key_status(tree: &sled::Tree, current: Option<u32>) -> KeyStatus {
    let current = current.or_else(|| {
        tree.last()
            .ok()
            .flatten()
            .and_then(|(k, _)| <[u8; 4]>::try_from(k.as_ref()).ok())
            .map(u32::from_be_bytes)
    });
    let wrapped_by = current
        .and_then(|id| tree.get(id.to_be_bytes()).ok().flatten())
        .and_then(|v| {
            let len = u16::from_le_bytes([*v.get(9)?, *v.get(10)?]) as usize;
            let name = std::str::from_utf8(v.get(11..11 + len)?).ok()?;
            Some(format!(
                "{}:{name}",
                if v[0] == KIND_KMS { "kms" } else { "file" }
            ))
        });
    KeyStatus {
        current_key: current,
        wrapped_by,
        keys: tree.len(),
    }
}
