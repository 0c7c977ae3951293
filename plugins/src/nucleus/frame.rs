//! One event-stream RPC message: the `:message-type`, `:message-flags` and `:stream-id`
//! headers every message carries, the string headers that name operations and models, and a
//! payload; read from and written to a socket with the 16 MiB ceiling checked before a frame is
//! buffered.

use aws_smithy_eventstream::frame::{read_message_from, write_message_to};
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::IpcError;

/// The largest frame read or written (event-stream's own limit).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
const PRELUDE_BYTES: usize = 12;

/// `:message-type` values.
pub mod message_type {
    pub const APPLICATION_MESSAGE: i32 = 0;
    pub const APPLICATION_ERROR: i32 = 1;
    pub const PING: i32 = 2;
    pub const PING_RESPONSE: i32 = 3;
    pub const CONNECT: i32 = 4;
    pub const CONNECT_ACK: i32 = 5;
    pub const PROTOCOL_ERROR: i32 = 6;
    pub const INTERNAL_ERROR: i32 = 7;
}

/// `:message-flags` bits.
pub mod flags {
    pub const CONNECTION_ACCEPTED: i32 = 1;
    pub const TERMINATE_STREAM: i32 = 2;
}

/// One message of the RPC protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub message_type: i32,
    pub flags: i32,
    pub stream_id: i32,
    /// The string headers (`operation`, `service-model-type`, `:version`, `:content-type`).
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(message_type: i32, flags: i32, stream_id: i32) -> Frame {
        Frame {
            message_type,
            flags,
            stream_id,
            headers: Vec::new(),
            payload: Bytes::new(),
        }
    }

    /// The answer to this PING: a PING_RESPONSE echoing its payload.
    pub fn pong(&self) -> Frame {
        Frame::new(message_type::PING_RESPONSE, 0, 0).payload(self.payload.clone())
    }

    /// Adds a string header.
    pub fn with(mut self, name: &str, value: &str) -> Frame {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn payload(mut self, payload: Bytes) -> Frame {
        self.payload = payload;
        self
    }

    /// A JSON payload, labelled as such.
    pub fn json(self, body: &Value) -> Frame {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.with(":content-type", "application/json")
            .payload(bytes.into())
    }

    /// The value of a string header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn encode(&self) -> Result<Vec<u8>, IpcError> {
        let mut headers = vec![
            Header::new(":message-type", HeaderValue::Int32(self.message_type)),
            Header::new(":message-flags", HeaderValue::Int32(self.flags)),
            Header::new(":stream-id", HeaderValue::Int32(self.stream_id)),
        ];
        headers.extend(
            self.headers
                .iter()
                .map(|(n, v)| Header::new(n.clone(), HeaderValue::String(v.clone().into()))),
        );
        let message = Message::new_from_parts(headers, self.payload.clone());
        let mut out = Vec::with_capacity(self.payload.len() + 256);
        write_message_to(&message, &mut out)
            .map_err(|e| IpcError::Protocol(format!("cannot encode a message: {e}")))?;
        if out.len() > MAX_FRAME_BYTES {
            return Err(IpcError::Protocol(format!(
                "a message of {} bytes is over the {MAX_FRAME_BYTES}-byte limit",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Parses one whole message (CRCs checked).
    pub fn decode(bytes: &[u8]) -> Result<Frame, IpcError> {
        let message = read_message_from(bytes)
            .map_err(|e| IpcError::Protocol(format!("bad event-stream message: {e}")))?;
        let mut frame = Frame::new(-1, 0, 0);
        for header in message.headers() {
            let name = header.name().as_str();
            match (name, header.value()) {
                (":message-type", HeaderValue::Int32(v)) => frame.message_type = *v,
                (":message-flags", HeaderValue::Int32(v)) => frame.flags = *v,
                (":stream-id", HeaderValue::Int32(v)) => frame.stream_id = *v,
                (_, HeaderValue::String(v)) => frame
                    .headers
                    .push((name.to_string(), v.as_str().to_string())),
                // Other typed headers carry nothing this protocol's users read.
                _ => {}
            }
        }
        if frame.message_type < 0 {
            return Err(IpcError::Protocol(
                "a message without an int32 :message-type header".into(),
            ));
        }
        frame.payload = message.payload().clone();
        Ok(frame)
    }
}

/// Reads the next frame; `None` when the peer closed between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, IpcError> {
    let mut prelude = [0u8; PRELUDE_BYTES];
    match reader.read_exact(&mut prelude).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(IpcError::Io(e)),
    }
    let total = u32::from_be_bytes([prelude[0], prelude[1], prelude[2], prelude[3]]) as usize;
    if !(PRELUDE_BYTES + 4..=MAX_FRAME_BYTES).contains(&total) {
        return Err(IpcError::Protocol(format!(
            "a message announces {total} bytes; the limit is {MAX_FRAME_BYTES}"
        )));
    }
    let mut whole = vec![0u8; total];
    whole[..PRELUDE_BYTES].copy_from_slice(&prelude);
    reader
        .read_exact(&mut whole[PRELUDE_BYTES..])
        .await
        .map_err(IpcError::Io)?;
    Frame::decode(&whole).map(Some)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> Result<(), IpcError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes).await.map_err(IpcError::Io)?;
    Ok(())
}
