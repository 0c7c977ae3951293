//! The device-facing accept loop: one task per connection, a bounded TLS handshake, a cap on
//! concurrent connections.
//!
//! Each handshake runs in its connection's own task under `handshake_timeout`, so a client
//! that opens TCP and sends nothing holds only its own task, never the accept loop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::pki::Identity;
use crate::session::{self, EdgeContext};

/// Pause after an accept error (such as running out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts device connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<EdgeContext>,
    handshake_timeout: Duration,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
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
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            ctx.stats.connections_over_limit.fetch_add(1, Relaxed);
            debug!(%peer, max_connections, "connection limit reached; closing new connection");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(handle(
            tcp,
            peer,
            acceptor.clone(),
            Arc::clone(&ctx),
            handshake_timeout,
            permit,
        ));
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<EdgeContext>,
    handshake_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
            info!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            ctx.stats.handshakes_failed.fetch_add(1, Relaxed);
            info!(%peer, timeout_ms = handshake_timeout.as_millis() as u64, "TLS handshake timed out");
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|der| Identity::from_der(der));
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
    session::run(tls, identity, peer, ctx).await;
}
