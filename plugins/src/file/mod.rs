//! The file sink: records as JSON lines (the [`Record::envelope`] shape), with size rotation.

mod config;
#[cfg(test)]
mod tests;

pub use config::{FileConfig, DEFAULT_KEEP, DEFAULT_ROTATE_BYTES};

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::record::Record;
use crate::sink::{Ack, Sink, SinkError};

/// Appends records to a file, one JSON object per line.
pub struct FileSink {
    name: String,
    site: String,
    config: FileConfig,
    // `None` only while a blocking write owns it.
    file: Option<OpenFile>,
}

struct OpenFile {
    file: File,
    len: u64,
}

impl FileSink {
    /// Open (creating parents and the file) for appending.
    ///
    /// A path that cannot be opened yet (a disk not mounted) is not fatal: records wait in the
    /// spool and every send tries again.
    pub fn open(name: &str, site: &str, config: FileConfig) -> Self {
        let file = match open_append(&config.path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(sink = name, path = %config.path.display(), error = %e, "file sink cannot open its file yet; records stay in the spool");
                None
            }
        };
        FileSink {
            name: name.into(),
            site: site.into(),
            config,
            file,
        }
    }
}

fn open_append(path: &Path) -> Result<OpenFile, SinkError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let mut len = file.metadata()?.len();
    if ends_mid_line(&mut file, len)? {
        // A crash cut the last batch short. Its records were never acknowledged, so they come
        // again; ending the fragment here keeps the first of them from being glued onto it
        // (which would make that whole line unreadable). The fragment's bytes are kept.
        tracing::warn!(path = %path.display(), "file sink: the file ended mid-line (an interrupted write); that line is closed and left as it is");
        file.write_all(b"\n")?;
        len += 1;
    }
    Ok(OpenFile { file, len })
}

/// Whether a non-empty file's last byte is not a newline.
fn ends_mid_line(file: &mut File, len: u64) -> std::io::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Shift `PATH.k` to `PATH.k+1` (dropping the oldest), move `PATH` to `PATH.1`, reopen `PATH`.
fn rotate(path: &Path, keep: usize) -> Result<OpenFile, SinkError> {
    if keep == 0 {
        std::fs::remove_file(path)?;
    } else {
        let _ = std::fs::remove_file(rotated(path, keep));
        for n in (1..keep).rev() {
            let from = rotated(path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(path, n + 1))?;
            }
        }
        std::fs::rename(path, rotated(path, 1))?;
    }
    open_append(path)
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError> {
        let mut lines = Vec::with_capacity(batch.len() * 256);
        for record in batch {
            lines.extend_from_slice(&record.envelope_bytes(&self.site));
            lines.push(b'\n');
        }
        let mut open = match self.file.take() {
            Some(open) => open,
            None => open_append(&self.config.path)?,
        };
        let config = self.config.clone();
        let (open, result) = tokio::task::spawn_blocking(move || {
            let result = (|| -> Result<(), SinkError> {
                open.file.write_all(&lines)?;
                if config.fsync {
                    open.file.sync_data()?;
                }
                open.len += lines.len() as u64;
                Ok(())
            })();
            let open = if result.is_ok() && open.len >= config.rotate_bytes.0 {
                match rotate(&config.path, config.keep) {
                    Ok(fresh) => fresh,
                    Err(e) => {
                        tracing::warn!(path = %config.path.display(), error = %e, "file sink: rotation failed; still appending");
                        open
                    }
                }
            } else {
                open
            };
            (open, result)
        })
        .await
        .map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        self.file = Some(open);
        // A failed write may have left a partial line; the batch is resent whole, and readers
        // of the file skip a line that does not parse.
        result.map(|()| Ack::all(batch.len()))
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        if let Some(open) = &self.file {
            open.file.sync_all()?;
        }
        Ok(())
    }
}
