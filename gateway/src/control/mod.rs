//! The control plane: changing what runs while devices stay connected.
//!
//! Above the root `config`, because both parts take a whole [`crate::Config`]:
//! - `live`: [`Live`] applies a new configuration (sinks, routes, rules) in an order that
//!   never loses a record, and names the keys that wait for a restart.
//! - `greengrass`: sitegate as a Greengrass v2 component: the recipe, the configuration from
//!   the nucleus, and following its updates into [`Live`].

pub mod greengrass;
pub mod live;

pub use live::{Applied, ApplyError, Live};
