//! Smoke test of the fixtures: one key through the proxy, and the metrics endpoint.

mod common;

use common::*;
use shardproxy::fixtures::client::round_trip;
use shardproxy::HeaderFormat;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_and_metrics() {
    let backends = echo_backends(3).await;
    let proxy = start_proxy(specs(&backends), |_| {}).await;
    let reply = round_trip(
        proxy.local_addr(),
        &HeaderFormat::default(),
        b"k1",
        b"hello",
    )
    .await
    .unwrap();
    let expected = proxy.table().router.pick(b"k1").unwrap();
    assert_eq!(reply.backend, proxy.table().router.name(expected));
    let text = scrape(&proxy).await;
    assert_eq!(metric(&text, "shardproxy_connections_accepted_total"), 1.0);
    let sample = format!(
        "shardproxy_backend_connections_total{{backend=\"{}\"}}",
        reply.backend
    );
    assert_eq!(metric(&text, &sample), 1.0, "{text}");
    let (status, body) = http_get(proxy.admin_addr().unwrap(), "/healthz").await;
    assert!(status.contains("200"));
    assert!(body.contains("ok"));
}

/// The proxy turns Nagle off on its listener and relies on accepted sockets inheriting it
/// (or small request/response traffic stalls on delayed ACKs): check this kernel does.
#[test]
fn accepted_sockets_inherit_nodelay() {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.set_tcp_nodelay(true).unwrap();
    l.bind(&any_port().into()).unwrap();
    l.listen(1).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let _client = std::net::TcpStream::connect(addr).unwrap();
    let (accepted, _) = l.accept().unwrap();
    assert!(
        accepted.tcp_nodelay().unwrap(),
        "TCP_NODELAY was not inherited"
    );
}
