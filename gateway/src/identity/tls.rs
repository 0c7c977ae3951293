//! The listener's TLS: mutual TLS 1.2/1.3 where every client must present a certificate that
//! chains to one of the configured site CAs and is inside its validity window.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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

/// Builds the listener's acceptor from PEM files: the client CAs (`ca`), the server
/// certificate chain (`cert`) and its private key (`key`). Errors name the `[listener]` key.
pub fn acceptor(ca: &Path, cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let roots = load_roots(ca)?;
    let certs = load_certs("cert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::File {
        key: "key",
        path: key.to_owned(),
        reason: format!("no usable private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
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
