//! The site's certificates: a CA, the gateway's server certificate, one certificate per device,
//! and the identity read back from a device certificate.
//!
//! Identity follows AWS IoT: the thing name is the subject CN, the certificate id is the
//! lowercase hex SHA-256 of the certificate's DER bytes (what `principal()` returns in IoT Core).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::identity::valid_thing_name;

/// File names inside a CA directory made by `sitegate ca init`.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const GATEWAY_CERT_FILE: &str = "gateway.pem";
pub const GATEWAY_KEY_FILE: &str = "gateway.key";

/// Validity of the site CA.
pub const DEFAULT_CA_DAYS: i64 = 3650;
/// Validity of gateway and device certificates.
pub const DEFAULT_CERT_DAYS: i64 = 825;

/// Why a certificate operation failed. None of these gets better by retrying.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0:?} is not a valid thing name (1-128 of letters, digits, : _ -)")]
    InvalidThing(String),
    #[error("{path} already exists; refusing to overwrite it (revoke the device and remove its files first)")]
    Exists { path: PathBuf },
    #[error("certificate subject has {0} common names; refusing an ambiguous identity")]
    AmbiguousCommonName(usize),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate has no subject CN, so it names no thing")]
    NoCommonName,
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("the CSR's signature does not verify with its own public key: it was altered or made without the key")]
    CsrSignature,
    #[error("the CSR's key is {0}; sitegate signs RSA of 2048 bits or more, EC P-256 or P-384, and Ed25519")]
    WeakKey(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Paths written by [`init_ca`].
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub gateway_cert: PathBuf,
    pub gateway_key: PathBuf,
}

impl CaFiles {
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            gateway_cert: dir.join(GATEWAY_CERT_FILE),
            gateway_key: dir.join(GATEWAY_KEY_FILE),
        }
    }
}

/// What [`issue_device`] wrote.
#[derive(Debug, Clone)]
pub struct IssuedDevice {
    pub thing: String,
    pub cert_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a site CA and a gateway server certificate in `dir`. The server certificate names
/// localhost, 127.0.0.1, ::1, this host's name, and `extra_sans`.
pub fn init_ca(dir: &Path, site: &str, extra_sans: &[String]) -> Result<CaFiles, PkiError> {
    let files = CaFiles::in_dir(dir);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    for p in [&files.ca_key, &files.gateway_key] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name(&format!("sitegate site CA {site}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params, DEFAULT_CA_DAYS, &ca_key);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(host) = host_name() {
        sans.push(host);
    }
    for s in extra_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let gw_key = KeyPair::generate()?;
    let mut gw_params = CertificateParams::new(sans)?;
    gw_params.distinguished_name = name(&format!("sitegate gateway {site}"));
    gw_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    gw_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut gw_params, DEFAULT_CERT_DAYS, &gw_key);
    let gw_cert = gw_params.signed_by(&gw_key, &issuer)?;

    write_public(&files.ca_cert, ca_cert.pem().as_bytes())?;
    write_secret(&files.ca_key, ca_key.serialize_pem().as_bytes())?;
    write_public(&files.gateway_cert, gw_cert.pem().as_bytes())?;
    write_secret(&files.gateway_key, gw_key.serialize_pem().as_bytes())?;
    Ok(files)
}

/// Issues a key and a certificate with subject CN=`thing`, signed by the CA in `ca_dir`,
/// valid from now for `days`.
pub fn issue_device(
    thing: &str,
    ca_dir: &Path,
    out_dir: &Path,
    days: i64,
) -> Result<IssuedDevice, PkiError> {
    issue_device_with_validity(thing, ca_dir, out_dir, 0, days)
}

/// [`issue_device`] with an explicit window: valid from `valid_from_days` (relative to now,
/// may be negative) for `days`.
pub fn issue_device_with_validity(
    thing: &str,
    ca_dir: &Path,
    out_dir: &Path,
    valid_from_days: i64,
    days: i64,
) -> Result<IssuedDevice, PkiError> {
    let device = SiteCa::load(ca_dir)?.issue(thing, valid_from_days, days)?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let cert_path = out_dir.join(format!("{thing}.pem"));
    let key_path = out_dir.join(format!("{thing}.key"));
    // Refuse before writing anything: a new certificate beside the old key (or the other way
    // round) is a pair that no longer matches, and the device stops working.
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    // The key is written first and with `create_new`, so a race with another issuer fails
    // before a certificate exists; a certificate that cannot be written takes its key along.
    write_secret(&key_path, device.key_pem.as_bytes())?;
    if let Err(e) = write_public_new(&cert_path, device.cert_pem.as_bytes()) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(IssuedDevice {
        thing: thing.to_owned(),
        cert_id: device.cert_id,
        cert: cert_path,
        key: key_path,
    })
}

/// A site CA loaded once to issue many device certificates (the simulator's fleet).
pub struct SiteCa {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A device certificate and key, in memory.
pub struct DeviceCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_id: String,
}

impl SiteCa {
    /// Reads the CA certificate and key from `ca_dir` (as `sitegate ca init` wrote them).
    pub fn load(ca_dir: &Path) -> Result<SiteCa, PkiError> {
        let files = CaFiles::in_dir(ca_dir);
        let ca_pem = fs::read_to_string(&files.ca_cert).map_err(io_err(&files.ca_cert))?;
        let ca_key_pem = fs::read_to_string(&files.ca_key).map_err(io_err(&files.ca_key))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        Ok(SiteCa { ca_pem, issuer })
    }

