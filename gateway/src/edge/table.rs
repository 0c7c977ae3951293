//! The table of live device sessions, by client id (which is the thing name).
//!
//! It lets a new connection take over an old one with the same client id (the old session is
//! told to end and is waited for, so its router link is gone before the new one is made), lets
//! a revocation reach a live connection, and lets shutdown end them all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A persistent session whose device is away: its subscriptions, when it expires (MQTT 5
/// Session Expiry Interval), and the queued messages it had sent and not had acknowledged
/// (they go out again marked DUP, MQTT-3.3.1-1). Its messages wait in the offline queues; the
/// router holds nothing of it, so its filters are given to the router when the device is back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub filters: Vec<Subscription>,
    pub expires_at: Instant,
    /// Sequences of queued messages sent before and not acknowledged.
    pub sent: Vec<u64>,
}

/// One subscription of a session: the filter, the QoS granted, and the MQTT 5 options the
/// session applies itself (§3.8.3.1; rumqttd's router ignores them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
    /// Not sent the session's own messages.
    pub no_local: bool,
    /// Sent messages with the RETAIN flag they were published with.
    pub retain_as_published: bool,
}

/// Why the gateway ends a session from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Another connection with the same client id arrived.
    TakenOver,
    /// The operator revoked the thing.
    Revoked,
    /// The gateway is stopping.
    Shutdown,
}

struct Entry {
    id: u64,
    end: watch::Sender<Option<EndReason>>,
    ended: watch::Receiver<bool>,
    /// The session's filters as it last told them (for [`SessionTable::has_subscriber`]).
    filters: Vec<String>,
}

/// Live sessions by client id.
#[derive(Default)]
pub struct SessionTable {
    entries: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    /// Subscriptions of persistent sessions while their device is away (the router keeps the
    /// subscriptions themselves; this lets a resumed session re-check them against its grant).
    parked: Mutex<HashMap<String, Parked>>,
}

/// Held by a session while it lives; dropping it removes the entry and wakes waiters.
pub struct SessionSlot {
    table: Arc<SessionTable>,
    client_id: String,
    id: u64,
    ended: watch::Sender<bool>,
    /// Becomes `Some` when the gateway wants this session to end.
    pub end: watch::Receiver<Option<EndReason>>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut entries = self.table.lock();
        if entries
            .get(&self.client_id)
            .is_some_and(|e| e.id == self.id)
        {
            entries.remove(&self.client_id);
        }
        drop(entries);
        self.ended.send_replace(true);
    }
}

impl SessionTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still good to use.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `client_id`, first ending any session that holds it and waiting up to
    /// `wait` for that session to finish.
    pub async fn claim(self: &Arc<Self>, client_id: &str, wait: Duration) -> SessionSlot {
        loop {
            let previous = {
                let mut entries = self.lock();
                match entries.get(client_id) {
                    Some(old) => {
                        old.end.send_replace(Some(EndReason::TakenOver));
                        Some(old.ended.clone())
                    }
                    None => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        let (end_tx, end_rx) = watch::channel(None);
                        let (ended_tx, ended_rx) = watch::channel(false);
                        entries.insert(
                            client_id.to_owned(),
                            Entry {
                                id,
                                end: end_tx,
                                ended: ended_rx,
                                filters: Vec::new(),
                            },
                        );
                        return SessionSlot {
                            table: Arc::clone(self),
                            client_id: client_id.to_owned(),
                            id,
                            ended: ended_tx,
                            end: end_rx,
                        };
                    }
                }
            };
            if let Some(mut ended) = previous {
                let finished = tokio::time::timeout(wait, ended.wait_for(|done| *done)).await;
                if finished.is_err() {
                    // The old session is stuck (e.g. a blocked write); take the slot anyway.
                    self.lock().remove(client_id);
                }
            }
        }
    }

    /// Asks the session of `client_id` to end; false when none is live.
    pub fn end(&self, client_id: &str, reason: EndReason) -> bool {
        self.lock()
            .get(client_id)
            .map(|e| e.end.send_replace(Some(reason)))
            .is_some()
    }

    /// Asks every session to end and waits up to `wait` for them.
    pub async fn end_all(&self, reason: EndReason, wait: Duration) {
        let waiters: Vec<watch::Receiver<bool>> = self
            .lock()
            .values()
            .map(|e| {
                e.end.send_replace(Some(reason));
                e.ended.clone()
            })
            .collect();
        let all = async {
            for mut w in waiters {
                let _ = w.wait_for(|done| *done).await;
            }
        };
        let _ = tokio::time::timeout(wait, all).await;
    }

    /// A live session's filters changed.
    pub fn set_filters(&self, client_id: &str, filters: Vec<String>) {
        if let Some(e) = self.lock().get_mut(client_id) {
            e.filters = filters;
        }
    }

    /// For each of `topics`, whether any session, live or parked, holds a filter matching it.
    /// A walk over every filter, under each lock once: for a batch of messages from inside the
    /// gateway (a downlink), not per device publish.
    pub fn have_subscribers(&self, topics: &[&str]) -> Vec<bool> {
        let mut heard = vec![false; topics.len()];
        let mut mark = |filter: &str| {
            for (h, topic) in heard.iter_mut().zip(topics) {
                *h = *h || crate::topic::matches(topic, filter);
            }
        };
        for e in self.lock().values() {
            e.filters.iter().for_each(|f| mark(f));
        }
        for p in self
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            p.filters.iter().for_each(|s| mark(&s.filter));
        }
        heard
    }

    /// Keeps a persistent session's filters until its device comes back.
    pub fn park(&self, client_id: &str, filters: Parked) {
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_owned(), filters);
    }

    /// Takes back a parked session, expired or not (its queue is there either way).
    pub fn unpark(&self, client_id: &str) -> Option<Parked> {
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client_id)
    }

    /// Removes the parked sessions that expired by `now` and names them.
    pub fn take_expired(&self, now: Instant) -> Vec<String> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<String> = parked
            .iter()
            .filter(|(_, p)| p.expires_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            parked.remove(id);
        }
        expired
    }

    /// Persistent sessions whose device is away.
    pub fn parked(&self) -> usize {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_connected(&self, client_id: &str) -> bool {
        self.lock().contains_key(client_id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_ends_the_first() {
        let table = Arc::new(SessionTable::default());
        let mut first = table.claim("pump-1", Duration::from_secs(5)).await;
        let t2 = Arc::clone(&table);
        let second = tokio::spawn(async move { t2.claim("pump-1", Duration::from_secs(5)).await });
        first.end.wait_for(|r| r.is_some()).await.unwrap();
        assert_eq!(*first.end.borrow(), Some(EndReason::TakenOver));
        drop(first);
        let second = second.await.unwrap();
        assert!(table.is_connected("pump-1"));
        assert_eq!(table.have_subscribers(&["cmd/pump-1/x"]), [false]);
        table.set_filters("pump-1", vec!["cmd/pump-1/#".into()]);
        assert_eq!(
            table.have_subscribers(&["cmd/pump-1/x", "cmd/pump-2/x"]),
            [true, false]
        );
        assert!(table.end("pump-1", EndReason::Revoked));
        assert_eq!(*second.end.borrow(), Some(EndReason::Revoked));
        drop(second);
        assert!(!table.is_connected("pump-1"));
        assert_eq!(table.have_subscribers(&["cmd/pump-1/x"]), [false]);
    }
}
