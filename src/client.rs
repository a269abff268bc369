//! A client for the echo backend protocol, through the proxy or direct.
//!
//! Sends a key header and a payload, half-closes, then reads the backend's name line and the
//! echo, and checks that every byte came back in order. Used by `shardproxy demo`,
//! `shardproxy client` and the tests; not part of the proxy.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::header::{HeaderFormat, HeaderMode};

/// Longest backend name line accepted.
const MAX_NAME_LINE: usize = 256;

/// What one round trip showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The name the backend reported.
    pub backend: String,
    /// Bytes echoed back and verified.
    pub verified: u64,
}

/// Connects to `addr`, sends `key` framed by `fmt` and then `payload`, and verifies the echo
/// (the header is expected back only when `fmt` forwards it).
pub async fn round_trip(
    addr: SocketAddr,
    fmt: &HeaderFormat,
    key: &[u8],
    payload: &[u8],
) -> io::Result<Reply> {
    let header = fmt
        .encode(key)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.split();
    let send = async {
        wr.write_all(&header).await?;
        wr.write_all(payload).await?;
        wr.shutdown().await
    };
    let receive = async {
        let backend = read_name(&mut rd).await?;
        let mut echoed = Vec::with_capacity(header.len() + payload.len());
        rd.read_to_end(&mut echoed).await?;
        Ok::<_, io::Error>((backend, echoed))
    };
    let ((), (backend, echoed)) = tokio::try_join!(send, receive)?;
    let expected_header: &[u8] = match fmt.mode {
        HeaderMode::Forward => &header,
        HeaderMode::Strip => &[],
    };
    let ok = echoed.len() == expected_header.len() + payload.len()
        && echoed.starts_with(expected_header)
        && &echoed[expected_header.len()..] == payload;
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "echo from {backend} differs: sent {} bytes, got {}",
                expected_header.len() + payload.len(),
                echoed.len()
            ),
        ));
    }
    Ok(Reply {
        backend,
        verified: echoed.len() as u64,
    })
}

/// Reads the backend's greeting line (its name).
pub async fn read_name<R: AsyncReadExt + Unpin>(rd: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = rd.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_NAME_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "name line too long",
            ));
        }
    }
    String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