    /// A new key and a certificate with subject CN=`thing`, valid from `valid_from_days`
    /// (relative to now) for `days`.
    pub fn issue(
        &self,
        thing: &str,
        valid_from_days: i64,
        days: i64,
    ) -> Result<DeviceCert, PkiError> {
        if !valid_thing_name(thing) {
            return Err(PkiError::InvalidThing(thing.to_owned()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(thing);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, days, &key);
        params.not_before += Duration::days(valid_from_days);
        params.not_after += Duration::days(valid_from_days);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(DeviceCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_id: cert_id(cert.der()),
        })
    }
}

impl SiteCa {
    /// Signs a device's PKCS#10 request (PEM), so its key never leaves the device: the
    /// request's signature must verify with its own key, its subject must be one CN that is a
    /// valid thing name, and its key RSA of at least 2048 bits, EC P-256/P-384 or Ed25519.
    /// What the request asks for beyond its subject and key (extensions, CA rights) is not
    /// copied: the certificate is a client certificate like [`SiteCa::issue`]'s.
    pub fn sign_csr(&self, csr_pem: &str, days: i64) -> Result<SignedCsr, PkiError> {
        use rustls::pki_types::pem::PemObject as _;
        use x509_parser::prelude::FromDer as _;
        let der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let info = &csr.certification_request_info;
        let thing = thing_of(&info.subject)?;
        if !valid_thing_name(&thing) {
            return Err(PkiError::InvalidThing(thing));
        }
        check_key(&info.subject_pki)?;
        // rcgen verifies the request's signature with its own key as it reads it.
        let mut request =
            rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => PkiError::CsrSignature,
                other => PkiError::BadCsr(other.to_string()),
            })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&thing);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity_for(&mut params, days, info.subject_pki.raw);
        request.params = params;
        let cert = request.signed_by(&self.issuer)?;
        Ok(SignedCsr {
            thing,
            cert_pem: cert.pem(),
            cert_id: cert_id(cert.der()),
            key_digest: hex::encode(Sha256::digest(info.subject_pki.raw)),
        })
    }
}

/// A certificate made from a device's CSR.
#[derive(Debug, Clone)]
pub struct SignedCsr {
    pub thing: String,
    pub cert_pem: String,
    pub cert_id: String,
    /// SHA-256 of the request's public key (its DER SubjectPublicKeyInfo), lowercase hex: the
    /// same key asking again is told apart from another key.
    pub key_digest: String,
}

/// Refuses keys too weak to stand for a device for years.
fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), PkiError> {
    use x509_parser::oid_registry as oid;
    use x509_parser::public_key::PublicKey;
    let alg = &spki.algorithm;
    if alg.algorithm == oid::OID_SIG_ED25519 {
        return Ok(());
    }
    if alg.algorithm == oid::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == oid::OID_EC_P256 || c == oid::OID_NIST_EC_P384 => Ok(()),
            Some(c) => Err(PkiError::WeakKey(format!("EC on curve {c}"))),
            None => Err(PkiError::WeakKey("EC with no named curve".into())),
        };
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            // The modulus without its leading zero bytes.
            let bytes = rsa.modulus.iter().skip_while(|b| **b == 0).count();
            let bits = bytes * 8;
            if bits >= 2048 {
                Ok(())
            } else {
                Err(PkiError::WeakKey(format!("RSA of {bits} bits")))
            }
        }
        _ => Err(PkiError::WeakKey(format!("of type {}", alg.algorithm))),
    }
}

/// Signs the CSR in `csr` with the CA in `ca_dir` and writes `<thing>.pem` into `out_dir`
/// (never over an existing file).
pub fn sign_device_csr(
    csr: &Path,
    ca_dir: &Path,
    out_dir: &Path,
    days: i64,
) -> Result<IssuedCertificate, PkiError> {
    let pem = fs::read_to_string(csr).map_err(io_err(csr))?;
    let signed = SiteCa::load(ca_dir)?.sign_csr(&pem, days)?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let path = out_dir.join(format!("{}.pem", signed.thing));
    write_public_new(&path, signed.cert_pem.as_bytes())?;
    Ok(IssuedCertificate {
        thing: signed.thing,
        cert_id: signed.cert_id,
        cert: path,
    })
}

/// What [`sign_device_csr`] wrote: a certificate for a key the device holds.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub thing: String,
    pub cert_id: String,
    pub cert: PathBuf,
}

