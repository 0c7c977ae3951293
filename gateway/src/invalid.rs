//! The one error every configuration section's `validate()` returns: which key, and why.
//!
//! Sections live with the code they configure; each checks itself without I/O and names the
//! refused key by its full path (`listener.max_packet_size`), so the root `config` only adds
//! the checks that span sections.

/// A configuration value that was refused. Never retryable: the configuration has to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct Invalid {
    /// The full key, e.g. `spool.encryption.rotate_blocks`.
    pub key: String,
    /// What is wrong and, where it helps, what would be right.
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
