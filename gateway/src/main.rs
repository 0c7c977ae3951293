//! The `sitegate` command line: run the gateway, make certificates, manage devices, demo,
//! simulate a fleet. Each subcommand is a module of `cli` with its options and `run()`.

mod cli;

/// jemalloc, not glibc's malloc: after a flood of distinct filters, topics and retained
/// messages, glibc kept the freed memory in its per-thread arenas (anonymous memory 6 → 89 MiB
/// after the sessions ended; 6 → 55 MiB with two arenas and a trim threshold), where jemalloc
/// with a background thread hands it back (7 → 36 MiB; Mosquitto on the same rounds 9 → 36 MiB).
/// Its settings are built in from `.cargo/config.toml`; `_RJEM_MALLOC_CONF` overrides them.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sitegate", version, about = "Site gateway for IoT fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a TOML config.
    Run(cli::run::RunArgs),
    /// Run a self-contained demo: CA, gateway and a small fleet of virtual devices.
    Demo(cli::demo::DemoArgs),
    /// Run a fleet of virtual devices against a gateway (or any MQTT 5 broker that takes
    /// client certificates), then print a summary.
    Simulate(cli::simulate::SimulateArgs),
    /// Site certificate authority.
    Ca {
        #[command(subcommand)]
        command: cli::ca::CaCommand,
    },
    /// Device certificates and the device registry.
    Device {
        #[command(subcommand)]
        command: cli::device::DeviceCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: cli::config::ConfigCommand,
    },
    /// SQL rule files: check them, try them on sample messages, see the running ones.
    Rules {
        #[command(subcommand)]
        command: cli::rules::RulesCommand,
    },
    /// AWS IoT Greengrass v2 component support.
    Greengrass {
        #[command(subcommand)]
        command: cli::greengrass::GreengrassCommand,
    },
    /// The encrypted store-and-forward spool.
    Spool {
        #[command(subcommand)]
        command: cli::spool::SpoolCommand,
    },
    /// Cloud to device: the cloud links and the downlinks.
    Downlink {
        #[command(subcommand)]
        command: cli::downlink::DownlinkCommand,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Simulate(args) => cli::simulate::run(args),
        Command::Ca { command } => cli::ca::run(command),
        Command::Device { command } => cli::device::run(command),
        Command::Config { command } => cli::config::run(command),
        Command::Rules { command } => cli::rules::run(command),
        Command::Greengrass { command } => cli::greengrass::run(command),
        Command::Spool { command } => cli::spool::run(command),
        Command::Downlink { command } => cli::downlink::run(command),
    };
    if let Err(e) = result {
        // A reader that stopped reading (`sitegate device list | head`) is not an error.
        let closed_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if closed_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {}", render(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", each said once: many errors name their cause in
/// their own message and hand it on as `source()` too, which `{:#}` printed twice.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(sitegate::config::ConfigError::Read {
            path: "nope.toml".into(),
            source: io,
        })
        .context("loading the config");
        assert_eq!(
            super::render(&e),
            "loading the config: cannot read config nope.toml: No such file"
        );
    }
}
