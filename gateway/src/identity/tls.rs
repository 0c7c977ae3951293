//! The listener's TLS: mutual TLS 1.2/1.3 where every client must present a certificate that
//! chains to one of the configured site CAs, is inside its validity window, and is not on one
//! of the configured certificate revocation lists. With `[auth.enrollment]` the claim CAs are
//! trusted too, and [`ClaimCheck`] tells their certificates apart after the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Why the listener's TLS could not be set up. Fix the files; retrying will not help.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{key} {path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("listener TLS: {0}")]
    Rustls(String),
}

/// Revocation lists read from PEM files (`[listener] crl`), with what they list.
#[derive(Debug, Clone, Default)]
pub struct Crls {
    pub lists: Vec<CertificateRevocationListDer<'static>>,
    /// Every certificate listed: (issuer DN, serial as lowercase hex).
    pub revoked: std::collections::HashSet<(String, String)>,
}

/// Reads every CRL in `paths` (each file may hold several); errors name `listener.crl`.
pub fn load_crls(paths: &[PathBuf]) -> Result<Crls, TlsSetupError> {
    let mut crls = Crls::default();
    for path in paths {
        let file_err = |reason: String| TlsSetupError::File {
            key: "listener.crl",
            path: path.to_owned(),
            reason,
        };
        let lists: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| file_err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(e.to_string()))?;
        if lists.is_empty() {
            return Err(file_err("holds no PEM X509 CRL".into()));
        }
        for list in lists {
            let (_, parsed) = x509_parser::parse_x509_crl(&list)
                .map_err(|e| file_err(format!("not a valid CRL: {e}")))?;
            let issuer = parsed.issuer().to_string();
            for r in parsed.iter_revoked_certificates() {
                crls.revoked
                    .insert((issuer.clone(), hex::encode(r.raw_serial())));
            }
            crls.lists.push(list);
        }
    }
    Ok(crls)
}

/// Tickets sent after a TLS 1.3 handshake: a device reconnects with one, and each costs the
/// server an encryption (rustls sends 2 by default).
const TLS13_TICKETS: usize = 1;

/// Builds the listener's acceptor from PEM files: the client CAs (`ca`), the server
/// certificate chain (`cert`) and its private key (`key`), the revocation lists `crls`, and
/// the claim CAs of `[auth.enrollment]`, whose certificates [`ClaimCheck`] tells apart.
/// Errors name the `[listener]` key.
pub fn acceptor(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crls: &Crls,
    claim_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsSetupError> {
    let mut roots = load_roots("listener.ca", ca)?;
    if let Some(claim) = claim_ca {
        for anchor in load_roots("auth.enrollment.claim_ca", claim)?.roots {
            roots.roots.push(anchor);
        }
    }
    let certs = load_certs("listener.cert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::File {
        key: "listener.key",
        path: key.to_owned(),
        reason: format!("no usable private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.lists.is_empty() {
        // A device's certificate only (the CAs are the operator's own), and a CA without a
        // list here is not checked rather than every device of it refused.
        builder = builder
            .with_crls(crls.lists.iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    // Session tickets, so a device that comes back (a reconnect storm after a network blip)
    // resumes without a certificate signature and chain check on either side. The ticket
    // keys are this acceptor's own, made here: a revocation list change builds a new
    // acceptor, so no ticket issued before it resumes, and a resumed connection still
    // carries the device's certificate, which the CONNECT checks read as for a full
    // handshake (registry state, policy).
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    config.send_tls13_tickets = TLS13_TICKETS;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let file_err = |reason: String| TlsSetupError::File {
        key,
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn load_roots(key: &'static str, path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        // webpki takes any certificate as a trust anchor; only a CA may anchor device trust,
        // or a leaf (a device's own certificate, say) would vouch for whatever it signs.
        let ca = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| e.to_string())
            .and_then(|(_, c)| c.is_ca().then_some(()).ok_or_else(|| "basicConstraints CA:FALSE (or absent): a leaf certificate cannot be a trust anchor".to_owned()));
        if let Err(reason) = ca {
            return Err(TlsSetupError::File {
                key,
                path: path.to_owned(),
                reason: format!("not a CA certificate: {reason}"),
            });
        }
        roots.add(cert).map_err(|e| TlsSetupError::File {
            key,
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Tells a claim certificate (`[auth.enrollment] claim_ca`) from a device's after the
/// handshake: the listener trusts both CAs, and only this check decides which one a
/// connection's certificate chains to.
#[derive(Debug, Clone)]
pub struct ClaimCheck {
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl ClaimCheck {
    /// Reads the claim CAs from `claim_ca`, refusing one that shares a subject with a CA of
    /// `device_ca` (`listener.ca`): a device's certificate must never pass for a claim, nor a
    /// claim for a device.
    pub fn load(claim_ca: &Path, device_ca: &Path) -> Result<ClaimCheck, TlsSetupError> {
        let key = "auth.enrollment.claim_ca";
        let claims = load_roots(key, claim_ca)?;
        let devices = load_roots("listener.ca", device_ca)?;
        for claim in &claims.roots {
            if devices.roots.iter().any(|d| d.subject == claim.subject) {
                return Err(TlsSetupError::File {
                    key,
                    path: claim_ca.to_owned(),
                    reason: "a claim CA has the subject of a CA in listener.ca; make the claim CA a CA of its own (`sitegate ca init` in another directory, with another site name)".into(),
                });
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(claims), provider)
            .build()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        Ok(ClaimCheck { verifier })
    }

    /// Whether `chain` (end entity first, as the client sent it) chains to a claim CA.
    pub fn holds(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end, intermediates)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(end, intermediates, rustls::pki_types::UnixTime::now())
            .is_ok()
    }
}

/// Whether the CA file `ca` (`listener.ca`) holds the CA certificate `ca_pem`.
pub fn holds_ca(ca: &Path, ca_pem: &str) -> Result<bool, TlsSetupError> {
    let wanted = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| TlsSetupError::Rustls(format!("signing CA: {e}")))?;
    Ok(load_certs("listener.ca", ca)?.contains(&wanted))
}
