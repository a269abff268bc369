//! Zero-downtime upgrade by listener hand-over (`--upgrade-socket PATH`), as HAProxy's `-x`
//! and Envoy's hot restart do: a new process takes the running one's listening sockets over a
//! Unix socket, starts accepting on them, and only then does the old one stop accepting and
//! drain as on SIGTERM.
//!
//! # Why the sockets themselves travel
//!
//! Closing a listening socket resets every connection waiting in its accept queue, and a
//! freshly bound `SO_REUSEPORT` socket inherits none of them: "bind a new socket, close the
//! old one" refuses or resets the clients queued at the old socket when it closes. Passing the
//! descriptors with `SCM_RIGHTS` keeps the very same sockets, queues included, listening
//! throughout: the old process's `close` only drops its reference; the successor holds one.
//!
//! # Protocol (Unix stream socket at PATH, mode 0600, one exchange per connection)
//!
//! 1. successor → old: `shardproxy-upgrade 1\n`.
//! 2. The old process checks the peer's credentials (`SO_PEERCRED`: its own uid or root;
//!    otherwise it closes the connection and counts `refused`), then sends one line per
//!    listening socket, `listen ADDR\n` or `admin ADDR\n`, the descriptors riding in
//!    `SCM_RIGHTS` in the same order (at most [`FDS_PER_MESSAGE`] per `sendmsg`), then
//!    `end N\n`.
//! 3. The successor checks the addresses against its own configuration (the same listen and
//!    admin addresses, else it answers `abort REASON\n` and exits 2), starts accepting on
//!    every socket it received, and answers `ready\n`.
//! 4. On `ready` the old process counts `handed_over`, fires [`ProxyHandle::handed_over`]
//!    (the binary then runs its SIGTERM drain) and answers no further upgrade. Anything else
//!    (an abort, a close, a timeout) counts `failed` and the old process keeps serving.
//!
//! The successor then binds its own upgrade socket under a temporary name next to PATH,
//! chmods it 0600 and renames it over PATH, so it can be upgraded in turn. A path with nothing
//! there, or a socket nobody listens on (a process that died), means there is no predecessor:
//! the proxy binds its listeners itself.
//!
//! [`ProxyHandle::handed_over`]: super::ProxyHandle::handed_over

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ProxyConfig;
use crate::dsr::fdpass::{is_tcp_stream, recv_with_fds, send_with_fds};
use crate::error::{ConfigError, Error};
use crate::metrics::{Metrics, UpgradeResult};

/// The successor's request (protocol version 1).
const HELLO: &str = "shardproxy-upgrade 1";
/// Descriptors per `sendmsg` (the kernel takes at most 253 in one message).
pub(crate) const FDS_PER_MESSAGE: usize = 32;
/// Time a connected peer has to send its request.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the successor has, once it holds the sockets, to start accepting and say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the successor waits for the whole description and every socket.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest protocol line read from a peer.
const MAX_LINE: usize = 1024;
/// Longest description a successor accepts, and most sockets.
const MAX_DESCRIPTION: usize = 256 * 1024;
/// Most sockets a successor accepts in one hand-over.
const MAX_SOCKETS: usize = 4096;

/// What a handed-over listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A client listener (`--listen` or an extra listen address).
    Listen,
    /// The admin/metrics listener.
    Admin,
}

impl Role {
    fn parse(word: &str) -> Option<Role> {
        match word {
            "listen" => Some(Role::Listen),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Listen => "listen",
            Role::Admin => "admin",
        })
    }
}

/// One listening socket as it is handed over: its role, its bound address and a descriptor.
#[derive(Debug)]
pub(crate) struct Listening {
    /// What it is for.
    pub role: Role,
    /// Its bound address.
    pub addr: SocketAddr,
    /// A descriptor of the socket (a duplicate of the one the accept loop uses).
    pub fd: OwnedFd,
}

// ---------------------------------------------------------------------------------------
// Successor side
// ---------------------------------------------------------------------------------------

