//! `sitegate simulate`: a fleet of virtual devices against a gateway, then a summary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sitegate::config::Config;
use sitegate::daemon;
use sitegate::fleet::simulate::{self, Profile};
use sitegate::ops::admin::{self, AdminClientError, AdminRequest, AdminResponse};

use super::{init_logging, runtime};

#[derive(clap::Args)]
pub(crate) struct SimulateArgs {
    /// Gateway address, HOST:PORT.
    #[arg(long)]
    gateway: String,
    /// Site CA folder (`sitegate ca init`): trusted for the gateway, and used to issue the
    /// devices' certificates in memory unless --certs is given.
    #[arg(long)]
    ca: PathBuf,
    /// Load THING.pem and THING.key from this folder instead of issuing certificates.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Number of devices, each with its own certificate and connection.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Messages per second across the fleet; 0 publishes as fast as PUBACKs come back.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of publishing (before and after the storm, with --storm).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The devices' thing type.
    #[arg(long, value_enum, default_value_t = Profile::Mixed)]
    profile: Profile,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Pad payloads to at least this many bytes.
    #[arg(long)]
    payload_bytes: Option<usize>,
    /// Devices are named PREFIX-PROFILE-N.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Approve every device into GROUP before connecting (through --config's admin socket,
    /// or the registry when the gateway is stopped).
    #[arg(long, requires = "config")]
    approve_as: Option<String>,
    /// The gateway's config file, for --approve-as.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This many devices send bad JSON, oversize payloads and forbidden topics now and then.
    #[arg(long, default_value_t = 0)]
    misbehaving: usize,
    /// New connections per second while the fleet comes up.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Chance per acknowledged publish that a device drops its link and reconnects.
    #[arg(long, default_value_t = 0.0)]
    reconnect_chance: f64,
    /// QoS 1 publishes each device keeps in flight.
    #[arg(long, default_value_t = 16)]
    inflight: u16,
    /// After --duration, drop all devices but --storm-keep at once and time their return.
    #[arg(long)]
    storm: bool,
    /// Devices that stay connected through the storm.
    #[arg(long, default_value_t = 50)]
    storm_keep: usize,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub(crate) fn run(args: SimulateArgs) -> Result<()> {
    init_logging("warn");
    use std::net::ToSocketAddrs;
    let (host, port) = args
        .gateway
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>().ok()?,
            ))
        })
        .with_context(|| format!("--gateway {}: expected HOST:PORT", args.gateway))?;
    (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("--gateway {}", args.gateway))?
        .next()
        .with_context(|| format!("--gateway {} resolves to no address", args.gateway))?;
    let rt = runtime()?;
    if let (Some(group), Some(config)) = (&args.approve_as, &args.config) {
        let config = Config::load(config)?;
        let names = simulate::device_names(&args.prefix, args.profile, args.devices);
        let approved = rt.block_on(approve_all(&config, &names, group))?;
        eprintln!("approved {approved} devices into group {group}");
    }
    daemon::check_fd_limit(args.devices, "--devices");
    let options = simulate::Options {
        host,
        port,
        ca_dir: args.ca,
        certs_dir: args.certs,
        devices: args.devices,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        profile: args.profile,
        qos: args.qos,
        payload_bytes: args.payload_bytes,
        prefix: args.prefix,
        misbehaving: args.misbehaving,
        connect_rate: args.connect_rate,
        reconnect_chance: args.reconnect_chance,
        inflight: args.inflight,
        storm: args.storm.then_some(simulate::StormOptions {
            keep: args.storm_keep,
            settle: Duration::from_secs(args.duration),
        }),
        progress: !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = rt.block_on(simulate::run(options))?;
    print!("{}", summary.text());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Approves `things` into `group`: through the running gateway, or on its registry when it is
/// stopped (opened once for all of them).
async fn approve_all(config: &Config, things: &[String], group: &str) -> Result<usize> {
    let mut requests = things.iter().map(|thing| AdminRequest::Approve {
        cert: None,
        thing: thing.clone(),
        groups: vec![group.to_string()],
    });
    let Some(first) = requests.next() else {
        return Ok(0);
    };
    let responses = match admin::request(&config.admin_socket(), &first).await {
        Ok(response) => {
            let mut responses = vec![response];
            for request in requests {
                responses.push(admin::request(&config.admin_socket(), &request).await?);
            }
            responses
        }
        Err(AdminClientError::NotRunning(_)) => {
            daemon::offline(config, std::iter::once(first).chain(requests).collect()).await?
        }
        Err(e) => return Err(e.into()),
    };
    for response in responses {
        if let AdminResponse::Error { message } = response {
            bail!(message);
        }
    }
    Ok(things.len())
}
