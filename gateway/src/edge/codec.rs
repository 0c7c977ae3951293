//! MQTT 3.1.1 and 5 framing for device connections, over rumqttd's public protocol codec.
//!
//! The version is read from the CONNECT packet's protocol level before anything is parsed, and
//! the writer adapts what it sends to that version: MQTT 3.1.1 has no properties, no reason
//! codes beyond a few, and no server-sent DISCONNECT.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnectReturnCode, Error as ProtocolError, Packet, Protocol, Publish, QoS, SubscribeReasonCode,
};

/// The MQTT protocol level a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
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
pub(super) enum CodecError {
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
pub(super) fn connect_version(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect(first >> 4));
    }
    let Some((pos, _)) = fixed_header(buf)? else {
        return Ok(None);
    };
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

/// MQTT's variable byte integer at the start of `buf` (§1.5.5): its value and length, `None`
/// while incomplete; more than four bytes is malformed.
fn varint(buf: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut value = 0usize;
    for (i, &b) in buf.iter().enumerate() {
        if i == 4 {
            break;
        }
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    match buf.len() >= 4 {
        true => Err(CodecError::Malformed(
            "variable byte integer longer than 4 bytes".into(),
        )),
        false => Ok(None),
    }
}

/// The fixed header at the start of `buf`: its length in bytes and the remaining length it
/// announces.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    match buf.get(1..) {
        Some(rest) => Ok(varint(rest)?.map(|(remaining, n)| (1 + n, remaining))),
        None => Ok(None),
    }
}

/// The whole length (header and remaining length) a packet at the start of `buf` announces;
/// `None` until the header is whole or when it is malformed.
pub(super) fn announced_len(buf: &[u8]) -> Option<usize> {
    fixed_header(buf).ok().flatten().map(|(h, r)| h + r)
}

/// The fixed-header flags MQTT requires of each packet type a client sends (§2.1.3: PUBLISH
/// has its own; SUBSCRIBE, UNSUBSCRIBE and PUBREL 0b0010; the rest 0). rumqttd's parser
/// does not check them.
fn check_fixed_header(first: u8) -> Result<(), CodecError> {
    let (kind, flags) = (first >> 4, first & 0x0f);
    let required = match kind {
        3 => {
            // QoS 3 is malformed (MQTT-3.3.1-4).
            return match (flags >> 1) & 0b11 {
                3 => Err(CodecError::Malformed("PUBLISH with QoS 3".into())),
                _ => Ok(()),
            };
        }
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    match flags == required {
        true => Ok(()),
        false => Err(CodecError::Malformed(format!(
            "reserved fixed-header flags 0x{flags:x} on packet type {kind}"
        ))),
    }
}

/// CONNECT flags (§3.1.2.3): the reserved bit is 0 (MQTT-3.1.2-3); without a will, will QoS
/// and will retain are 0 (MQTT-3.1.2-11, -13); will QoS is never 3 (MQTT-3.1.2-12); on 3.1.1
/// a password needs a user name (MQTT-3.1.2-22). `body` is the CONNECT after its fixed header.
fn check_connect_flags(body: &[u8], version: Version) -> Result<(), CodecError> {
    // Protocol name (2 + 4 bytes), level, then the flags.
    let Some(&flags) = body.get(7) else {
        return Ok(());
    };
    let will = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let problem = if flags & 1 != 0 {
        Some("reserved CONNECT flag is set")
    } else if !will && (will_qos != 0 || will_retain) {
        Some("will QoS or retain set without a will")
    } else if will_qos == 3 {
        Some("will QoS 3")
    } else if version == Version::V311 && flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0 {
        Some("password without a user name")
    } else {
        None
    };
    match problem {
        Some(p) => Err(CodecError::Malformed(p.into())),
        None => Ok(()),
    }
}

/// Subscription options (§3.8.3.1): the reserved bits are 0 (MQTT-3.8.3-5; on 3.1.1 every
/// bit above the QoS, MQTT-3-8.3-4), QoS is never 3, and retain handling never 3. `body` is
/// the SUBSCRIBE after its fixed header.
fn check_subscribe_options(body: &[u8], version: Version) -> Result<(), CodecError> {
    let mut pos = 2; // packet id
    if version == Version::V5 {
        // Properties length and the properties.
        let Some((len, n)) = body.get(pos..).map(varint).transpose()?.flatten() else {
            return Ok(());
        };
        pos += n + len;
    }
    while pos + 2 <= body.len() {
        let n = usize::from(u16::from_be_bytes([body[pos], body[pos + 1]]));
        pos += 2 + n;
        let Some(&options) = body.get(pos) else { break };
        pos += 1;
        let reserved = match version {
            Version::V311 => options & 0b1111_1100,
            Version::V5 => options & 0b1100_0000,
        };
        if reserved != 0 || options & 0b11 == 3 || (options >> 4) & 0b11 == 3 {
            return Err(CodecError::Malformed(format!(
                "subscription options 0x{options:02x} use reserved values"
            )));
        }
    }
    Ok(())
}

/// A parsed packet with, for a PUBLISH, its QoS and packet id.
#[derive(Debug)]
pub(super) struct Frame {
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
    let (pos, _) = fixed_header(buf).ok()??;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]));
    if qos == 0 {
        return Some((0, 0));
    }
    let at = pos + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])))
}