/// The sockets taken from a predecessor, and the connection on which to tell it `ready`.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// Client listeners with their addresses, `--listen`'s first, then the extra addresses
    /// in configured order.
    pub data: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The admin listener, if the predecessor had one.
    pub admin: Option<std::net::TcpListener>,
    /// The predecessor, waiting for `ready`.
    pub predecessor: Predecessor,
}

/// A predecessor that sent its sockets and waits for `ready`. Dropping it without
/// [`Predecessor::ready`] closes the connection: the predecessor keeps serving.
#[derive(Debug)]
pub(crate) struct Predecessor {
    conn: UnixStream,
}

impl Predecessor {
    /// Tells the predecessor that this process accepts on every socket: it stops accepting
    /// and drains.
    pub(crate) async fn ready(mut self) -> io::Result<()> {
        timeout(HELLO_TIMEOUT, self.conn.write_all(b"ready\n"))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "sending ready timed out"))?
    }

    /// Tells the predecessor why this process will not take over (best effort).
    async fn abort(mut self, why: &str) {
        let line = format!("abort {}\n", why.replace('\n', " "));
        let _ = timeout(HELLO_TIMEOUT, self.conn.write_all(line.as_bytes())).await;
    }
}

/// Takes the listening sockets of the proxy answering on `path`, if one does.
///
/// `Ok(None)`: nothing answers (no file, or a socket nobody listens on); bind normally. An
/// error means the proxy must not start: the predecessor's addresses differ from `config`'s
/// (a configuration error, exit 2; the predecessor was told and keeps serving), or the
/// hand-over failed (the predecessor keeps serving).
pub(crate) async fn take_over(
    path: &Path,
    config: &ProxyConfig,
) -> Result<Option<Inherited>, Error> {
    let mut conn = match UnixStream::connect(path).await {
        Ok(conn) => conn,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ECONNREFUSED) =>
        {
            info!(path = %path.display(), "no running proxy answers on the upgrade socket: binding the listeners");
            return Ok(None);
        }
        Err(e) => {
            return Err(Error::Io {
                context: "connecting to the upgrade socket",
                source: with_path(path, e),
            })
        }
    };
    let received = match timeout(RECEIVE_TIMEOUT, receive(&mut conn)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(Error::Io {
                context: "taking the listeners over from the running proxy (it keeps serving)",
                source: e,
            })
        }
        Err(_) => {
            return Err(Error::Io {
                context: "taking the listeners over from the running proxy (it keeps serving)",
                source: io::Error::new(io::ErrorKind::TimedOut, "no complete answer in time"),
            })
        }
    };
    let predecessor = Predecessor { conn };
    if let Err(why) = check_matches(&received, config) {
        predecessor.abort(&why).await;
        return Err(Error::Config(ConfigError::Invalid {
            field: "--listen/--admin",
            why: format!("{why}; the running proxy keeps serving"),
        }));
    }
    let mut order: Vec<SocketAddr> = vec![config.listen];
    order.extend(config.also_listen.iter().copied());
    let mut data = Vec::new();
    let mut admin = None;
    for l in received {
        let listener = std::net::TcpListener::from(l.fd);
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            context: "setting an inherited listener non-blocking",
            source,
        })?;
        match l.role {
            Role::Listen => data.push((l.addr, listener)),
            Role::Admin => admin = Some(listener),
        }
    }
    data.sort_by_key(|(addr, _)| order.iter().position(|a| a == addr));
    Ok(Some(Inherited {
        data,
        admin,
        predecessor,
    }))
}

