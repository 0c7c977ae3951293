//! The device edge: where devices connect, prove who they are, and are checked on every packet.
//!
//! Nothing a device sends reaches a dependency (rumqttd, the pipeline) before it has passed the
//! checks here: TLS with a site-CA certificate, CONNECT under a deadline with the client id
//! equal to the certificate's thing, the policy for every PUBLISH, SUBSCRIBE and will, and the
//! per-connection and per-site limits of `[listener]`.
//!
//! Layout:
//! - `config`: the `[listener]` section and its defaults.
//! - `listener`: accept loop, handshake deadline, connection budgets.
//! - `crl`: following `[listener] crl`: the TLS rebuilt and listed certificates revoked.
//! - `codec`: MQTT 3.1.1 / 5 framing over rumqttd's protocol codec, with the checks its parser
//!   skips.
//! - `session/`: one device's session from CONNECT to close, with the policy on every packet
//!   and PUBACKs held until the pipeline's commit; a file per phase (`connect`, `serve`,
//!   `acks`, `close`).
//! - `table`: the live sessions by client id (takeover, revocation, shutdown).
//! - `broker`: rumqttd's router as the local fan-out fabric, rebuilt in generations.
//! - `marks`: what the gateway marks on a publish inside the router.
//! - `offline`: the queues of persistent sessions whose device is away, in the store.
//! - `relay`: a device's own jobs and shadow topics (`$aws/things/<thing>/…`): never another
//!   thing's, and with `[relay]` carried to and from IoT Core on the cloud link.
//! - `harness`: the whole edge in memory, for fuzzers and property tests.

mod broker;
mod codec;
mod config;
mod crl;
pub mod harness;
mod listener;
mod marks;
mod offline;
mod relay;
mod session;
mod table;

pub use broker::{Fabric, FabricLimits, Injected, Republisher};
pub use codec::publish_packet;
pub use config::*;
pub use crl::{follow_crls, CRL_CHECK_INTERVAL};
pub use listener::{bind, serve, Budget, LISTEN_BACKLOG};
pub use offline::OfflineQueues;
pub use relay::{thing_topic, Relay, ShadowCache, ThingTopic, THINGS_PREFIX};
pub use session::{expire_sessions, restore_sessions, EdgeContext, Limits, Restored};
pub use table::{EndReason, Parked, SessionSlot, SessionTable, Subscription};
