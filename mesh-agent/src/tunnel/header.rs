//! The length-prefixed protobuf header at the start of a QUIC tunnel stream.
use std::net::SocketAddr;

use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("mesh.tunnel.v1");
}

pub use proto::{FlowHeader, Protocol, UdpDatagram};

/// Headers are tiny; anything larger is garbage or an attack.
pub const MAX_HEADER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("stream ended inside the flow header (truncated)")]
    Truncated,
    #[error("flow header of {0} bytes exceeds the {MAX_HEADER}-byte limit")]
    Oversized(usize),
    #[error("flow header does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("flow header destination {0:?} is not ip:port")]
    Destination(String),
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

pub async fn write(w: &mut (impl AsyncWrite + Unpin), header: &FlowHeader) -> std::io::Result<()> {
    let body = header.encode_to_vec();
    let mut buf = Vec::with_capacity(2 + body.len());
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await
}

pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<(FlowHeader, SocketAddr), HeaderError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.map_err(eof_is_truncation)?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(HeaderError::Oversized(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(eof_is_truncation)?;
    let header = FlowHeader::decode(body.as_slice())?;
    let dst: SocketAddr = header
        .destination
        .parse()
        .map_err(|_| HeaderError::Destination(header.destination.clone()))?;
    // `[::ffff:a.b.c.d]:p` is the IPv4 destination it maps.
    Ok((header, SocketAddr::new(dst.ip().to_canonical(), dst.port())))
}

fn eof_is_truncation(e: std::io::Error) -> HeaderError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HeaderError::Truncated
    } else {
        HeaderError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_refuses_bad_headers() {
        let h = FlowHeader {
            destination: "198.18.2.10:8080".into(),
            protocol: Protocol::Tcp as i32,
            flow_id: 7,
            http: true,
        };
        let mut buf = Vec::new();
        write(&mut buf, &h).await.unwrap();
        let (back, dst) = read(&mut buf.as_slice()).await.unwrap();
        assert_eq!((back, dst.to_string()), (h, "198.18.2.10:8080".to_string()));

        assert!(matches!(
            read(&mut &buf[..buf.len() - 1]).await,
            Err(HeaderError::Truncated)
        ));
        assert!(matches!(
            read(&mut &[0xffu8, 0xff][..]).await,
            Err(HeaderError::Oversized(65535))
        ));
        assert!(matches!(
            read(&mut &[0u8, 3, 0xff, 0xff, 0xff][..]).await,
            Err(HeaderError::Decode(_))
        ));
        let bad = FlowHeader {
            destination: "nowhere".into(),
            ..Default::default()
        };
        let mut buf = Vec::new();
        write(&mut buf, &bad).await.unwrap();
        assert!(matches!(
            read(&mut buf.as_slice()).await,
            Err(HeaderError::Destination(_))
        ));
    }
}
