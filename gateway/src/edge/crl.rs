//! Following `[listener] crl`: the revocation lists are read again when a file changes (its
//! modification time or length), the listener's TLS is rebuilt with them, and certificates the
//! registry has seen that a list now names are revoked there, so their live connections end at
//! once. A list that no longer reads keeps the ones in force (a broken file never lets a
//! revoked device back in).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::{EdgeContext, ListenerConfig};
use crate::escape::Escaped;

/// How often the lists' files are looked at.
pub const CRL_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What a file looked like when last read: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Revokes what the lists name, then rebuilds the acceptor whenever a list changes, until
/// `stop`. Does nothing without lists. The rebuilt acceptor trusts the claim CAs of
/// `claim_ca` too.
pub async fn follow_crls(
    listener: ListenerConfig,
    claim_ca: Option<PathBuf>,
    acceptor: watch::Sender<TlsAcceptor>,
    ctx: Arc<EdgeContext>,
    mut stop: watch::Receiver<bool>,
) {
    if listener.crl.is_empty() {
        return;
    }
    // Certificates the registry saw before a list named them (an earlier run) are cut off too.
    apply(&listener, &acceptor, &ctx, false, &claim_ca);
    let mut seen = stamps(&listener.crl);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(CRL_CHECK_INTERVAL) => {}
        }
        let now = stamps(&listener.crl);
        if now == seen {
            continue;
        }
        seen = now;
        apply(&listener, &acceptor, &ctx, true, &claim_ca);
    }
}

fn apply(
    listener: &ListenerConfig,
    acceptor: &watch::Sender<TlsAcceptor>,
    ctx: &EdgeContext,
    rebuild: bool,
    claim_ca: &Option<PathBuf>,
) {
    let crls = match crate::identity::tls::load_crls(&listener.crl) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %Escaped(&e.to_string()), "revocation list unreadable; the lists read before stay in force");
            return;
        }
    };
    if rebuild {
        match listener.acceptor_with(&crls, claim_ca.as_deref()) {
            Ok(a) => {
                acceptor.send_replace(a);
            }
            Err(e) => {
                warn!(error = %Escaped(&e.to_string()), "listener TLS not rebuilt; the lists read before stay in force");
                return;
            }
        }
    }
    match ctx.authority.revoke_listed(&crls.revoked) {
        Ok(revoked) => {
            for (thing, cert) in &revoked {
                warn!(thing = %Escaped(thing), cert_id = %cert, "certificate on a revocation list; revoked");
            }
            info!(
                lists = crls.lists.len(),
                listed = crls.revoked.len(),
                revoked = revoked.len(),
                "revocation lists applied"
            );
        }
        Err(e) => warn!(error = %e, "registry not updated from the revocation lists"),
    }
}
