//! Virtual devices: the client side of the device edge, for the demo, the simulator and tests.
//!
//! Each virtual device has its own key and certificate and speaks MQTT over mutual TLS through
//! rumqttc, exactly as a real device would.
//!
//! Layout:
//! - here: one device's credentials and client ([`DeviceCredentials`]).
//! - `simulate`: `sitegate simulate`, thousands of virtual devices against a gateway it
//!   starts, with a summary of what was sent, acknowledged and received.

pub mod simulate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;

use crate::identity::pki::{self, IssuedDevice};

/// Why a virtual device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS client setup: {0}")]
    Tls(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// A device's key, certificate and the CA it trusts for the gateway.
#[derive(Clone)]
pub struct DeviceCredentials {
    pub thing: String,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("DeviceCredentials")
            .field("thing", &self.thing)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, FleetError> {
    std::fs::read(path).map_err(|source| FleetError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl DeviceCredentials {
    /// Loads a device issued by `sitegate device issue`, trusting the CA in `ca_dir`.
    pub fn load(thing: &str, ca_cert: &Path, cert: &Path, key: &Path) -> Result<Self, FleetError> {
        Ok(DeviceCredentials {
            thing: thing.to_owned(),
            ca_pem: read(ca_cert)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    /// Issues a new device certificate from the CA in `ca_dir` into `out_dir` and loads it.
    pub fn issue(
        thing: &str,
        ca_dir: &Path,
        out_dir: &Path,
        days: i64,
    ) -> Result<(Self, IssuedDevice), FleetError> {
        let issued = pki::issue_device(thing, ca_dir, out_dir, days)?;
        let creds = Self::load(
            thing,
            &ca_dir.join(pki::CA_CERT_FILE),
            &issued.cert,
            &issued.key,
        )?;
        Ok((creds, issued))
    }

    /// A rustls client config presenting this device's certificate.
    pub fn client_config(&self) -> Result<ClientConfig, FleetError> {
        sitegate_plugins::tls::mtls_client_config(&self.ca_pem, &self.cert_pem, &self.key_pem)
            .map_err(FleetError::Tls)
    }

    /// MQTT 3.1.1 options for connecting to `gateway` with client id = thing name.
    pub fn mqtt_options(
        &self,
        gateway: SocketAddr,
        keep_alive: Duration,
    ) -> Result<rumqttc::MqttOptions, FleetError> {
        let mut opts =
            rumqttc::MqttOptions::new(&self.thing, gateway.ip().to_string(), gateway.port());
        opts.set_keep_alive(keep_alive);
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(self.client_config()?)),
        ));
        Ok(opts)
    }

    /// MQTT 5 options, as [`Self::mqtt_options`].
    pub fn mqtt5_options(
        &self,
        gateway: SocketAddr,
        keep_alive: Duration,
    ) -> Result<rumqttc::v5::MqttOptions, FleetError> {
        self.mqtt5_options_for(&gateway.ip().to_string(), gateway.port(), keep_alive)
    }

    /// MQTT 5 options for a gateway by name: the name is also what its certificate must show.
    pub fn mqtt5_options_for(
        &self,
        host: &str,
        port: u16,
        keep_alive: Duration,
    ) -> Result<rumqttc::v5::MqttOptions, FleetError> {
        let mut opts = rumqttc::v5::MqttOptions::new(&self.thing, host, port);
        opts.set_keep_alive(keep_alive);
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(self.client_config()?)),
        ));
        Ok(opts)
    }
}
