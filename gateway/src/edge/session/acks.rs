//! PUBACKs held until the messages of their socket read are durable, released in PUBLISH order.

use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{Packet, PubAck};
use tokio::sync::oneshot;

use crate::pipeline::{Message, Receipt};

use super::Session;

/// PUBACKs of one socket read, held until the read's messages are durable.
pub(super) struct HeldAcks {
    /// `None` when nothing of the read needed spooling; then the acks wait only for the
    /// entries ahead of them, since PUBACKs go out in PUBLISH order.
    pub(super) receipt: Option<Receipt>,
    /// Kept as pkid and reason (4 bytes), not as the packet (392): a thousand devices with
    /// sixteen publishes in flight each hold sixteen thousand of them.
    pub(super) acks: Vec<PubAck>,
}

/// Resolves with the oldest held read's durability (the branch is enabled only when it has a receipt).
pub(super) async fn front_receipt(
    held: &mut std::collections::VecDeque<HeldAcks>,
) -> Result<Result<(), crate::pipeline::CommitError>, tokio::sync::oneshot::error::RecvError> {
    match held.front_mut().and_then(|h| h.receipt.as_mut()) {
        Some(receipt) => receipt.await,
        None => std::future::pending().await,
    }
}

/// How long a closing session waits for the spool to make its last reads durable, so that
/// their PUBACKs still go out.
const CLOSING_WAIT: Duration = Duration::from_secs(2);

impl Session {
    /// Before the connection closes: each held read, in order, gets its PUBACKs once its
    /// messages are durable. The first that is not within [`CLOSING_WAIT`] (or fails) and every
    /// read after it get none, so the device sends those messages again.
    pub(super) async fn release_all_held(&mut self, wbuf: &mut BytesMut) {
        let deadline = tokio::time::Instant::now() + CLOSING_WAIT;
        while let Some(mut front) = self.held.pop_front() {
            if let Some(receipt) = front.receipt.as_mut() {
                if !matches!(
                    tokio::time::timeout_at(deadline, receipt).await,
                    Ok(Ok(Ok(())))
                ) {
                    self.held.clear();
                    return;
                }
            }
            self.write_acks(front.acks, wbuf);
        }
    }

    /// The oldest held read is durable: send its PUBACKs, then those of the reads behind it
    /// that waited only for their turn or whose commit has landed too. One commit often makes
    /// several of a session's reads durable at once; taking them all here puts their PUBACKs
    /// in one write, where waking for each would flush each on its own. Reads are released
    /// strictly from the front, so PUBACKs keep PUBLISH order (MQTT 5 §4.6, MQTT-4.6.0-2).
    ///
    /// `Err` names why a later read's commit failed; neither its PUBACKs nor any after them
    /// are sent, so the device sends those messages again.
    pub(super) fn release_held(&mut self, wbuf: &mut BytesMut) -> Result<(), String> {
        if let Some(front) = self.held.pop_front() {
            self.write_acks(front.acks, wbuf);
        }
        while let Some(next) = self.held.front_mut() {
            if let Some(receipt) = next.receipt.as_mut() {
                let failed = match receipt.try_recv() {
                    Ok(Ok(())) => None,
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Ok(Err(reason)) => Some(reason.to_string()),
                    Err(oneshot::error::TryRecvError::Closed) => Some("pipeline stopped".into()),
                };
                if let Some(reason) = failed {
                    // A taken receipt cannot be awaited again: nothing from here is released.
                    self.held.clear();
                    return Err(reason);
                }
            }
            if let Some(next) = self.held.pop_front() {
                self.write_acks(next.acks, wbuf);
            }
        }
        Ok(())
    }

    fn write_acks(&mut self, acks: Vec<PubAck>, wbuf: &mut BytesMut) {
        for ack in acks {
            self.write(Packet::PubAck(ack, None), wbuf);
        }
    }
}

/// Copies the payloads of one socket read into one buffer of exactly their size. A payload as
/// parsed is a slice of the session's read buffer and would keep that whole buffer (4 KiB or
/// more) alive until its group commit, while the session allocates a fresh one for every read
/// meanwhile: under load that was most of the gateway's memory.
pub(super) fn detach_payloads(messages: &mut [Message]) {
    let total = messages.iter().map(|m| m.payload.len()).sum();
    let mut arena = BytesMut::with_capacity(total);
    for m in messages.iter_mut() {
        arena.extend_from_slice(&m.payload);
        m.payload = arena.split().freeze();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn detached_payloads_keep_their_bytes_but_not_the_read_buffer() {
        let mut read = BytesMut::with_capacity(4096);
        read.extend_from_slice(b"{\"a\":1}{\"b\":22}");
        let read = read.freeze();
        let message = |payload: bytes::Bytes| Message {
            topic: "dt/x".into(),
            payload,
            thing: Arc::from("x"),
            cert_id: Arc::from("c"),
            qos: 1,
            received_at_ms: 0,
            received: std::time::Instant::now(),
            wanted: Default::default(),
            properties: None,
            source_ip: Arc::from("127.0.0.1"),
        };
        let mut messages = vec![message(read.slice(0..7)), message(read.slice(7..15))];
        detach_payloads(&mut messages);
        assert_eq!(&messages[0].payload[..], b"{\"a\":1}");
        assert_eq!(&messages[1].payload[..], b"{\"b\":22}");
        // Only the read buffer's own handle is left: it can be reused for the next read.
        assert!(read.is_unique());
        let inside = |p: &bytes::Bytes| read.as_ptr_range().contains(&p.as_ptr());
        assert!(!messages.iter().any(|m| inside(&m.payload)));
    }
}