/// Lowercase hex SHA-256 of a certificate's DER bytes: AWS IoT's certificate id.
pub fn cert_id(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Who a verified client certificate says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Subject CN.
    pub thing: String,
    /// SHA-256 of the DER, lowercase hex.
    pub cert_id: String,
    /// Issuer DN and serial (lowercase hex), which a revocation list names it by.
    pub issuer: String,
    pub serial: String,
}

impl Identity {
    pub fn from_der(der: &[u8]) -> Result<Identity, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        Ok(Identity {
            thing: thing_of(cert.subject())?,
            cert_id: cert_id(der),
            issuer: cert.issuer().to_string(),
            serial: hex::encode(cert.raw_serial()),
        })
    }
}

/// Whether `der`'s validity period holds now. A full handshake checks it; a resumed TLS
/// session (a ticket lasts hours) does not, so the listener asks this of a resumed one.
pub fn valid_now(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| cert.validity().is_valid())
}

/// The thing a subject names: its one CN, alone in its RDN. With two (or a CN inside a
/// multi-valued RDN) which one names the thing depends on who reads the certificate.
fn thing_of(subject: &x509_parser::x509::X509Name<'_>) -> Result<String, PkiError> {
    let cns = subject.iter_common_name().count();
    if cns > 1 {
        return Err(PkiError::AmbiguousCommonName(cns));
    }
    if subject.iter().any(|rdn| {
        rdn.iter().count() > 1
            && rdn
                .iter()
                .any(|a| *a.attr_type() == x509_parser::oid_registry::OID_X509_COMMON_NAME)
    }) {
        return Err(PkiError::AmbiguousCommonName(cns));
    }
    Ok(subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NoCommonName)?
        .to_owned())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, days: i64, key: &KeyPair) {
    set_validity_for(params, days, key.public_key_raw());
}

/// Validity from now for `days`, and a serial derived from the certified `public` key and the
/// time.
fn set_validity_for(params: &mut CertificateParams, days: i64, public: &[u8]) {
    // A minute of slack for hubs whose clocks trail the machine that issued the certificate.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(days);
    let mut seed = Sha256::new();
    seed.update(public);
    seed.update(now.unix_timestamp_nanos().to_le_bytes());
    let mut serial = seed.finalize()[..16].to_vec();
    serial[0] &= 0x7f; // positive INTEGER
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn host_name() -> Option<String> {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let host = raw.trim();
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then(|| host.to_owned())
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    fs::write(path, bytes).map_err(io_err(path))
}

/// Writes a certificate that must not replace an existing file.
fn write_public_new(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists {
                path: path.to_owned(),
            },
            _ => PkiError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes a private key readable by its owner only (0600), never wider even for a moment.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    crate::secret::write_secret(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;

    /// What the listener asks of a resumed TLS session's certificate.
    #[test]
    fn validity_is_read_from_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "site", &[]).unwrap();
        let der = |d: &IssuedDevice| {
            rustls::pki_types::CertificateDer::from_pem_file(&d.cert)
                .unwrap()
                .to_vec()
        };
        let now = issue_device_with_validity("a", &ca, &dir.path().join("a"), -1, 5).unwrap();
        let expired = issue_device_with_validity("b", &ca, &dir.path().join("b"), -10, 5).unwrap();
        let later = issue_device_with_validity("c", &ca, &dir.path().join("c"), 2, 5).unwrap();
        assert!(valid_now(&der(&now)));
        assert!(!valid_now(&der(&expired)));
        assert!(!valid_now(&der(&later)));
        assert!(!valid_now(b"not a certificate"));
    }

    #[test]
    fn cert_id_matches_openssl_fingerprint() {
        // `openssl x509 -in tests/fixtures/fixed-device.pem -noout -fingerprint -sha256`
        const OPENSSL: &str = "EE:40:11:C6:0D:94:89:76:8E:19:51:28:A8:0D:D8:28:86:C8:64:BA:FB:FE:FB:2F:99:6E:EC:DD:C3:D3:B9:4A";
        let pem = include_bytes!("../../tests/fixtures/fixed-device.pem");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap();
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.cert_id, OPENSSL.replace(':', "").to_lowercase());
        assert_eq!(id.thing, "fixture-thing-1");
    }

    #[test]
    fn ca_and_device_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let files = init_ca(&ca, "plant-7", &["hub.local".into()]).unwrap();
        let mode = fs::metadata(&files.ca_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dev = issue_device("pump-1", &ca, &dir.path().join("dev"), 30).unwrap();
        let mode = fs::metadata(&dev.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = fs::read(&dev.cert).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.thing, "pump-1");
        assert_eq!(id.cert_id, dev.cert_id);
        assert!(
            init_ca(&ca, "plant-7", &[]).is_err(),
            "must not overwrite a CA key"
        );
        assert!(issue_device("bad/name", &ca, dir.path(), 1).is_err());
    }
}
