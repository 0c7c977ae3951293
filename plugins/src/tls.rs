//! Mutual-TLS client configuration from PEM bytes (rustls with ring), for the IoT Core sink
//! and the gateway's virtual devices.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A client config that trusts the CAs in `ca_pem` and presents `cert_pem` / `key_pem`.
pub fn mtls_client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<ClientConfig, String> {
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| err("CA certificate", &e))?)
            .map_err(|e| err("CA certificate", &e))?;
    }
    if roots.is_empty() {
        return Err("no CA certificate found in the CA PEM".into());
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| err("certificate", &e))?;
    if chain.is_empty() {
        return Err("no certificate found in the certificate PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| err("private key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("TLS versions", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| err("client certificate", &e))
}
