//! Sink configuration (`[sinks.NAME]`, tagged by `type`) and the registry of factories.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::file::{FileConfig, FileSink};
use crate::iotcore::{IotCoreConfig, IotCoreSink, NucleusSink, Via};
use crate::kinesis::{KinesisConfig, KinesisSink};
use crate::log::{LogConfig, LogSink};
use crate::republish::{LocalBroker, RepublishConfig, RepublishSink};
use crate::sink::{Sink, SinkError};

/// One `[sinks.NAME]` table; `type` picks the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// JSON lines in a local file.
    File(FileConfig),
    /// One log line per record.
    Log(LogConfig),
    /// Amazon Kinesis Data Streams.
    Kinesis(KinesisConfig),
    /// AWS IoT Core: over mutual TLS (or any MQTT 5 broker), or through the Greengrass nucleus.
    Iotcore(IotCoreConfig),
    /// Back into the gateway's local broker.
    Republish(RepublishConfig),
}

impl SinkConfig {
    /// The `type` string of this config.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Log(_) => "log",
            SinkConfig::Kinesis(_) => "kinesis",
            SinkConfig::Iotcore(_) => "iotcore",
            SinkConfig::Republish(_) => "republish",
        }
    }

    /// Pure checks of the sink's own keys; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Log(_) => Ok(()),
            SinkConfig::Kinesis(c) => c.validate(),
            SinkConfig::Iotcore(c) => c.validate(),
            SinkConfig::Republish(c) => c.validate(),
        }
    }

    /// The template its records are rendered with (a topic or a partition key), if any.
    pub fn template(&self) -> Option<&crate::template::Template> {
        match self {
            SinkConfig::Kinesis(c) => Some(&c.partition_key),
            SinkConfig::Iotcore(c) => Some(&c.topic),
            SinkConfig::Republish(c) => Some(&c.topic),
            SinkConfig::File(_) | SinkConfig::Log(_) => None,
        }
    }

    /// File paths in this config, so the loader can resolve them against the config's folder.
    pub fn paths_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            SinkConfig::File(c) => vec![&mut c.path],
            SinkConfig::Iotcore(c) => [&mut c.cert, &mut c.key, &mut c.ca]
                .into_iter()
                .filter_map(Option::as_mut)
                .collect(),
            SinkConfig::Log(_) | SinkConfig::Kinesis(_) | SinkConfig::Republish(_) => Vec::new(),
        }
    }

    /// How long the drain may wait for more records before sending a short batch.
    pub fn linger(&self) -> std::time::Duration {
        match self {
            SinkConfig::Kinesis(c) => c.linger().0,
            _ => std::time::Duration::ZERO,
        }
    }
}

/// What a factory gets besides the sink's own config.
#[derive(Clone)]
pub struct SinkContext {
    /// The sink's name (`[sinks.NAME]`).
    pub name: String,
    /// The site name, stamped on every record.
    pub site: String,
    /// The gateway's local broker, for `republish`.
    pub local: Option<std::sync::Arc<dyn LocalBroker>>,
    /// The Greengrass nucleus, when `[greengrass] ipc = true`, for `iotcore` with `via = "nucleus"`.
    pub nucleus: Option<std::sync::Arc<crate::nucleus::Nucleus>>,
}

/// A sink under construction (connecting may take a while).
pub type SinkBuild = Pin<Box<dyn Future<Output = Result<Box<dyn Sink>, SinkError>> + Send>>;

/// Builds one kind of sink.
pub struct SinkFactory {
    /// The config `type` it handles.
    pub kind: &'static str,
    /// Build a sink from a config of that kind.
    pub build: fn(SinkConfig, SinkContext) -> SinkBuild,
}

