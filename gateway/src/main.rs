//! The `sitegate` command line: run the gateway, make certificates, manage devices, demo,
//! simulate a fleet.

mod demo;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sitegate::admin::{
    self, AdminClientError, AdminRequest, AdminResponse, AdminService, DeviceView,
};
use sitegate::auth::{Authority, PolicySet, Registry};
use sitegate::config::Config;
use sitegate::daemon::{self, Listeners};
use sitegate::sessions::SessionTable;
use sitegate::simulate::{self, Profile};
use sitegate::stats::Stats;
use sitegate::{greengrass, pki, spool};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sitegate", version, about = "Site gateway for IoT fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a TOML config.
    Run {
        /// TOML config file; relative paths are taken from its folder.
        #[arg(long, short, required_unless_present_any = ["config_json", "config_env"])]
        config: Option<PathBuf>,
        /// The config as JSON (the Greengrass component configuration), instead of a file.
        #[arg(long, conflicts_with_all = ["config", "config_env"])]
        config_json: Option<String>,
        /// Read the JSON config from the SITEGATE_CONFIG_JSON environment variable (how the
        /// Greengrass recipe passes `{configuration:/sitegate}`).
        #[arg(long, conflicts_with = "config")]
        config_env: bool,
        /// Folder that relative paths in a JSON config are taken from (the component's work
        /// folder); default the current folder.
        #[arg(long)]
        base_dir: Option<PathBuf>,
    },
    /// Run a self-contained demo: CA, gateway and a small fleet of virtual devices.
    Demo {
        /// How long the fleet runs before the summary (Ctrl-C stops earlier).
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Also send telemetry to Kinesis at this endpoint (an emulator such as
        /// http://127.0.0.1:5000); the stream `sitegate-demo` is created if missing.
        #[arg(long)]
        kinesis_endpoint: Option<String>,
    },
    /// Run a fleet of virtual devices against a gateway (or any MQTT 5 broker that takes
    /// client certificates), then print a summary.
    Simulate(SimulateArgs),
    /// Site certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Device certificates and the device registry.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// SQL rule files: check them, try them on sample messages, see the running ones.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// AWS IoT Greengrass v2 component support.
    Greengrass {
        #[command(subcommand)]
        command: GreengrassCommand,
    },
    /// The encrypted store-and-forward spool.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate every `*.sql` file in DIR offline; exit 1 listing each error with file, line
    /// and column.
    Check {
        dir: PathBuf,
        /// Also check that every INSERT INTO names a sink of this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run one rule over sample messages (JSON lines: {"topic", "thing", "payload", "ts"}) and
    /// print what it would send, as a table.
    Test {
        file: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Close windows as of this time (Unix ms); default: an hour after the last message.
        #[arg(long)]
        until: Option<i64>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Loaded rules with their counters, and rule files refused, from the running gateway.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GreengrassCommand {
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

#[derive(Subcommand)]
enum SpoolCommand {
    /// Per sink: records and bytes waiting, oldest age, blocks quarantined, the data key.
    /// Asks the running gateway, or reads the data directory of a stopped one.
    Status {
        /// The gateway's config (its admin socket and data_dir).
        #[arg(
            long,
            short,
            conflicts_with = "data_dir",
            required_unless_present = "data_dir"
        )]
        config: Option<PathBuf>,
        /// A stopped gateway's data_dir, read directly.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Salvage records from a damaged store the gateway set aside (`<data_dir>/db.damaged-…`)
    /// into the live spool: the records the ledger lists as lost, each checked by its
    /// authentication tag. Run it while the gateway is stopped.
    Recover {
        /// The gateway's config (its data_dir, sinks and spool keys).
        #[arg(long, short)]
        config: PathBuf,
        /// The damaged store's folder.
        damaged: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create a local key-encryption key file (32 random bytes, mode 0600) for `[spool.encryption] key_file`.
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct SimulateArgs {
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

#[derive(Subcommand)]
enum CaCommand {
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

#[derive(Subcommand)]
enum DeviceCommand {
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

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; exit 1 naming the wrong key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// `println!` that reports a failed write (a closed pipe, as under `| head`) as an error
/// instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli) {
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

/// rumqttd logs every link and subscription at info; the gateway logs what matters of those.
const DEFAULT_LOG: &str = "info,rumqttd=warn";

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    // Colour codes only for a person at a terminal, never into a journal or a log file.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            config_json,
            config_env,
            base_dir,
        } => {
            init_logging(DEFAULT_LOG);
            let config = match (config, config_json, config_env) {
                (Some(path), _, _) => Config::load(&path)?,
                (None, json, from_env) => {
                    let text = match (json, from_env) {
                        (Some(text), _) => text,
                        (None, true) => {
                            std::env::var(greengrass::CONFIG_ENV).with_context(|| {
                                format!("--config-env: {} is not set", greengrass::CONFIG_ENV)
                            })?
                        }
                        (None, false) => bail!("give --config, --config-json or --config-env"),
                    };
                    let base = match base_dir {
                        Some(dir) => dir,
                        None => std::env::current_dir()?,
                    };
                    greengrass::config_from_json(&text, &base)?
                }
            };
            let limit = daemon::raise_fd_limit();
            if (limit as usize) < config.listener.max_connections + 64 {
                tracing::warn!(
                    open_files = limit,
                    max_connections = config.listener.max_connections,
                    "the open-file limit is below listener.max_connections: raise LimitNOFILE (or ulimit -Hn)"
                );
            }
            runtime()?.block_on(async {
                let listeners = Listeners::bind(&config).await?;
                daemon::run(config, listeners, shutdown_signal()).await?;
                Ok(())
            })
        }
        Command::Simulate(args) => {
            init_logging("warn");
            simulate(args)
        }
        Command::Demo {
            seconds,
            kinesis_endpoint,
        } => {
            init_logging("warn");
            runtime()?.block_on(demo::run(
                std::time::Duration::from_secs(seconds),
                kinesis_endpoint,
            ))
        }
        Command::Ca {
            command:
                CaCommand::Init {
                    dir,
                    site,
                    sans,
                    if_missing,
                },
        } => {
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
        Command::Device { command } => device(command),
        Command::Rules { command } => rules_command(command),
        Command::Greengrass {
            command:
                GreengrassCommand::Recipe {
                    version,
                    artifact_uri,
                },
        } => {
            print!("{}", greengrass::recipe_yaml(&version, &artifact_uri));
            Ok(())
        }
        Command::Spool {
            command:
                SpoolCommand::Recover {
                    config,
                    damaged,
                    json,
                },
        } => {
            init_logging("warn");
            let config = Config::load(&config)?;
            let report = runtime()?.block_on(recover(&config, &damaged))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            outln!(
                "read {} files: {} block headers, {} blocks authenticated",
                report.files,
                report.candidates,
                report.blocks
            );
            for (sink, n) in &report.recovered {
                outln!("{sink}: {n} records recovered");
            }
            if report.recovered.is_empty() {
                outln!("no lost record was found in {}", damaged.display());
            }
            for (sink, n) in &report.still_lost {
                outln!("{sink}: {n} records still lost");
            }
            Ok(())
        }
        Command::Spool {
            command: SpoolCommand::Keygen { out },
        } => {
            spool::keys::generate_kek(&out)?;
            outln!("spool key file (0600): {}", out.display());
            Ok(())
        }
        Command::Spool {
            command:
                SpoolCommand::Status {
                    config,
                    data_dir,
                    json,
                },
        } => {
            let status = match (config, data_dir) {
                (Some(config), _) => {
                    let config = Config::load(&config)?;
                    match runtime()?.block_on(admin::request(
                        &config.admin_socket(),
                        &AdminRequest::SpoolStatus,
                    )) {
                        Ok(AdminResponse::Spool { spool }) => spool,
                        Ok(AdminResponse::Error { message }) => bail!(message),
                        Ok(other) => bail!("unexpected answer from the gateway: {other:?}"),
                        Err(AdminClientError::NotRunning(_)) => {
                            offline_spool_status(&config.data_dir)?
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                (None, Some(dir)) => offline_spool_status(&dir)?,
                (None, None) => bail!("give --config or --data-dir"),
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                out!("{}", spool::status::render(&status));
            }
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let c = Config::load(&config)?;
            // `run` loads these too: a config whose TLS files are missing or do not match is
            // not valid, whatever its TOML says.
            sitegate::tls::acceptor(&c.listener)?;
            outln!(
                "{}: valid ({} device groups, {} policies)",
                config.display(),
                c.auth.device_groups.len(),
                c.auth.policies.len()
            );
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or SIGTERM (how Greengrass stops a component).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

fn simulate(args: SimulateArgs) -> Result<()> {
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
    let limit = daemon::raise_fd_limit();
    if (limit as usize) < args.devices + 64 {
        eprintln!(
            "warning: {} devices need about as many open files; the limit is {limit}. Raise it with `ulimit -n {}` (and the hard limit in /etc/security/limits.conf or the unit's LimitNOFILE).",
            args.devices,
            args.devices + 1024
        );
    }
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
            offline(config, std::iter::once(first).chain(requests).collect()).await?
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

fn device(command: DeviceCommand) -> Result<()> {
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

fn rules_command(command: RulesCommand) -> Result<()> {
    match command {
        RulesCommand::Check { dir, config } => {
            let sinks: Option<Vec<String>> = match config {
                Some(c) => Some(Config::load(&c)?.sinks.keys().cloned().collect()),
                None => None,
            };
            let files = sitegate_rules::dir::scan(&dir)
                .with_context(|| format!("reading {}", dir.display()))?;
            if files.is_empty() {
                bail!("no *.sql rule files in {}", dir.display());
            }
            let errors = runtime()?.block_on(async {
                let mut errors = Vec::new();
                for (name, (path, text)) in &files {
                    match sitegate_rules::check(
                        name,
                        &path.display().to_string(),
                        text,
                        sinks.as_deref(),
                    )
                    .await
                    {
                        Ok(spec) => outln!(
                            "{}: ok ({} statement(s))",
                            path.display(),
                            spec.statements.len()
                        ),
                        Err(e) => errors.push(e),
                    }
                }
                Ok::<_, anyhow::Error>(errors)
            })?;
            for e in &errors {
                eprintln!("{e}");
            }
            if !errors.is_empty() {
                bail!("{} of {} rule files refused", errors.len(), files.len());
            }
            Ok(())
        }
        RulesCommand::Test {
            file,
            input,
            until,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let name = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("rule")
                .to_string();
            let samples_text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let samples = sitegate_rules::sample::parse_samples(&samples_text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let outputs = runtime()?.block_on(async {
                let spec =
                    sitegate_rules::check(&name, &file.display().to_string(), &text, None).await?;
                anyhow::Ok(sitegate_rules::sample::run(spec, &samples, None, until).await)
            })?;
            if json {
                for o in &outputs {
                    let row: serde_json::Value = serde_json::from_slice(&o.payload)?;
                    outln!(
                        "{}",
                        serde_json::json!({"sink": o.sink, "thing": o.thing, "row": row})
                    );
                }
            } else {
                print!("{}", sitegate_rules::sample::table(&outputs));
            }
            Ok(())
        }
        RulesCommand::Status { config, json } => {
            let config = Config::load(&config)?;
            let response = runtime()?.block_on(admin::request(
                &config.admin_socket(),
                &AdminRequest::RulesStatus,
            ))?;
            print_response(response, json)
        }
    }
}

/// The key file `sitegate ca init` writes next to the CA.
const SPOOL_KEK_FILE: &str = "spool.kek";

fn offline_spool_status(data_dir: &std::path::Path) -> Result<spool::SpoolStatus> {
    let path = data_dir.join(spool::store::STORE_DIR);
    if !path.exists() {
        bail!(
            "no spool in {} (no {} directory)",
            data_dir.display(),
            path.display()
        );
    }
    let (db, _) = spool::store::open(data_dir, spool::store::OnDamage::Fail)?;
    Ok(spool::status::offline(&db, data_dir)?)
}

/// `sitegate spool recover`: opens the stopped gateway's spool and salvages into it.
async fn recover(config: &Config, damaged: &std::path::Path) -> Result<spool::salvage::Report> {
    config.validate()?;
    let db = daemon::open_store(config, spool::store::OnDamage::Fail)?;
    let spool = spool::Spool::open(
        db,
        &config.spool,
        &config.data_dir,
        config.sinks.keys().cloned(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let report = spool::salvage::recover(&spool, damaged).await?;
    spool.settle().await?;
    Ok(report)
}

/// Asks the running gateway; when none runs, works on the registry directly.
async fn ask_gateway(config: &Config, request: &AdminRequest) -> Result<AdminResponse> {
    match admin::request(&config.admin_socket(), request).await {
        Ok(r) => Ok(r),
        Err(AdminClientError::NotRunning(_)) => offline(config, vec![request.clone()])
            .await?
            .pop()
            .context("no answer from the registry"),
        Err(e) => Err(e.into()),
    }
}

/// Carries out `requests` on a stopped gateway's registry, opened once for all of them.
async fn offline(config: &Config, requests: Vec<AdminRequest>) -> Result<Vec<AdminResponse>> {
    let db = daemon::open_store(config, spool::store::OnDamage::Fail)?;
    let policies = PolicySet::compile(&config.auth)?;
    let service = AdminService {
        authority: Arc::new(Authority::new(
            policies,
            Registry::open(&db, sitegate::disk::DiskGuard::off())?,
        )),
        sessions: Arc::new(SessionTable::default()),
        stats: Arc::new(Stats::default()),
        spool: None,
        rules: Arc::default(),
    };
    let mut responses = Vec::with_capacity(requests.len());
    for request in requests {
        responses.push(service.handle(request).await);
    }
    db.flush()?;
    Ok(responses)
}

fn print_response(response: AdminResponse, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(());
    }
    match response {
        AdminResponse::Error { message } => bail!(message),
        AdminResponse::Device { device } => print_devices(&[device])?,
        AdminResponse::Devices { devices } => print_devices(&devices)?,
        AdminResponse::Status { stats } => outln!("{}", serde_json::to_string_pretty(&stats)?),
        AdminResponse::Spool { spool } => out!("{}", spool::status::render(&spool)),
        AdminResponse::Rules { rules } => {
            outln!(
                "{:<24} {:>10} {:>10} {:>8} {:>6}  SINKS",
                "RULE",
                "ROWS IN",
                "ROWS OUT",
                "ERRORS",
                "LATE"
            );
            for r in &rules.rules {
                outln!(
                    "{:<24} {:>10} {:>10} {:>8} {:>6}  {}",
                    r.name,
                    r.rows_in,
                    r.rows_out,
                    r.errors,
                    r.late_events,
                    r.sinks.join(",")
                );
            }
            for (name, why) in &rules.refused {
                outln!("refused {name}: {why}");
            }
        }
    }
    Ok(())
}

fn print_devices(devices: &[DeviceView]) -> Result<()> {
    outln!(
        "{:<24} {:<9} {:<10} {:<28} CERTIFICATE IDS",
        "THING",
        "STATE",
        "CONNECTED",
        "GROUPS"
    );
    for d in devices {
        let certs: Vec<&str> = d.cert_ids.iter().map(|c| &c[..c.len().min(16)]).collect();
        outln!(
            "{:<24} {:<9} {:<10} {:<28} {}",
            d.thing,
            d.state.to_string(),
            if d.connected { "yes" } else { "no" },
            d.groups.join(","),
            certs.join(",")
        );
    }
    Ok(())
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
