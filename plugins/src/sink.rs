//! The seam between the spool's drain and the outside world.

use async_trait::async_trait;

use crate::record::Record;

/// Something that takes batches of records somewhere.
///
/// The drain calls `send` with records in queue order and removes from the spool only what the
/// returned [`Ack`] covers, so a sink must never acknowledge a record it has not handed over.
#[async_trait]
pub trait Sink: Send {
    /// The sink's name from the config (`[sinks.NAME]`).
    fn name(&self) -> &str;

    /// Deliver `batch`, in order. On `Err`, nothing of the batch counts as delivered.
    async fn send(&mut self, batch: &[Record]) -> Result<Ack, SinkError>;

    /// Push out anything buffered (files: fsync).
    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Flush and release connections; called once at shutdown.
    async fn close(&mut self) -> Result<(), SinkError> {
        self.flush().await
    }
}

/// What a `send` achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ack {
    /// How many records from the start of the batch are done: delivered, or rejected below.
    /// The drain sends the rest again.
    pub done: usize,
    /// Records among the done ones that can never be delivered (too large, invalid); the drain
    /// routes them to the error sink with the reason instead of retrying.
    pub rejected: Vec<Rejected>,
}

impl Ack {
    /// Every record of a batch of `len` was delivered.
    pub fn all(len: usize) -> Self {
        Ack {
            done: len,
            rejected: Vec::new(),
        }
    }
}

/// A record a sink refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the record in the batch passed to `send`.
    pub index: usize,
    /// Why, in words an operator can act on.
    pub reason: String,
}

/// Why a send failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The service asked us to slow down.
    #[error("throttled: {0}")]
    Throttled(String),
    /// Could not reach the service, or the connection broke.
    #[error("network: {0}")]
    Network(String),
    /// The service failed on its side (5xx).
    #[error("server error: {0}")]
    Server(String),
    /// The service refused the request as malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request or a record is over a limit of the service.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Credentials are missing or do not grant the action.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The sink cannot be built from its configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// Local I/O failed (disk full, permissions).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SinkError {
    /// Whether sending the same batch again later can succeed.
    ///
    /// The drain retries everything with backoff either way, since dropping spooled data is
    /// never its call; this decides how loudly it complains and how fast it retries.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Throttled(_)
                | SinkError::Network(_)
                | SinkError::Server(_)
                | SinkError::Io(_)
        )
    }
}
