//! `sitegate device issue|approve|revoke|list`: device certificates and the registry.

use std::path::PathBuf;

use anyhow::Result;
use sitegate::config::Config;
use sitegate::identity::pki;
use sitegate::ops::admin::AdminRequest;

use super::{ask_gateway, outln, print_response, runtime};

#[derive(clap::Subcommand)]
pub(crate) enum DeviceCommand {
    /// Issue a key and certificate with CN=THING signed by the site CA.
    Issue {
        thing: String,
        /// Directory made by `sitegate ca init`.
        #[arg(long)]
        ca: PathBuf,
        /// Where THING.pem and THING.key are written.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = pki::DEFAULT_CERT_DAYS)]
        days: i64,
    },
    /// Approve THING, optionally adding groups; applies to a live connection at once.
    Approve {
        thing: String,
        /// Group to add (repeatable); must be defined under [auth.device_groups].
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Revoke THING: disconnected within a second and refused from then on.
    Revoke {
        thing: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List things: state, groups, connected, certificate ids.
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
            ca,
            out,
            days,
        } => {
            let issued = pki::issue_device(&thing, &ca, &out, days)?;
            outln!("thing:          {}", issued.thing);
            outln!("certificate id: {}", issued.cert_id);
            outln!("certificate:    {}", issued.cert.display());
            outln!("key (0600):     {}", issued.key.display());
            outln!("trust (CA):     {}", ca.join(pki::CA_CERT_FILE).display());
            return Ok(());
        }
        DeviceCommand::Approve {
            thing,
            groups,
            config,
        } => (config, AdminRequest::Approve { thing, groups }, false),
        DeviceCommand::Revoke { thing, config } => (config, AdminRequest::Revoke { thing }, false),
        DeviceCommand::List { config, json } => (config, AdminRequest::List, json),
    };
    let config = Config::load(&config)?;
    let response = runtime()?.block_on(ask_gateway(&config, &request))?;
    print_response(response, json)
}