/// Frames packets of one connection, in its version.
#[derive(Debug, Clone, Copy)]
pub(super) struct Codec {
    pub version: Version,
    max_packet_size: usize,
}

impl Codec {
    pub(super) fn new(version: Version, max_packet_size: usize) -> Codec {
        Codec {
            version,
            max_packet_size,
        }
    }

    /// The next whole packet in `buf`, or `Ok(None)` when more bytes are needed.
    pub(super) fn read(&self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if buf.is_empty() {
            return Ok(None);
        }
        check_fixed_header(buf[0])?;
        // The checks below need the whole packet; until it is here the parser asks for more.
        if let Some((header, remaining)) = fixed_header(buf)? {
            if let Some(body) = buf.get(header..header + remaining) {
                match buf[0] >> 4 {
                    1 => check_connect_flags(body, self.version)?,
                    8 => check_subscribe_options(body, self.version)?,
                    _ => {}
                }
            }
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
    pub(super) fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<bool, CodecError> {
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

/// A publish packet for the router with any QoS. rumqttd keeps a publish's QoS and packet id
/// crate-private and offers only its MQTT-independent serialization to set them, so this goes
/// through that format. Used for wills and the republish sink: device publishes are relayed as
/// parsed.
pub fn publish_packet(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Publish {
    publish_with_id(topic.as_bytes(), payload, qos, 1, retain)
}

/// A PUBLISH with packet id `pkid` (rumqttd lets only its parser set one).
pub(super) fn publish_with_id(
    topic: &[u8],
    payload: &[u8],
    qos: QoS,
    pkid: u16,
    retain: bool,
) -> Publish {
    let mut raw = BytesMut::with_capacity(5 + topic.len() + payload.len());
    raw.put_u8(0b0011_0000 | u8::from(retain) | ((qos as u8) << 1));
    raw.put_u16(if qos == QoS::AtMostOnce { 0 } else { pkid });
    raw.put_u16(topic.len() as u16);
    raw.extend_from_slice(topic);
    raw.extend_from_slice(payload);
    Publish::deserialize(raw.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_packet_keeps_qos_and_retain() {
        let p = publish_packet("a/b", b"hi", QoS::AtLeastOnce, true);
        assert_eq!(&p.topic[..], b"a/b");
        assert_eq!(&p.payload[..], b"hi");
        assert!(p.retain);
        // The header byte of the serialized form carries QoS 1 and retain.
        assert_eq!(p.serialize()[0], 0b0011_0011);
    }
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

    #[test]
    fn reserved_flags_are_malformed() {
        let codec = Codec::new(Version::V311, 1024);
        // CONNECT with the reserved flag (MQTT-3.1.2-3).
        let mut c = connect(4);
        c[9] |= 1;
        assert!(matches!(
            codec.read(&mut BytesMut::from(&c[..])),
            Err(CodecError::Malformed(_))
        ));
        // Will retain without a will (MQTT-3.1.2-13).
        let mut c = connect(4);
        c[9] |= 0b0010_0000;
        assert!(matches!(
            codec.read(&mut BytesMut::from(&c[..])),
            Err(CodecError::Malformed(_))
        ));
        // SUBSCRIBE whose fixed header flags are not 0b0010 (MQTT-3.8.1-1).
        let sub = [0x80u8, 6, 0, 1, 0, 1, b'a', 0];
        assert!(matches!(
            codec.read(&mut BytesMut::from(&sub[..])),
            Err(CodecError::Malformed(_))
        ));
        // SUBSCRIBE options with reserved bits (MQTT-3-8.3-4 on 3.1.1).
        let sub = [0x82u8, 6, 0, 1, 0, 1, b'a', 0b0000_0100];
        assert!(matches!(
            codec.read(&mut BytesMut::from(&sub[..])),
            Err(CodecError::Malformed(_))
        ));
        let sub = [0x82u8, 6, 0, 1, 0, 1, b'a', 1];
        assert!(codec.read(&mut BytesMut::from(&sub[..])).unwrap().is_some());
        // PUBLISH QoS 3 (MQTT-3.3.1-4); PINGREQ with flags.
        assert!(matches!(
            codec.read(&mut BytesMut::from(&[0x36u8, 0][..])),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            codec.read(&mut BytesMut::from(&[0xc1u8, 0][..])),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn announced_length_is_read_from_the_header() {
        assert_eq!(announced_len(&[0x10]), None);
        assert_eq!(announced_len(&[0x10, 0x05]), Some(7));
        // 268,435,455: the largest remaining length MQTT can say.
        assert_eq!(
            announced_len(&[0x10, 0xff, 0xff, 0xff, 0x7f]),
            Some(268_435_455 + 5)
        );
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