/// Sends the request and reads the description and the sockets, checking each.
async fn receive(conn: &mut UnixStream) -> io::Result<Vec<Listening>> {
    conn.write_all(format!("{HELLO}\n").as_bytes())
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => closed(),
            _ => e,
        })?;
    let mut text = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut control = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let mut buf = [0u8; 4096];
    while !has_end_line(&text) {
        conn.readable().await?;
        let got = conn.try_io(Interest::READABLE, || {
            recv_with_fds(conn.as_raw_fd(), &mut buf, &mut control).map_err(io::Error::from)
        });
        let got = match got {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(closed()),
            Err(e) => return Err(e),
        };
        if got.truncated || got.foreign > 0 {
            return Err(bad("unexpected or truncated control message"));
        }
        if got.len == 0 && got.fds.is_empty() {
            return Err(closed());
        }
        text.extend_from_slice(buf.get(..got.len).unwrap_or_default());
        fds.extend(got.fds);
        if text.len() > MAX_DESCRIPTION || fds.len() > MAX_SOCKETS {
            return Err(bad("description too long"));
        }
    }
    parse_description(&text, fds)
}

/// The predecessor closed the connection without sending its sockets.
fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the running proxy closed the upgrade connection: it refused this process (run the \
         successor as the same user or root) or is already handing over",
    )
}

/// True once `text` holds its final `end N` line.
fn has_end_line(text: &[u8]) -> bool {
    text.ends_with(b"\n") && text.split(|b| *b == b'\n').any(|l| l.starts_with(b"end "))
}

/// Pairs the description's lines with the descriptors, in order, and checks that each is a
/// listening TCP socket bound to the address its line names.
fn parse_description(text: &[u8], fds: Vec<OwnedFd>) -> io::Result<Vec<Listening>> {
    let text = std::str::from_utf8(text).map_err(|_| bad("description is not UTF-8"))?;
    let mut lines: Vec<&str> = text.lines().collect();
    let total: usize = match lines.pop().and_then(|l| l.strip_prefix("end ")) {
        Some(n) => n.trim().parse().map_err(|_| bad("bad end line"))?,
        None => return Err(bad("no end line")),
    };
    if total != lines.len() || total != fds.len() {
        return Err(bad(&format!(
            "{} lines and {} sockets, end says {total}",
            lines.len(),
            fds.len()
        )));
    }
    let mut out = Vec::with_capacity(total);
    for (line, fd) in lines.into_iter().zip(fds) {
        let (role, addr) = line
            .split_once(' ')
            .and_then(|(r, a)| Some((Role::parse(r)?, a.parse::<SocketAddr>().ok()?)))
            .ok_or_else(|| bad(&format!("bad line {line:?}")))?;
        let sock = SockRef::from(&fd);
        if !is_tcp_stream(&fd) || !sock.is_listener().unwrap_or(false) {
            return Err(bad(&format!("{line}: not a listening TCP socket")));
        }
        let bound = sock.local_addr().ok().and_then(|a| a.as_socket());
        if bound != Some(addr) {
            return Err(bad(&format!("{line}: the socket is bound to {bound:?}")));
        }
        out.push(Listening { role, addr, fd });
    }
    Ok(out)
}

/// Checks that the predecessor listens where `config` says this process should.
fn check_matches(got: &[Listening], config: &ProxyConfig) -> Result<(), String> {
    let mut theirs: Vec<SocketAddr> = got
        .iter()
        .filter(|l| l.role == Role::Listen)
        .map(|l| l.addr)
        .collect();
    theirs.sort();
    theirs.dedup();
    let mut ours: Vec<SocketAddr> = std::iter::once(config.listen)
        .chain(config.also_listen.iter().copied())
        .collect();
    ours.sort();
    ours.dedup();
    let admins: Vec<SocketAddr> = got
        .iter()
        .filter(|l| l.role == Role::Admin)
        .map(|l| l.addr)
        .collect();
    let their_admin = match admins.as_slice() {
        [] => None,
        [a] => Some(*a),
        _ => return Err("the running proxy sent more than one admin listener".into()),
    };
    if theirs == ours && their_admin == config.admin {
        return Ok(());
    }
    let show = |v: &[SocketAddr]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let show_admin =
        |a: Option<SocketAddr>| a.map_or_else(|| "none".to_string(), |a| a.to_string());
    Err(format!(
        "the running proxy listens on [{}] (admin {}) but this one is configured for [{}] \
         (admin {}): start the successor with the same listen and admin addresses",
        show(&theirs),
        show_admin(their_admin),
        show(&ours),
        show_admin(config.admin)
    ))
}

