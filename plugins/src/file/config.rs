//! `type = "file"`: JSON lines on local disk.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// Size at which the file is rotated when `rotate_bytes` is not given.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 << 20;
/// Rotated files kept when `keep` is not given.
pub const DEFAULT_KEEP: usize = 5;

/// `[sinks.NAME]` with `type = "file"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The JSON-lines file records are appended to; relative paths are taken from the config's folder.
    pub path: PathBuf,
    /// Rotate (rename to `PATH.1`, shifting older ones) once the file reaches this size.
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: ByteSize,
    /// How many rotated files to keep; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// fsync after every batch. On by default: the spool forgets records once this sink has
    /// acknowledged them, so they must be on disk first.
    #[serde(default = "default_fsync")]
    pub fsync: bool,
}

fn default_rotate_bytes() -> ByteSize {
    ByteSize(DEFAULT_ROTATE_BYTES)
}
fn default_keep() -> usize {
    DEFAULT_KEEP
}
fn default_fsync() -> bool {
    true
}

impl FileConfig {
    /// Pure checks; errors name the key below `[sinks.NAME]`.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("`path` is empty".into());
        }
        if self.rotate_bytes.0 < 1024 {
            return Err(format!(
                "`rotate_bytes` is {}, below the 1KiB minimum",
                self.rotate_bytes
            ));
        }
        Ok(())
    }
}
