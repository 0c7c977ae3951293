//! A raw MQTT client over real mutual TLS, for the packets no well-behaved client will send:
//! reserved flags, forbidden properties, hostile topics. Packets are built byte by byte here
//! from the MQTT 3.1.1 and 5 wire formats.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Site;
use sitegate::identity::pki::IssuedDevice;

pub(crate) use sitegate::edge::harness::wire::*;

/// One packet read back: its first byte and its body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Reply {
    pub(crate) fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The reason code of a v5 PUBACK, or of a DISCONNECT.
    pub(crate) fn reason(&self) -> u8 {
        match self.kind() {
            4 => self.body.get(2).copied().unwrap_or(0),
            14 => self.body.first().copied().unwrap_or(0),
            _ => panic!("no reason code in {self:?}"),
        }
    }

    /// The return codes of a SUBACK (after the packet id and, on v5, the properties).
    pub(crate) fn suback_codes(&self, v5: bool) -> Vec<u8> {
        assert_eq!(self.kind(), 9, "{self:?}");
        let mut at = 2;
        if v5 {
            let len = read_varint(&self.body, &mut at);
            at += len;
        }
        self.body[at..].to_vec()
    }
}

/// MQTT's variable byte integer at `at` in `body`; `at` moves past it.
pub(crate) fn read_varint(body: &[u8], at: &mut usize) -> usize {
    let (mut n, mut shift) = (0usize, 0);
    loop {
        let b = body[*at];
        *at += 1;
        n |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return n;
        }
    }
}

pub(crate) struct RawClient {
    pub tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawClient {
    /// A TLS connection as `device`, nothing sent yet.
    pub(crate) async fn tls(site: &Site, device: &IssuedDevice) -> RawClient {
        RawClient::tls_to(site.addr, &site.credentials(device)).await
    }

    /// A TLS connection to any broker at `addr` with `creds`.
    pub(crate) async fn tls_to(
        addr: std::net::SocketAddr,
        creds: &sitegate::fleet::DeviceCredentials,
    ) -> RawClient {
        RawClient::tls_with(addr, Arc::new(creds.client_config().unwrap())).await
    }

    /// A TLS connection with `config`, which keeps the session tickets it was given (one
    /// config used twice resumes).
    pub(crate) async fn tls_with(
        addr: std::net::SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> RawClient {
        let connector = tokio_rustls::TlsConnector::from(config);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.expect("handshake");
        RawClient {
            tls,
            buf: Vec::new(),
        }
    }

    /// Connected as `device` (client id = thing) with a CONNACK that accepted it.
    pub(crate) async fn connect(site: &Site, device: &IssuedDevice, v5: bool) -> RawClient {
        RawClient::connect_to(site.addr, &site.credentials(device), &device.thing, v5).await
    }

    /// Connected to any broker at `addr` as `client_id`.
    pub(crate) async fn connect_to(
        addr: std::net::SocketAddr,
        creds: &sitegate::fleet::DeviceCredentials,
        client_id: &str,
        v5: bool,
    ) -> RawClient {
        let mut c = RawClient::tls_to(addr, creds).await;
        c.send(&connect(client_id, v5, 0x02)).await;
        let ack = c.read().await.expect("CONNACK");
        assert_eq!(ack.kind(), 2, "{ack:?}");
        let code = ack.body[1];
        assert_eq!(code, 0, "CONNACK refused: {ack:?}");
        c
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        let _ = self.tls.write_all(bytes).await;
        let _ = self.tls.flush().await;
    }

    /// The next packet, or `None` when the gateway closed the connection (or 10 s passed).
    pub(crate) async fn read(&mut self) -> Option<Reply> {
        self.read_within(Duration::from_secs(10)).await
    }

    pub(crate) async fn read_within(&mut self, limit: Duration) -> Option<Reply> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(reply) = self.take() {
                return Some(reply);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.tls.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True when the gateway closes the connection within 10 s (after any packets it sends).
    pub(crate) async fn closed(&mut self) -> bool {
        for _ in 0..16 {
            match self.read().await {
                None => return true,
                Some(_) => continue,
            }
        }
        false
    }

    fn take(&mut self) -> Option<Reply> {
        let first = *self.buf.first()?;
        let mut len = 0usize;
        let mut at = 1;
        loop {
            let b = *self.buf.get(at)?;
            len |= usize::from(b & 0x7f) << (7 * (at - 1));
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < at + len {
            return None;
        }
        let body = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some(Reply { first, body })
    }
}