/// Every built-in sink kind.
pub fn registry() -> &'static [SinkFactory] {
    &[
        SinkFactory {
            kind: "file",
            build: build_file,
        },
        SinkFactory {
            kind: "log",
            build: build_log,
        },
        SinkFactory {
            kind: "kinesis",
            build: build_kinesis,
        },
        SinkFactory {
            kind: "iotcore",
            build: build_iotcore,
        },
        SinkFactory {
            kind: "republish",
            build: build_republish,
        },
    ]
}

/// Build the sink `config` describes, through the registry.
pub async fn build(config: SinkConfig, context: SinkContext) -> Result<Box<dyn Sink>, SinkError> {
    let factory = registry()
        .iter()
        .find(|f| f.kind == config.kind())
        .ok_or_else(|| {
            SinkError::Config(format!("no factory for sink type {:?}", config.kind()))
        })?;
    (factory.build)(config, context).await
}

fn mismatch(kind: &str, config: &SinkConfig) -> SinkError {
    SinkError::Config(format!("{kind} factory given a {} config", config.kind()))
}

fn build_file(config: SinkConfig, cx: SinkContext) -> SinkBuild {
    Box::pin(async move {
        let SinkConfig::File(c) = config else {
            return Err(mismatch("file", &config));
        };
        Ok(Box::new(FileSink::open(&cx.name, &cx.site, c)) as Box<dyn Sink>)
    })
}

fn build_log(config: SinkConfig, cx: SinkContext) -> SinkBuild {
    Box::pin(async move {
        let SinkConfig::Log(c) = config else {
            return Err(mismatch("log", &config));
        };
        Ok(Box::new(LogSink::new(&cx.name, c)) as Box<dyn Sink>)
    })
}

fn build_kinesis(config: SinkConfig, cx: SinkContext) -> SinkBuild {
    Box::pin(async move {
        let SinkConfig::Kinesis(c) = config else {
            return Err(mismatch("kinesis", &config));
        };
        Ok(Box::new(KinesisSink::new(&cx.name, &cx.site, c).await) as Box<dyn Sink>)
    })
}

fn build_iotcore(config: SinkConfig, cx: SinkContext) -> SinkBuild {
    Box::pin(async move {
        let SinkConfig::Iotcore(c) = config else {
            return Err(mismatch("iotcore", &config));
        };
        match c.via {
            Via::Mqtt => Ok(Box::new(IotCoreSink::new(&cx.name, &cx.site, c)?) as Box<dyn Sink>),
            Via::Nucleus => {
                let nucleus = cx.nucleus.ok_or_else(|| {
                    SinkError::Config(
                        "via = \"nucleus\" needs [greengrass] ipc = true and sitegate running as a Greengrass component".into(),
                    )
                })?;
                Ok(Box::new(NucleusSink::new(&cx.name, &cx.site, c, nucleus)) as Box<dyn Sink>)
            }
        }
    })
}

fn build_republish(config: SinkConfig, cx: SinkContext) -> SinkBuild {
    Box::pin(async move {
        let SinkConfig::Republish(c) = config else {
            return Err(mismatch("republish", &config));
        };
        let local = cx.local.ok_or_else(|| {
            SinkError::Config(
                "republish needs the local broker, which this host does not offer".into(),
            )
        })?;
        Ok(Box::new(RepublishSink::new(&cx.name, &cx.site, c, local)) as Box<dyn Sink>)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn type_selects_the_variant_and_unknown_keys_are_named() {
        let ok: SinkConfig = serde_json::from_str(r#"{"type":"file","path":"a.jsonl"}"#).unwrap();
        assert_eq!(ok.kind(), "file");
        let err = serde_json::from_str::<SinkConfig>(r#"{"type":"file","path":"a","colour":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = serde_json::from_str::<SinkConfig>(r#"{"type":"ftp"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp"), "{err}");
    }

    #[test]
    fn every_kind_has_a_factory() {
        for kind in ["file", "log", "kinesis", "iotcore", "republish"] {
            assert!(registry().iter().any(|f| f.kind == kind), "{kind}");
        }
    }
}
