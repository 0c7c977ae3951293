//! The device-facing accept loop: one task per connection, a bounded TLS handshake, a cap on
//! concurrent connections, and a separate, smaller budget (site-wide and per source address)
//! for connections still in their handshake.
//!
//! Each handshake runs in its connection's own task under `handshake_timeout`, so a client
//! that opens TCP and sends nothing holds only its own task, never the accept loop.
//!
//! While the site-wide handshake budget is spent, the loop stops accepting and new
//! connections wait in the kernel's accept queue ([`LISTEN_BACKLOG`]) for a place. Closed
//! instead, every device of a reconnect storm backs off and retries, and the fleet comes back
//! at the pace of its back-off rather than of the handshakes (4,900 devices: back in 2.26 s
//! after 4,033 closed connections, against 0.98 s and none when they queue). One source
//! address over its own share is still closed at once, so a single host cannot fill the queue
//! that everyone else waits in.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::edge::session::{self, EdgeContext};
use crate::identity::pki::Identity;
use crate::metrics::Stats;

/// Pause after an accept error (such as running out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections the kernel may hold for the accept loop (capped by `net.core.somaxconn`, 4096
/// on current Linux). tokio's default of 1024 makes the rest of a 5,000-device storm lose
/// their SYNs and retry a second later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the device listener on `addr` (an address, or a name that resolves to some) with
/// [`LISTEN_BACKLOG`].
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std's and tokio's own bind do: a restarted gateway can take its port back while
        // the last run's connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// The listener's limits, from `[listener]`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Connections that finished their handshake (they hold a certificate of the site's CA).
    pub max_connections: usize,
    /// Connections still in their handshake, site-wide.
    pub max_pending: usize,
    /// Of those, from one source address.
    pub max_pending_per_address: usize,
    pub handshake_timeout: Duration,
}

impl Budget {
    pub fn of(l: &super::ListenerConfig) -> Budget {
        Budget {
            max_connections: l.max_connections,
            max_pending: l.max_pending_connections,
            max_pending_per_address: l.max_pending_per_address,
            handshake_timeout: l.handshake_timeout(),
        }
    }
}

/// Places for connections that have not shown a certificate yet: a site-wide count and one per
/// source address, so sockets that never finish a handshake cannot lock devices out.
struct Pending {
    slots: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
    stats: Arc<Stats>,
}

/// One pending place; given back when dropped (handshake done, failed or timed out).
struct PendingPlace {
    _slot: OwnedSemaphorePermit,
    table: Arc<Pending>,
    ip: IpAddr,
}

