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
}

impl Identity {
    pub fn from_der(der: &[u8]) -> Result<Identity, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        // One CN, alone in its RDN: with two (or a CN inside a multi-valued RDN) which one names
        // the thing depends on who reads the certificate.
        let subject = cert.subject();
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
        let thing = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(PkiError::NoCommonName)?
            .to_owned();
        Ok(Identity {
            thing,
            cert_id: cert_id(der),
        })
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, days: i64, key: &KeyPair) {
    // A minute of slack for hubs whose clocks trail the machine that issued the certificate.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(days);
    let mut seed = Sha256::new();
    seed.update(key.public_key_raw());
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
