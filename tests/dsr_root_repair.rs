//! `dsr::repair` on real sockets: freeze an established loopback connection, close it in
//! repair mode, rebuild it from its encoded state, and check that both queues moved and the
//! connection carries on (docs/design.md §6).
//!
//! Needs CAP_NET_ADMIN (TCP_REPAIR), so every test is ignored in a plain `cargo test`; run
//! as root with `cargo test --locked --test dsr_root_repair -- --ignored`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use shardproxy::dsr::repair::{freeze_and_dump, rebuild, FallbackReason, RepairError, TcpState};
use socket2::{Domain, Socket, Type};

/// Deterministic bytes (xorshift), different per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads exactly `len` bytes, failing on EOF, an error or the read timeout.
fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {len} bytes: {e}"));
    buf
}

/// Reads to EOF (the peer's FIN), failing on an error or the read timeout.
fn read_to_eof(mut stream: TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    stream
        .read_to_end(&mut all)
        .unwrap_or_else(|e| panic!("reading to EOF after {} bytes: {e}", all.len()));
    all
}

/// A client with a small receive buffer, so that the server's writes back up into the
/// server's send queue instead of all landing in the client's receive queue.
fn small_window_client(to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

#[test]
#[ignore = "needs root: run by netns-tests/run.sh"]
fn rebuilt_socket_has_both_queues_and_carries_on() {
    let timeout = Some(Duration::from_secs(30));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = small_window_client(listener.local_addr().unwrap());
    let (mut server, _) = listener.accept().unwrap();
    client.set_read_timeout(timeout).unwrap();

    // The client's request stays unread at the server.
    client.write_all(b"request").unwrap();
    // The server writes until its send buffer is full: the client reads none of it yet.
    let earlier = pattern(1, 8 << 20);
    server.set_nonblocking(true).unwrap();
    let mut written = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match server.write(&earlier[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Let in-flight segments and ACKs settle, then try once more.
                thread::sleep(Duration::from_millis(100));
                match server.write(&earlier[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("server write: {e}"),
                }
            }
            Err(e) => panic!("server write: {e}"),
        }
        assert!(
            written < earlier.len(),
            "8 MiB never filled the send buffer"
        );
        assert!(Instant::now() < deadline, "send buffer never filled");
    }
    let earlier = &earlier[..written];
    // The request has arrived when the server can peek all of it.
    let mut peeked = [0u8; 7];
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.peek(&mut peeked).ok() != Some(7) {
        assert!(Instant::now() < deadline, "request never arrived");
        thread::sleep(Duration::from_millis(10));
    }

    let state = freeze_and_dump(&server).unwrap();
    assert_eq!(state.local, server.local_addr().unwrap());
    assert_eq!(state.peer, client.local_addr().unwrap());
    assert_eq!(state.recv_queue, b"request");
    assert!(
        !state.send_queue.is_empty(),
        "nothing left in the server's send queue: the test would not move it"
    );
    assert_eq!(
        &earlier[written - state.send_queue.len()..],
        &state.send_queue[..],
        "the send queue is the tail of what the server wrote"
    );
    eprintln!(
        "dumped: recv queue {} B, send queue {} B ({} unsent) of {written} B written, mss {}, \
         wscale {}/{} ({}), sack {}, ts {}, window {:?}",
        state.recv_queue.len(),
        state.send_queue.len(),
        state.unsent_len,
        state.mss,
        state.snd_wscale,
        state.rcv_wscale,
        state.wscale_ok,
        state.sack_ok,
        state.timestamps_ok,
        state.window
    );
    // Over the control channel and back.
    let state = TcpState::decode(&state.encode().unwrap()).unwrap();

    // Closed in repair mode: the client sees neither FIN nor RST (POLLRDHUP; POLLHUP and
    // POLLERR are always reported).
    drop(server);
    let mut fds = [PollFd::new(
        client.as_fd(),
        PollFlags::from_bits_retain(nix::libc::POLLRDHUP),
    )];
    let n = poll(&mut fds, PollTimeout::from(300u16)).unwrap();
    assert_eq!(
        n,
        0,
        "client saw {:?} after the repair-mode close",
        fds[0].revents()
    );
    assert!(client.take_error().unwrap().is_none());

    let mut rebuilt = rebuild(&state).unwrap();
    assert_eq!(rebuilt.local_addr().unwrap(), state.local);
    assert_eq!(rebuilt.peer_addr().unwrap(), state.peer);

    // The same state cannot be rebuilt twice: the 4-tuple is taken.
    let again = rebuild(&state).unwrap_err();
    eprintln!("second rebuild: {again}");
    assert!(
        matches!(again, RepairError::Sys { .. }) && again.reason() == FallbackReason::Io,
        "{again:?}"
    );

    rebuilt.set_nonblocking(false).unwrap();
    rebuilt.set_read_timeout(timeout).unwrap();
    // The receive queue moved.
    assert_eq!(read_exactly(&mut rebuilt, 7), b"request");
    // The send queue moved: the client gets the server's earlier bytes exactly once, in
    // order (from its own receive queue, then retransmitted by the rebuilt socket).
    let got = read_exactly(&mut client, written);
    assert!(got == earlier, "the server's earlier bytes differ");

    // Then 1 MiB each way, and a clean half-close both ways.
    let up = pattern(2, 1 << 20);
    let down = pattern(3, 1 << 20);
    let mut client_w = client.try_clone().unwrap();
    let mut rebuilt_w = rebuilt.try_clone().unwrap();
    let (up_w, down_w) = (up.clone(), down.clone());
    let writers = [
        thread::spawn(move || {
            client_w.write_all(&up_w).unwrap();
            client_w.shutdown(Shutdown::Write).unwrap();
        }),
        thread::spawn(move || {
            rebuilt_w.write_all(&down_w).unwrap();
            rebuilt_w.shutdown(Shutdown::Write).unwrap();
        }),
    ];
    let at_client = thread::spawn(move || read_to_eof(client));
    let at_server = read_to_eof(rebuilt);
    let at_client = at_client.join().unwrap();
    for w in writers {
        w.join().unwrap();
    }
    assert!(at_server == up, "upload: {} bytes, differ", at_server.len());
    assert!(
        at_client == down,
        "download: {} bytes, differ",
        at_client.len()
    );
}

#[test]
#[ignore = "needs root: run by netns-tests/run.sh"]
fn a_stripped_header_is_gone_from_the_rebuilt_socket_and_the_rest_follows() {
    let timeout = Some(Duration::from_secs(10));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_read_timeout(timeout).unwrap();
    client.write_all(b"\x00\x02k1first").unwrap();
    let mut peeked = [0u8; 9];
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.peek(&mut peeked).ok() != Some(9) {
        assert!(Instant::now() < deadline, "request never arrived");
        thread::sleep(Duration::from_millis(10));
    }
    let mut state = freeze_and_dump(&server).unwrap();
    // The proxy removes the key header (4 bytes) when the backend must not see it.
    state.strip_front(4).unwrap();
    assert!(matches!(
        state.clone().strip_front(6),
        Err(RepairError::Decode(_))
    ));
    let state = TcpState::decode(&state.encode().unwrap()).unwrap();
    drop(server); // repair mode: silent; frees the 4-tuple
    let mut rebuilt = rebuild(&state).unwrap();
    // A small queue fits the default buffers: they are left alone, so the kernel keeps
    // autotuning them (setting SO_RCVBUF would lock the receive window at its value and cap
    // every upload on a long path).
    let fresh = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let rebuilt_ref = socket2::SockRef::from(&rebuilt);
    assert_eq!(
        rebuilt_ref.recv_buffer_size().unwrap(),
        fresh.recv_buffer_size().unwrap(),
        "the receive buffer was set (and locked) for a {}-byte queue",
        state.recv_queue.len()
    );
    rebuilt.set_nonblocking(false).unwrap();
    rebuilt.set_read_timeout(timeout).unwrap();
    client.write_all(b" second").unwrap();
    assert_eq!(read_exactly(&mut rebuilt, 12), b"first second");
    rebuilt.write_all(b"reply").unwrap();
    assert_eq!(read_exactly(&mut client, 5), b"reply");
}