// ---------------------------------------------------------------------------------------
// Predecessor side
// ---------------------------------------------------------------------------------------

/// This process's upgrade socket, bound under a temporary name next to its path (mode 0600)
/// until [`UpgradeSocket::install`] renames it over the path.
#[derive(Debug)]
pub(crate) struct UpgradeSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    tmp: PathBuf,
}

impl UpgradeSocket {
    /// Binds a Unix listener at a temporary name next to `path`, mode 0600. Fails if `path`
    /// exists and is not a socket (that file is left alone).
    pub(crate) fn prepare(path: &Path) -> Result<UpgradeSocket, Error> {
        let io_err = |source| Error::Io {
            context: "binding the upgrade socket",
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{}: exists and is not a socket; not replacing it",
                        path.display()
                    ),
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(with_path(path, e))),
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                io_err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a file path", path.display()),
                ))
            })?;
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(with_path(&tmp, e)))
            }
            _ => {}
        }
        let listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| io_err(with_path(&tmp, e)))?;
        if let Err(e) = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .and_then(|()| listener.set_nonblocking(true))
        {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(with_path(&tmp, e)));
        }
        Ok(UpgradeSocket {
            listener,
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// Renames the socket over its path (replacing a predecessor's or a stale file), ready to
    /// [`serve`](Installed::serve). Needs a tokio runtime.
    pub(crate) fn install(self) -> io::Result<Installed> {
        let installed = fs::rename(&self.tmp, &self.path)
            .and_then(|()| fs::symlink_metadata(&self.path))
            .map_err(|e| with_path(&self.path, e));
        let meta = match installed {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_file(&self.tmp);
                return Err(e);
            }
        };
        let file_id = (meta.dev(), meta.ino());
        match UnixListener::from_std(self.listener) {
            Ok(listener) => Ok(Installed {
                listener,
                path: self.path,
                file_id,
            }),
            Err(e) => {
                remove_if_same(&self.path, file_id);
                Err(e)
            }
        }
    }
}

/// The upgrade socket at its path, accepting successors.
#[derive(Debug)]
pub(crate) struct Installed {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file, so that only this file is removed at the end.
    file_id: (u64, u64),
}

impl Installed {
    /// Serves successors until one takes over (then fires `handed_over` and returns) or
    /// `stop` fires. Removes the socket file on the way out if it is still this process's.
    pub(crate) async fn serve(
        self,
        listening: Vec<Listening>,
        metrics: Metrics,
        stop: CancellationToken,
        handed_over: CancellationToken,
    ) {
        let Installed {
            listener,
            path,
            file_id,
        } = self;
        info!(path = %path.display(), sockets = listening.len(), "upgrade socket ready");
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            let conn = match accepted {
                Ok((conn, _)) => conn,
                Err(e) => {
                    warn!(error = %e, "upgrade socket: accept failed");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            };
            if let Err(why) = peer_allowed(&conn) {
                metrics.upgrade(UpgradeResult::Refused);
                warn!(peer = %why, "upgrade refused: the successor must run as this process's user or root");
                continue;
            }
            let outcome = tokio::select! {
                () = stop.cancelled() => break,
                r = hand_over(conn, &listening) => r,
            };
            match outcome {
                Ok(()) => {
                    metrics.upgrade(UpgradeResult::HandedOver);
                    info!(
                        sockets = listening.len(),
                        "a successor took over the listeners: no longer accepting, draining"
                    );
                    handed_over.cancel();
                    break;
                }
                Err(e) => {
                    metrics.upgrade(UpgradeResult::Failed);
                    warn!(error = %e, "upgrade failed: the successor did not take over; still serving");
                }
            }
        }
        drop(listener);
        remove_if_same(&path, file_id);
    }
}

