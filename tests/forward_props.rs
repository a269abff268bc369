//! Property test of the forwarder's state machine through real sockets: for generated
//! scripts — both directions writing chunks of any size (tiny requests, bulk that turns on
//! splicing, urgent bytes), pausing, and half-closing in either order — each side must
//! receive exactly the other's bytes, in order, then a clean EOF. Both forwarding modes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{any_port, start_proxy};
use proptest::prelude::*;
use shardproxy::config::BackendSpec;
use shardproxy::HeaderFormat;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// One step of one side's script.
#[derive(Debug, Clone)]
enum Step {
    /// Write this many bytes of the side's stream.
    Write(usize),
    /// Send the next byte of the stream as urgent data (`MSG_OOB`).
    Urgent,
    /// Sleep this many milliseconds.
    Pause(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (1usize..2048).prop_map(Step::Write),
        3 => (16_000usize..400_000).prop_map(Step::Write),
        1 => Just(Step::Urgent),
        1 => (0u64..15).prop_map(Step::Pause),
    ]
}

/// The bytes a side sends: a function of the side and the position, so the receiver can
/// check every byte without holding a copy.
fn byte(side: u8, at: usize) -> u8 {
    (at as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(u32::from(side) * 7 + 3) as u8
}

/// Plays a script on a write half, then half-closes. Returns the bytes sent.
async fn play(mut w: OwnedWriteHalf, side: u8, script: Vec<Step>) -> usize {
    let mut at = 0;
    for s in script {
        match s {
            Step::Write(n) => {
                let chunk: Vec<u8> = (at..at + n).map(|i| byte(side, i)).collect();
                w.write_all(&chunk).await.expect("write");
                at += n;
            }
            Step::Urgent => {
                let sent = SockRef::from(w.as_ref())
                    .send_out_of_band(&[byte(side, at)])
                    .expect("MSG_OOB");
                at += sent;
            }
            Step::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    w.shutdown().await.expect("FIN");
    at
}

/// Reads to EOF, checking each byte against `side`'s stream. Returns the count, or where the
/// first wrong byte was.
async fn check(mut r: OwnedReadHalf, side: u8, skip: usize) -> Result<usize, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    let mut skip = skip;
    loop {
        let n = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("read at {at}: {e}"))?;
        if n == 0 {
            return Ok(at);
        }
        let mut got = &buf[..n];
        let s = skip.min(got.len());
        got = &got[s..];
        skip -= s;
        for (i, b) in got.iter().enumerate() {
            if *b != byte(side, at + i) {
                return Err(format!("side {side}: byte {} differs", at + i));
            }
        }
        at += got.len();
    }
}

async fn run_case(splice: bool, up: Vec<Step>, down: Vec<Step>) -> Result<(), String> {
    let l = TcpListener::bind(any_port()).await.expect("bind");
    let addr: SocketAddr = l.local_addr().expect("addr");
    let proxy = start_proxy(
        vec![BackendSpec {
            name: "b".into(),
            addr,
            weight: 1,
            agent: None,
            max_connections: None,
            proxy_protocol: None,
        }],
        |c| c.splice = splice,
    )
    .await;
    let header = HeaderFormat::default().encode(b"prop").expect("key");
    let mut client = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    client.write_all(&header).await.expect("header");
    let (backend, _) = l.accept().await.expect("accept");
    let (cr, cw) = client.into_split();
    let (br, bw) = backend.into_split();
    let work = async {
        let (sent_up, sent_down, got_up, got_down) = tokio::join!(
            play(cw, 1, up),
            play(bw, 2, down),
            // The backend sees the header first (forward mode), then the client's stream.
            check(br, 1, header.len()),
            check(cr, 2, 0),
        );
        let (got_up, got_down) = (got_up?, got_down?);
        if got_up != sent_up || got_down != sent_down {
            return Err(format!(
                "up: sent {sent_up} got {got_up}; down: sent {sent_down} got {got_down}"
            ));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .map_err(|_| "stalled".to_string())?
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn both_streams_arrive_whole_and_in_order(
        splice in any::<bool>(),
        up in prop::collection::vec(step(), 0..12),
        down in prop::collection::vec(step(), 0..12),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let result = rt.block_on(run_case(splice, up, down));
        prop_assert!(result.is_ok(), "splice {}: {:?}", splice, result);
    }
}
