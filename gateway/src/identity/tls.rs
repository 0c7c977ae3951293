//! The listener's TLS: mutual TLS 1.2/1.3 where every client must present a certificate that
//! chains to one of the configured site CAs, is inside its validity window, and is not on one
//! of the configured certificate revocation lists.

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
    #[error("listener.{key} {path}: {reason}")]
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
            key: "crl",
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

/// Builds the listener's acceptor from PEM files: the client CAs (`ca`), the server
/// certificate chain (`cert`) and its private key (`key`), and the revocation lists `crls`.
/// Errors name the `[listener]` key.
pub fn acceptor(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crls: &Crls,
) -> Result<TlsAcceptor, TlsSetupError> {
    let roots = load_roots(ca)?;
    let certs = load_certs("cert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::File {
        key: "key",
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
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
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

fn load_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("ca", path)? {
        // webpki takes any certificate as a trust anchor; only a CA may anchor device trust,
        // or a leaf (a device's own certificate, say) would vouch for whatever it signs.
        let ca = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| e.to_string())
            .and_then(|(_, c)| c.is_ca().then_some(()).ok_or_else(|| "basicConstraints CA:FALSE (or absent): a leaf certificate cannot be a trust anchor".to_owned()));
        if let Err(reason) = ca {
            return Err(TlsSetupError::File {
                key: "ca",
                path: path.to_owned(),
                reason: format!("not a CA certificate: {reason}"),
            });
        }
        roots.add(cert).map_err(|e| TlsSetupError::File {
            key: "ca",
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}
