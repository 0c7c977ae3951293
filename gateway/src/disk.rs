//! The free-space reserve of the data_dir filesystem.
//!
//! sled does not recover in place from a full disk: once a write meets ENOSPC its I/O threads
//! can stay parked for good, and flushes hang or keep failing after space returns. So nothing
//! the gateway writes on a device's behalf may take the disk below a reserve; the spool and the
//! registry ask [`DiskGuard::check`] before they write, and stop taking new data (as when a
//! queue is at `max_bytes`) until the reserve is back. Writes an operator makes (approvals,
//! revocations) and sled's own segment rewrites still fit in the reserve.

use std::path::{Path, PathBuf};

/// The data_dir filesystem has less free space than the reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the data_dir filesystem has {free} bytes free, below the {reserve}-byte reserve (spool.disk_reserve)")]
pub struct DiskLow {
    pub free: u64,
    pub reserve: u64,
}

/// Watches the free space of one directory's filesystem.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    dir: PathBuf,
    reserve: u64,
}

impl DiskGuard {
    /// A guard keeping `reserve` bytes free on the filesystem holding `dir`; 0 turns it off.
    pub fn new(dir: &Path, reserve: u64) -> DiskGuard {
        DiskGuard {
            dir: dir.to_owned(),
            reserve,
        }
    }

    /// No reserve: every check passes (tests of other parts, tools working offline).
    pub fn off() -> DiskGuard {
        DiskGuard::new(Path::new("."), 0)
    }

    /// The reserve in bytes.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Bytes free for unprivileged writers on the filesystem, if the system says.
    pub fn free(&self) -> Option<u64> {
        fs2::available_space(&self.dir).ok()
    }

    /// `Err` when fewer than `reserve + incoming` bytes are free. A filesystem that cannot be
    /// asked passes: the writes themselves will report what is wrong with it.
    pub fn check(&self, incoming: u64) -> Result<(), DiskLow> {
        if self.reserve == 0 {
            return Ok(());
        }
        match self.free() {
            Some(free) if free < self.reserve.saturating_add(incoming) => Err(DiskLow {
                free,
                reserve: self.reserve,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_any_disk_refuses_and_zero_never_does() {
        let dir = std::env::temp_dir();
        let huge = DiskGuard::new(&dir, u64::MAX / 2);
        let low = huge.check(0).unwrap_err();
        assert_eq!(low.reserve, u64::MAX / 2);
        assert!(low.to_string().contains("spool.disk_reserve"));
        assert!(DiskGuard::new(&dir, 0).check(u64::MAX).is_ok());
        assert!(DiskGuard::new(&dir, 1).check(0).is_ok());
    }
}
