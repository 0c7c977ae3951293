//! `sitegate ca init`: the site CA, the gateway's certificate and the spool's key file.

use std::path::PathBuf;

use anyhow::Result;
use sitegate::identity::pki;
use sitegate::spool;

use super::outln;

#[derive(clap::Subcommand)]
pub(crate) enum CaCommand {
    /// Create a site CA and a gateway server certificate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Site name written into the certificates' subjects.
        #[arg(long, default_value = "site")]
        site: String,
        /// Extra subject alternative name for the gateway certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Do nothing when DIR already holds a CA (for install scripts that run on every deploy).
        #[arg(long)]
        if_missing: bool,
    },
}

/// The key file `sitegate ca init` writes next to the CA.
const SPOOL_KEK_FILE: &str = "spool.kek";

pub(crate) fn run(command: CaCommand) -> Result<()> {
    let CaCommand::Init {
        dir,
        site,
        sans,
        if_missing,
    } = command;
    if if_missing && dir.join(pki::CA_CERT_FILE).exists() {
        outln!("site CA already in {}; nothing to do", dir.display());
        return Ok(());
    }
    let files = pki::init_ca(&dir, &site, &sans)?;
    let kek = dir.join(SPOOL_KEK_FILE);
    spool::keys::generate_kek(&kek)?;
    outln!("site CA:             {}", files.ca_cert.display());
    outln!("site CA key (0600):  {}", files.ca_key.display());
    outln!("gateway certificate: {}", files.gateway_cert.display());
    outln!("gateway key (0600):  {}", files.gateway_key.display());
    outln!("spool key file (0600): {}", kek.display());
    Ok(())
}
