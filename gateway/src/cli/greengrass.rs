//! `sitegate greengrass recipe`: the component recipe for this build.

use anyhow::Result;
use sitegate::control::greengrass;

#[derive(clap::Subcommand)]
pub(crate) enum GreengrassCommand {
    /// Print the component recipe (YAML) for this build.
    Recipe {
        /// Component version; defaults to this build's version.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        version: String,
        /// Where the binary is uploaded; `{arch}` becomes x86_64 or aarch64 per manifest.
        #[arg(long)]
        artifact_uri: String,
    },
}

pub(crate) fn run(command: GreengrassCommand) -> Result<()> {
    let GreengrassCommand::Recipe {
        version,
        artifact_uri,
    } = command;
    print!("{}", greengrass::recipe_yaml(&version, &artifact_uri));
    Ok(())
}
