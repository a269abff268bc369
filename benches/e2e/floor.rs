//! The floor relay: what any relay pays on this kernel, as an anchor for the proxies.
//!
//! A minimal blocking splice relay — two threads per connection, a 1 MiB pipe and blocking
//! `splice(2)` calls per direction, no event loop, no timeouts, no metrics. It runs as its own
//! process (a re-exec of the bench binary with the hidden role argument
//! `__floor-relay NAME=ADDR...`), so the harness starts, stops and measures it like the other
//! proxies: it prints `listening on ADDR` once bound, and exits when its stdin reaches EOF.
//!
//! Per connection it reads the key header (`[u16 BE len][key]`, exactly the header's bytes,
//! nothing more), ranks the backends with `shardproxy::Router` over the same names and
//! weights the harness gives shardproxy, connects to the first that accepts, writes the
//! header, then relays: one thread per direction splices socket → pipe → socket. When a
//! direction sees EOF it half-closes the other side (`shutdown(SHUT_WR)`); when a direction
//! fails it shuts both sockets down so the other thread wakes up too. The sockets close when
//! both threads are done.
//!
//! Threads and their pipes are reused, not created per connection: a thread whose connection
//! ended parks (up to [`MAX_IDLE`] of them) and takes the next one with the pipe it already
//! has (emptied: a direction only ends cleanly after moving everything it read; a pipe that
//! saw an error is closed). Creating two threads and two pipes per connection is a cost of
//! this design, not of relaying, and would make the floor meaningless for short connections.

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, splice, FcntlArg, SpliceFFlags};
use shardproxy::{HeaderFormat, Parse, Router};

/// Hidden first argument that selects the floor relay role.
pub const ROLE_ARG: &str = "__floor-relay";

/// Pipe size per direction, and the most one `splice` call moves.
const PIPE: usize = 1 << 20;
/// Stack of a relay thread (no buffers: the data stays in the kernel).
const STACK: usize = 128 * 1024;
/// Parked relay threads kept at most; more exit when their connection ends.
pub const MAX_IDLE: usize = 512;

/// A pipe, kept by the thread that uses it for the next connection.
type Pipe = Option<(OwnedFd, OwnedFd)>;
/// Work for a relay thread.
type Job = Box<dyn FnOnce(&mut Pipe) + Send>;

/// Parked relay threads, each waiting on its own channel.
static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

/// Runs `job` on a parked thread, or on a new one when none is parked.
fn dispatch(mut job: Job) -> io::Result<()> {
    loop {
        let parked = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match parked {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(j)) => job = j, // that thread is gone; try another
            },
            None => break,
        }
    }
    let (tx, rx) = mpsc::channel::<Job>();
    tx.send(job)
        .map_err(|_| io::Error::other("fresh channel closed"))?;
    std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            let mut pipe: Pipe = None;
            while let Ok(job) = rx.recv() {
                job(&mut pipe);
                let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() >= MAX_IDLE {
                    return;
                }
                idle.push(tx.clone());
            }
        })?;
    Ok(())
}

/// Entry point of the floor role: `__floor-relay NAME=ADDR...`. Prints `listening on ADDR`
/// and relays until stdin closes.
pub fn main(args: &[String]) -> ! {
    match run(args) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("floor-relay: {e}");
            std::process::exit(1)
        }
    }
}

