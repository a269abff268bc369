//! PROXY protocol v2 to backends (<https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt>),
//! so a backend sees the client's address rather than the proxy's.
//!
//! The header is built by the `ppp` crate from the client socket's two ends (source: the
//! client; destination: the address the client connected to). IPv4-mapped IPv6 addresses of
//! a dual-stack listener are reported as IPv4, so both ends are of one family; a pair that
//! still mixes families is sent as `UNSPEC` (the backend then uses the connection's own
//! addresses), as the specification asks.

use std::io;
use std::net::SocketAddr;

use ppp::v2;
use tokio::net::TcpStream;

/// The PROXY v2 header for a connection from `client`.
pub(crate) fn header(client: &TcpStream) -> io::Result<Vec<u8>> {
    build(client.peer_addr()?, client.local_addr()?)
}

/// The PROXY v2 header for a TCP connection from `source` to `destination`.
pub(crate) fn build(source: SocketAddr, destination: SocketAddr) -> io::Result<Vec<u8>> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (canonical(source), canonical(destination)),
    )
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_carries_both_ends_and_parses_back() {
        let src: SocketAddr = "192.0.2.7:40123".parse().unwrap();
        let dst: SocketAddr = "[::ffff:198.51.100.1]:7000".parse().unwrap();
        let bytes = build(src, dst).unwrap();
        // Signature, version 2 / PROXY, TCP over IPv4, 12 address bytes.
        assert_eq!(&bytes[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(bytes[12], 0x21);
        assert_eq!(bytes[13], 0x11);
        assert_eq!(u16::from_be_bytes([bytes[14], bytes[15]]), 12);
        let parsed = v2::Header::try_from(bytes.as_slice()).unwrap();
        match parsed.addresses {
            v2::Addresses::IPv4(a) => {
                assert_eq!(a.source_address.to_string(), "192.0.2.7");
                assert_eq!(a.source_port, 40123);
                assert_eq!(a.destination_address.to_string(), "198.51.100.1");
                assert_eq!(a.destination_port, 7000);
            }
            other => panic!("not IPv4: {other:?}"),
        }
    }

    #[test]
    fn ipv6_ends_stay_ipv6() {
        let bytes = build(
            "[2001:db8::1]:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(bytes[13], 0x21);
        assert_eq!(bytes.len(), 16 + 36);
    }
}
