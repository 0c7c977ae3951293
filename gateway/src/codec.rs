//! MQTT 3.1.1 and 5 framing for device connections, over rumqttd's public protocol codec.
//!
//! The version is read from the CONNECT packet's protocol level before anything is parsed, and
//! the writer adapts what it sends to that version: MQTT 3.1.1 has no properties, no reason
//! codes beyond a few, and no server-sent DISCONNECT.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnectReturnCode, Error as ProtocolError, Packet, Protocol, SubscribeReasonCode,
};

/// The MQTT protocol level a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        })
    }
}

/// Why bytes from a device could not be framed. The connection is closed for all of them.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("first packet is not CONNECT (type {0})")]
    NotConnect(u8),
    #[error("unsupported MQTT protocol level {0} (3.1.1 and 5 are supported)")]
    UnsupportedVersion(u8),
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Reads the protocol level from a (possibly partial) CONNECT. `Ok(None)` means more bytes
/// are needed.
pub fn connect_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect(first >> 4));
    }
    // Skip the remaining-length varint (1 to 4 bytes).
    let mut pos = 1;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Ok(None);
        };
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        if pos > 4 {
            return Err(CodecError::Malformed(
                "remaining length longer than 4 bytes".into(),
            ));
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(pos), buf.get(pos + 1)) else {
        return Ok(None);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    let level_at = pos + 2 + name_len;
    let Some(&level) = buf.get(level_at) else {
        return Ok(None);
    };
    if &buf[pos + 2..level_at] != b"MQTT" {
        return Err(CodecError::UnsupportedVersion(level));
    }
    match level {
        4 => Ok(Some(Version::V311)),
        5 => Ok(Some(Version::V5)),
        other => Err(CodecError::UnsupportedVersion(other)),
    }
}

/// A parsed packet with, for a PUBLISH, its QoS and packet id.
#[derive(Debug)]
pub struct Frame {
    pub packet: Packet,
    /// QoS level from the fixed header (0 for packets other than PUBLISH).
    pub qos: u8,
    /// Packet identifier of a QoS 1 or 2 PUBLISH, else 0.
    pub pkid: u16,
}

/// QoS and packet id of a PUBLISH at the start of `buf`, if it is one and they are present.
fn publish_header(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let mut pos = 1;
    while *buf.get(pos)? & 0x80 != 0 {
        pos += 1;
        if pos > 4 {
            return None;
        }
    }
    pos += 1;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]));
    if qos == 0 {
        return Some((0, 0));
    }
    let at = pos + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])))
}

/// Frames packets of one connection, in its version.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub version: Version,
    max_packet_size: usize,
}

impl Codec {
    pub fn new(version: Version, max_packet_size: usize) -> Codec {
        Codec {
            version,
            max_packet_size,
        }
    }

    /// The next whole packet in `buf`, or `Ok(None)` when more bytes are needed.
    pub fn read(&self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if buf.is_empty() {
            return Ok(None);
        }
        // Read before parsing: the parser consumes the frame and keeps these crate-private.
        let publish = publish_header(buf);
        let max = self.max_packet_size;
        // rumqttd's parser has unreachable!() arms; a hostile packet must only cost its own
        // connection, never a panic that skips the session's clean-up.
        let parsed = catch_unwind(AssertUnwindSafe(|| match self.version {
            Version::V311 => V4.read_mut(buf, max),
            Version::V5 => V5.read_mut(buf, max),
        }))
        .map_err(|_| CodecError::Malformed("parser rejected the packet".into()))?;
        match parsed {
            Ok(packet) => {
                let (qos, pkid) = publish.unwrap_or((0, 0));
                Ok(Some(Frame { packet, qos, pkid }))
            }
            Err(ProtocolError::InsufficientBytes(_)) => Ok(None),
            Err(ProtocolError::PayloadSizeLimitExceeded(n)) => Err(CodecError::TooLarge(n)),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        }
    }

    /// Appends `packet` to `out`, adapted to the connection's version. Returns false when the
    /// packet has no form in this version (a server DISCONNECT on 3.1.1): close instead.
    pub fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<bool, CodecError> {
        let result = match self.version {
            Version::V5 => V5.write(packet, out),
            Version::V311 => match for_v311(packet) {
                Some(p) => V4.write(p, out),
                None => return Ok(false),
            },
        };
        result
            .map(|_| true)
            .map_err(|e| CodecError::Malformed(format!("cannot encode: {e}")))
    }
}