impl Pending {
    /// A place for a connection from `ip`, with the site-wide `slot` it was accepted under;
    /// `None` when that address has its share already.
    fn take(self: &Arc<Self>, slot: OwnedSemaphorePermit, ip: IpAddr) -> Option<PendingPlace> {
        let mut per = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let n = per.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        self.stats.handshakes_pending.fetch_add(1, Relaxed);
        Some(PendingPlace {
            _slot: slot,
            table: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PendingPlace {
    fn drop(&mut self) {
        self.table.stats.handshakes_pending.fetch_sub(1, Relaxed);
        let mut per = self
            .table
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// Accepts device connections until `shutdown` turns true, each with the TLS `acceptor`
/// holds at the time (it changes when the revocation lists do).
pub async fn serve(
    listener: TcpListener,
    acceptor: watch::Receiver<TlsAcceptor>,
    ctx: Arc<EdgeContext>,
    budget: Budget,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(budget.max_connections));
    let pending = Arc::new(Pending {
        slots: Arc::new(Semaphore::new(budget.max_pending)),
        per_address: Mutex::new(HashMap::new()),
        max_per_address: budget.max_pending_per_address,
        stats: Arc::clone(&ctx.stats),
    });
    loop {
        let slot = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            slot = Arc::clone(&pending.slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(place) = pending.take(slot, peer.ip()) else {
            ctx.stats.deny("over_pending_limit");
            debug!(%peer, "this address's handshake budget (listener.max_pending_per_address) is spent; closing new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(handle(
            tcp,
            peer,
            acceptor.borrow().clone(),
            Arc::clone(&ctx),
            budget.handshake_timeout,
            place,
            Arc::clone(&slots),
        ));
    }
}

/// The TLS handshake, within `timeout`. It is boxed where it is awaited (as the claim
/// session is), and the stream it gives is boxed too: a future is as large as its largest
/// await, and each async layer that takes a 1.2 KB stream by value keeps a copy of it, so
/// inline they made every connection's task 9.9 KB for its whole life, against 5.0 (debug
/// build).
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: &EdgeContext,
    timeout: Duration,
) -> Option<Box<tokio_rustls::server::TlsStream<TcpStream>>> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(Box::new(tls)),
        Ok(Err(e)) => {
            ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
            info!(%peer, error = %e, "TLS handshake refused");
            None
        }
        Err(_) => {
            ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
            info!(%peer, timeout_ms = timeout.as_millis() as u64, "TLS handshake timed out");
            None
        }
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<EdgeContext>,
    handshake_timeout: Duration,
    place: PendingPlace,
    slots: Arc<Semaphore>,
) {
    let Some(tls) = Box::pin(handshake(tcp, peer, acceptor, &ctx, handshake_timeout)).await else {
        return;
    };
    drop(place);
    let chain = tls.get_ref().1.peer_certificates();
    // A claim certificate never becomes a device: it gets the enrollment topics only, and a
    // place of its own rather than a device's.
    if let (Some(enrollment), Some(chain), Some(end)) = (
        ctx.enrollment.as_ref(),
        chain,
        chain.and_then(|c| c.first()),
    ) {
        if enrollment.is_claim(chain) {
            let claim_cert_id = crate::identity::pki::cert_id(end);
            let Some(_place) = enrollment.session_place() else {
                ctx.stats.deny("claim_refused");
                debug!(%peer, "claim connections (auth.enrollment.max_sessions) full; closing");
                return;
            };
            Box::pin(session::run_claim(tls, claim_cert_id, peer, ctx)).await;
            return;
        }
    }
    let end = chain.and_then(|chain| chain.first());
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        && !end.is_some_and(|der| crate::identity::pki::valid_now(der))
    {
        ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
        info!(%peer, "resumed TLS session's certificate is no longer valid; closing");
        return;
    }
    let identity = end.map(|der| Identity::from_der(der));
    let identity = match identity {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
            info!(%peer, error = %e, "client certificate names no thing; closing");
            return;
        }
        None => {
            // The verifier requires a certificate, so this is unreachable in practice.
            ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
            return;
        }
    };
    // Only a connection that showed a certificate of the site's CA takes a device's place.
    let Ok(_permit) = slots.try_acquire_owned() else {
        ctx.stats.connections_over_limit.fetch_add(1, Relaxed);
        debug!(%peer, "connection limit (listener.max_connections) reached; closing");
        return;
    };
    session::run(tls, identity, peer, ctx).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each device's task carries for its whole connection: the device session's state,
    /// with the handshake, the claim session and the TLS stream on the heap.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_connection_task_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::identity::pki::init_ca(dir.path(), "size", &[]).unwrap();
        let acceptor = crate::identity::tls::acceptor(
            &ca.ca_cert,
            &ca.gateway_cert,
            &ca.gateway_key,
            &Default::default(),
            None,
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let h = crate::edge::harness::Harness::new().unwrap();
        let pending = Arc::new(Pending {
            slots: Arc::new(Semaphore::new(1)),
            per_address: Mutex::new(HashMap::new()),
            max_per_address: 1,
            stats: Arc::clone(&h.context().stats),
        });
        let peer = tcp.local_addr().unwrap();
        let slot = Arc::clone(&pending.slots).try_acquire_owned().unwrap();
        let place = pending.take(slot, peer.ip()).unwrap();
        let task = handle(
            tcp,
            peer,
            acceptor,
            h.context(),
            Duration::from_secs(1),
            place,
            Arc::new(Semaphore::new(1)),
        );
        let size = std::mem::size_of_val(&task);
        // 9,936 bytes (debug build) when the handshake was inline and the stream was passed
        // by value; 5,024 since.
        assert!(size < 6 * 1024, "a connection's future is {size} bytes");
    }
}
