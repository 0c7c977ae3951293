//! `sitegate device issue|sign|approve|revoke|list`: device certificates and the registry.

use std::path::PathBuf;

use anyhow::Result;
use sitegate::config::Config;
use sitegate::identity::pki;
use sitegate::ops::admin::AdminRequest;

use super::{ask_gateway, outln, print_response, runtime};

/// The CA that signs, where the certificate goes, and for how long.
#[derive(clap::Args)]
pub(crate) struct Signing {
    /// Directory made by `sitegate ca init`.
    #[arg(long)]
    ca: PathBuf,
    /// Where THING.pem (and, for `issue`, THING.key) is written.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = pki::DEFAULT_CERT_DAYS)]
    days: i64,
}

#[derive(clap::Subcommand)]
pub(crate) enum DeviceCommand {
    /// Issue a key and certificate with CN=THING signed by the site CA.
    Issue {
        thing: String,
        #[command(flatten)]
        signing: Signing,
    },
    /// Sign a device's certificate request (made with its own key, e.g. `openssl req`): the
    /// subject CN is the thing name; writes THING.pem into --out and prints the certificate id
    /// to approve. The key never leaves the device.
    Sign {
        /// The PKCS#10 request, PEM.
        #[arg(long)]
        csr: PathBuf,
        #[command(flatten)]
        signing: Signing,
    },
    /// Approve THING's pending certificates (or, with --cert, that one, even before it
    /// connects), optionally adding groups; applies to a live connection at once. A revoked
    /// certificate is never approved again.
    Approve {
        thing: String,
        /// One certificate id (as `device issue` prints it) instead of the pending ones.
        #[arg(long)]
        cert: Option<String>,
        /// Group to add (repeatable); must be defined under [auth.device_groups].
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Revoke THING (every certificate of it), or with --cert one certificate: disconnected
    /// within a second and refused from then on.
    Revoke {
        #[arg(required_unless_present = "cert")]
        thing: Option<String>,
        /// One certificate id only (THING may then be left out).
        #[arg(long)]
        cert: Option<String>,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask the AWS IoT registry ([auth.registry]) about every certificate now, and apply its
    /// answers to live connections.
    Sync {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List things: state, groups, connected, and each certificate with its state.
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(command: DeviceCommand) -> Result<()> {
    let (config, request, json) = match command {
        DeviceCommand::Issue {
            thing,
            signing: Signing { ca, out, days },
        } => {
            let issued = pki::issue_device(&thing, &ca, &out, days)?;
            print_signed(
                &issued.thing,
                &issued.cert_id,
                &issued.cert,
                Some(&issued.key),
                &ca,
            )?;
            return Ok(());
        }
        DeviceCommand::Sign {
            csr,
            signing: Signing { ca, out, days },
        } => {
            let signed = pki::sign_device_csr(&csr, &ca, &out, days)?;
            print_signed(&signed.thing, &signed.cert_id, &signed.cert, None, &ca)?;
            outln!(
                "approve with:   sitegate device approve {} --cert {}",
                signed.thing,
                signed.cert_id
            );
            return Ok(());
        }
        DeviceCommand::Approve {
            thing,
            cert,
            groups,
            config,
        } => (
            config,
            AdminRequest::Approve {
                thing,
                cert,
                groups,
            },
            false,
        ),
        DeviceCommand::Revoke {
            thing,
            cert,
            config,
        } => (config, AdminRequest::Revoke { thing, cert }, false),
        DeviceCommand::Sync { config } => (config, AdminRequest::Sync, false),
        DeviceCommand::List { config, json } => (config, AdminRequest::List, json),
    };
    let config = Config::load(&config)?;
    let response = runtime()?.block_on(ask_gateway(&config, &request))?;
    print_response(response, json)
}

/// What `issue` and `sign` wrote, and the CA a device must trust.
fn print_signed(
    thing: &str,
    cert_id: &str,
    cert: &std::path::Path,
    key: Option<&std::path::Path>,
    ca: &std::path::Path,
) -> Result<()> {
    outln!("thing:          {thing}");
    outln!("certificate id: {cert_id}");
    outln!("certificate:    {}", cert.display());
    if let Some(key) = key {
        outln!("key (0600):     {}", key.display());
    }
    outln!("trust (CA):     {}", ca.join(pki::CA_CERT_FILE).display());
    Ok(())
}