/// Drops what MQTT 3.1.1 cannot carry and maps reason codes onto its few return codes.
fn for_v311(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::SubAck(mut s, _) => {
            for code in &mut s.return_codes {
                *code = match *code {
                    SubscribeReasonCode::Success(q) => SubscribeReasonCode::Success(q),
                    SubscribeReasonCode::QoS0
                    | SubscribeReasonCode::QoS1
                    | SubscribeReasonCode::QoS2 => *code,
                    _ => SubscribeReasonCode::Failure,
                };
            }
            Packet::SubAck(s, None)
        }
        Packet::UnsubAck(u, _) => Packet::UnsubAck(u, None),
        Packet::ConnAck(mut c, _) => {
            c.code = match c.code {
                ConnectReturnCode::Success
                | ConnectReturnCode::RefusedProtocolVersion
                | ConnectReturnCode::ClientIdentifierNotValid
                | ConnectReturnCode::ServiceUnavailable
                | ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized => c.code,
                ConnectReturnCode::ServerBusy
                | ConnectReturnCode::ServerUnavailable
                | ConnectReturnCode::QuotaExceeded => ConnectReturnCode::ServiceUnavailable,
                ConnectReturnCode::UnsupportedProtocolVersion => {
                    ConnectReturnCode::RefusedProtocolVersion
                }
                _ => ConnectReturnCode::NotAuthorized,
            };
            Packet::ConnAck(c, None)
        }
        Packet::Disconnect(..) => return None,
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // CONNECT for client "a", clean session, keepalive 60, at the given level.
    fn connect(level: u8) -> Vec<u8> {
        let mut v = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
        if level == 5 {
            v.push(0); // no properties
        }
        v.extend_from_slice(&[0, 1, b'a']);
        v[1] = (v.len() - 2) as u8;
        v
    }

    #[test]
    fn detects_versions() {
        assert_eq!(connect_version(&connect(4)).unwrap(), Some(Version::V311));
        assert_eq!(connect_version(&connect(5)).unwrap(), Some(Version::V5));
        assert!(matches!(
            connect_version(&connect(3)),
            Err(CodecError::UnsupportedVersion(3))
        ));
        assert_eq!(connect_version(&connect(4)[..5]).unwrap(), None);
        assert!(matches!(
            connect_version(&[0x30, 0]),
            Err(CodecError::NotConnect(3))
        ));
    }

    #[test]
    fn reads_a_connect_split_across_reads() {
        for version in [Version::V311, Version::V5] {
            let level = if version == Version::V5 { 5 } else { 4 };
            let bytes = connect(level);
            let codec = Codec::new(version, 1024);
            let mut buf = BytesMut::from(&bytes[..6]);
            assert!(codec.read(&mut buf).unwrap().is_none());
            buf.extend_from_slice(&bytes[6..]);
            match codec.read(&mut buf).unwrap().map(|f| f.packet) {
                Some(Packet::Connect(c, ..)) => assert_eq!(c.client_id, "a"),
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn publish_qos_and_packet_id_are_read() {
        // QoS 1 PUBLISH to "t/x", packet id 0x1234, payload "hi".
        let bytes = [0x32u8, 9, 0, 3, b't', b'/', b'x', 0x12, 0x34, b'h', b'i'];
        let codec = Codec::new(Version::V311, 1024);
        let frame = codec
            .read(&mut BytesMut::from(&bytes[..]))
            .unwrap()
            .unwrap();
        assert_eq!((frame.qos, frame.pkid), (1, 0x1234));
        match frame.packet {
            Packet::Publish(p, _) => assert_eq!(&p.payload[..], b"hi"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversize_packets_are_refused_before_they_arrive() {
        let codec = Codec::new(Version::V311, 100);
        // PUBLISH announcing 1000 bytes, of which none have arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0xe8, 0x07][..]);
        assert!(matches!(
            codec.read(&mut buf),
            Err(CodecError::TooLarge(1000))
        ));
    }

    #[test]
    fn v311_has_no_server_disconnect() {
        use rumqttd::protocol::{Disconnect, DisconnectReasonCode};
        let codec = Codec::new(Version::V311, 1024);
        let mut out = BytesMut::new();
        let d = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NotAuthorized,
            },
            None,
        );
        assert!(!codec.write(d, &mut out).unwrap());
        assert!(out.is_empty());
    }

    proptest! {
        // Whatever a device sends, reading returns a packet, asks for more, or refuses: it
        // never panics and never loops without consuming.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), v5 in any::<bool>()) {
            let codec = Codec::new(if v5 { Version::V5 } else { Version::V311 }, 256);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..300 {
                let before = buf.len();
                match codec.read(&mut buf) {
                    Ok(Some(_)) => prop_assert!(buf.len() < before),
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = connect_version(&bytes);
        }
    }
}