/// Removes `path` if it is still the file with this (device, inode).
fn remove_if_same(path: &Path, file_id: (u64, u64)) {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if (meta.dev(), meta.ino()) == file_id {
            let _ = fs::remove_file(path);
        }
    }
}

/// One exchange with a successor: its request, the sockets, its `ready`.
async fn hand_over(mut conn: UnixStream, listening: &[Listening]) -> io::Result<()> {
    let hello = timeout(HELLO_TIMEOUT, read_line(&mut conn))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
    if hello != HELLO {
        return Err(bad(&format!("unexpected request {hello:?}")));
    }
    for chunk in listening.chunks(FDS_PER_MESSAGE) {
        let text: String = chunk
            .iter()
            .map(|l| format!("{} {}\n", l.role, l.addr))
            .collect();
        let fds: Vec<RawFd> = chunk.iter().map(|l| l.fd.as_raw_fd()).collect();
        let sent = timeout(HELLO_TIMEOUT, send_with_fds(&conn, text.as_bytes(), &fds))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "sending the sockets"))??;
        if let Some(rest) = text.as_bytes().get(sent..).filter(|r| !r.is_empty()) {
            conn.write_all(rest).await?;
        }
    }
    conn.write_all(format!("end {}\n", listening.len()).as_bytes())
        .await?;
    let reply = timeout(READY_TIMEOUT, read_line(&mut conn))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the successor was not ready in time",
            )
        })??;
    match reply
        .split_once(' ')
        .map_or((reply.as_str(), ""), |(a, b)| (a, b))
    {
        ("ready", _) => Ok(()),
        ("abort", why) => Err(io::Error::other(format!("the successor aborted: {why}"))),
        _ => Err(bad(&format!("unexpected reply {reply:?}"))),
    }
}

/// Reads one `\n`-terminated line (without it). The protocol is lock-step, so nothing after
/// the line is lost.
async fn read_line(conn: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the upgrade connection",
            ));
        }
        line.extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            return String::from_utf8(line).map_err(|_| bad("line is not UTF-8"));
        }
        if line.len() > MAX_LINE {
            return Err(bad("line too long"));
        }
    }
}

/// `Ok` if the peer runs as this process's effective uid or as root; else who it is.
fn peer_allowed(conn: &UnixStream) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    match conn.peer_cred() {
        Ok(cred) if uid_allowed(cred.uid(), me) => Ok(()),
        Ok(cred) => Err(format!(
            "uid {} pid {:?} (this process runs as uid {me})",
            cred.uid(),
            cred.pid()
        )),
        Err(e) => Err(format!("credentials unreadable: {e}")),
    }
}

/// The credential rule: the same user, or root.
fn uid_allowed(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
}

fn bad(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("upgrade protocol: {why}"),
    )
}

/// `io::Error` with the path in its message, same kind.
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_user_or_root_may_take_over() {
        assert!(uid_allowed(1000, 1000));
        assert!(uid_allowed(0, 1000));
        assert!(uid_allowed(0, 0));
        assert!(!uid_allowed(1001, 1000));
        assert!(!uid_allowed(65534, 0));
    }

    #[test]
    fn dsr_with_an_upgrade_socket_is_refused() {
        let backend = crate::BackendSpec::new("b1", ([127, 0, 0, 1], 2).into());
        let mut c = ProxyConfig::new(([127, 0, 0, 1], 1).into(), vec![backend]);
        c.upgrade_socket = Some("/tmp/x.sock".into());
        assert!(c.validate().is_ok());
        c.dsr = Some(crate::config::DsrConfig::new("lo", "/tmp/s"));
        let e = c.validate().expect_err("refused").to_string();
        assert!(e.contains("--dsr") && e.contains("nftables"), "{e}");
    }

    #[test]
    fn the_end_line_is_found_only_when_complete() {
        assert!(!has_end_line(b"listen 127.0.0.1:1\n"));
        assert!(!has_end_line(b"listen 127.0.0.1:1\nend 1"));
        assert!(has_end_line(b"listen 127.0.0.1:1\nend 1\n"));
    }
}