fn run(args: &[String]) -> io::Result<()> {
    let _ = shardproxy::proxy::sockopt::raise_fd_limit();
    let mut names = Vec::new();
    let mut addrs = Vec::new();
    for a in args {
        let (name, addr) = a
            .split_once('=')
            .ok_or_else(|| io::Error::other(format!("expected NAME=ADDR, got {a:?}")))?;
        names.push(name.to_string());
        addrs.push(addr.parse::<SocketAddr>().map_err(io::Error::other)?);
    }
    let router = Router::new(names.iter().map(|n| (n.as_str(), 1))).map_err(io::Error::other)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    let route = Arc::new((router, addrs));
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(&listener, &route))?;
    // Serve until the harness goes away (EOF or error on stdin).
    let mut line = String::new();
    let stdin = io::stdin();
    while matches!(stdin.lock().read_line(&mut line), Ok(n) if n > 0) {
        line.clear();
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, route: &Arc<(Router, Vec<SocketAddr>)>) {
    loop {
        match listener.accept() {
            Ok((client, _)) => {
                let route = route.clone();
                let spawned = dispatch(Box::new(move |pipe: &mut Pipe| {
                    if let Err(e) = connection(client, &route.0, &route.1, pipe) {
                        debug(format_args!("connection: {e}"));
                    }
                }));
                if let Err(e) = spawned {
                    eprintln!("floor-relay: cannot spawn a thread: {e}");
                }
            }
            Err(e) => {
                debug(format_args!("accept: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

fn debug(args: std::fmt::Arguments<'_>) {
    if std::env::var_os("E2E_FLOOR_DEBUG").is_some() {
        eprintln!("floor-relay: {args}");
    }
}

/// One connection: header, route, connect, then a thread per direction (this one relays
/// backend → client).
fn connection(
    mut client: TcpStream,
    router: &Router,
    addrs: &[SocketAddr],
    pipe: &mut Pipe,
) -> io::Result<()> {
    client.set_nodelay(true)?;
    let fmt = HeaderFormat::default();
    let mut head = Vec::with_capacity(64);
    // Read exactly the header: the length field, then the key.
    let key = loop {
        match fmt.parse(&head) {
            Parse::Done { key, .. } => break key.to_vec(),
            Parse::Need(n) => {
                let at = head.len();
                head.resize(at + n, 0);
                client.read_exact(&mut head[at..])?;
            }
            Parse::Error(e) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
            }
        }
    };
    let mut last = io::Error::other("no backend takes keys");
    let mut backend = None;
    for i in router.rank(&key) {
        let Some(addr) = addrs.get(i) else { continue };
        match TcpStream::connect(addr) {
            Ok(s) => {
                backend = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut backend = backend.ok_or(last)?;
    backend.set_nodelay(true)?;
    backend.write_all(&head)?;
    let client = Arc::new(client);
    let backend = Arc::new(backend);
    let (c, b) = (client.clone(), backend.clone());
    // Each thread holds both sockets; they close when the second one lets go.
    let up = dispatch(Box::new(move |pipe: &mut Pipe| {
        if let Err(e) = relay(&c, &b, pipe) {
            debug(format_args!("client → backend: {e}"));
        }
    }));
    if let Err(e) = up {
        let _ = client.shutdown(Shutdown::Both);
        let _ = backend.shutdown(Shutdown::Both);
        return Err(e);
    }
    relay(&backend, &client, pipe)
}

/// One direction: `from` → pipe → `to` until EOF (then half-close `to`) or an error (then
/// shut both sockets down, so the other direction's blocking `splice` returns too).
fn relay(from: &TcpStream, to: &TcpStream, pipe: &mut Pipe) -> io::Result<()> {
    if pipe.is_none() {
        *pipe = Some(new_pipe()?);
    }
    let r = match pipe {
        Some((rd, wr)) => pump(from, to, rd, wr),
        None => Err(io::Error::other("no pipe")),
    };
    match &r {
        Ok(()) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(_) => {
            *pipe = None; // it may hold data of this connection
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
    r
}

fn pump(from: &TcpStream, to: &TcpStream, rd: &OwnedFd, wr: &OwnedFd) -> io::Result<()> {
    loop {
        let n = splice(
            from.as_fd(),
            None,
            wr.as_fd(),
            None,
            PIPE,
            SpliceFFlags::SPLICE_F_MOVE,
        )
        .map_err(io::Error::from)?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = splice(
                rd.as_fd(),
                None,
                to.as_fd(),
                None,
                left,
                SpliceFFlags::SPLICE_F_MOVE,
            )
            .map_err(io::Error::from)?;
            if m == 0 {
                return Err(io::Error::other("splice to the socket moved nothing"));
            }
            left -= m;
        }
    }
}

/// A pipe (close-on-exec) resized to 1 MiB.
fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    fcntl(wr.as_fd(), FcntlArg::F_SETPIPE_SZ(PIPE as i32)).map_err(io::Error::from)?;
    Ok((rd, wr))
}
