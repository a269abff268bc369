//! The proxy's control connection to one backend host's agent (docs/design.md §6, steps 5
//! and 7): one TCP connection per agent, shared by every hand-off to it, driven by one task.
//!
//! The link connects on first use and proves the agent holds the secret before any
//! hand-off travels: it sends `Ping` and must get an authenticated `Pong` back. After that,
//! hand-offs are multiplexed by id: [`AgentLink::handoff`] sends the state and waits for
//! `Imported` or `Failed`; `Steered` and `Abort` are sent without an answer; `Closed` reports
//! go to the proxy's flow table through a channel. A `Ping` every [`HEARTBEAT`] keeps the
//! link honest: no frame for three heartbeats and it is dropped.
//!
//! A failed connect or handshake marks the link down for [`RETRY_AFTER`]: hand-offs in that
//! time fail at once (the proxy splices them) instead of each waiting for a dead host. An
//! `Imported` for a hand-off the proxy already gave up on (timed out) is answered with
//! `Abort`, so the agent never keeps a socket nobody steers to it.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::control::{read_message, write_message, Auth, ControlError, Message};

/// Interval between the link's `Ping`s; three without any frame back drop the link.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a link stays down after a failed connect or handshake before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a hand-off over a link failed; each is a fallback reason label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The agent could not be reached (refused, unreachable, connect timed out), or the
    /// link is in its retry pause after such a failure.
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    /// The agent did not prove it holds the secret (closed at our first frame, or answered
    /// with frames that fail authentication).
    #[error("agent failed authentication: {0}")]
    Auth(String),
    /// The agent did not answer in time.
    #[error("agent did not answer in time")]
    Timeout,
    /// The agent answered `Failed`.
    #[error("agent refused the hand-off (errno {errno}): {reason}")]
    Refused {
        /// The errno the agent reported.
        errno: i32,
        /// Its reason.
        reason: String,
    },
    /// The link broke while the hand-off was in flight.
    #[error("control connection lost: {0}")]
    Lost(String),
}

impl LinkError {
    /// The fallback reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            LinkError::Unreachable(_) => "agent_unreachable",
            LinkError::Auth(_) => "agent_auth",
            LinkError::Timeout => "agent_timeout",
            LinkError::Refused { .. } => "agent_refused",
            LinkError::Lost(_) => "agent_lost",
        }
    }
}

/// A `Closed` report: which agent, which hand-off, what moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedReport {
    /// The agent that sent it.
    pub agent: SocketAddr,
    /// The hand-off id.
    pub id: u64,
    /// Bytes the application read from the client.
    pub bytes_from_client: u64,
    /// Bytes the application wrote to the client.
    pub bytes_to_client: u64,
}

type Answer = oneshot::Sender<Result<(), LinkError>>;

/// Until when a link stays down after a failure, and the failure.
type DownUntil = Mutex<Option<(Instant, LinkError)>>;

enum Request {
    /// Send a hand-off and answer when the agent does.
    Handoff(Message, u64, Answer),
    /// Send a message that has no answer (`Steered`, `Abort`).
    Notify(Message, Option<Answer>),
    /// Connect (if not connected) and answer when the link is up or failed.
    Ready(Answer),
    /// Ask which of these hand-offs (id, client) at the VIP's port the agent still holds.
    Query(u16, Vec<(u64, SocketAddrV4)>, QueryAnswer),
}

type QueryAnswer = oneshot::Sender<Result<Vec<u64>, LinkError>>;

/// The proxy's link to one agent; cheap to share (`Arc`).
pub struct AgentLink {
    addr: SocketAddr,
    tx: mpsc::UnboundedSender<Request>,
    up: Arc<AtomicBool>,
    /// Until when the link stays down after a failure (no connect attempts before).
    down_until: Arc<DownUntil>,
}

impl AgentLink {
    /// Starts the link's task (it connects on first use). `closed` receives the agent's
    /// `Closed` reports; the task ends with `stop`.
    pub fn start(
        addr: SocketAddr,
        auth: Auth,
        connect_timeout: Duration,
        closed: mpsc::UnboundedSender<ClosedReport>,
        stop: CancellationToken,
    ) -> Arc<AgentLink> {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(AgentLink {
            addr,
            tx,
            up: Arc::new(AtomicBool::new(false)),
            down_until: Arc::new(Mutex::new(None)),
        });
        let task = LinkTask {
            addr,
            auth,
            connect_timeout,
            closed,
            up: link.up.clone(),
            down_until: link.down_until.clone(),
            pending: HashMap::new(),
            query: None,
        };
        tokio::spawn(task.run(rx, stop));
        link
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the control connection is up now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Makes sure the link is up, connecting if needed; fails at once while the link is in
    /// its retry pause.
    pub async fn ready(&self) -> Result<(), LinkError> {
        if self.is_up() {
            return Ok(());
        }
        if let Some(e) = self.paused() {
            return Err(e);
        }
        let (answer, rx) = oneshot::channel();
        self.request(Request::Ready(answer), rx).await
    }

    /// Sends a hand-off and waits for the agent's `Imported` (`Ok`) or `Failed`.
    pub async fn handoff(&self, msg: Message) -> Result<(), LinkError> {
        let Message::Handoff { id, .. } = msg else {
            return Err(LinkError::Lost("not a hand-off message".into()));
        };
        let (answer, rx) = oneshot::channel();
        self.request(Request::Handoff(msg, id, answer), rx).await
    }

    /// Sends `msg` (`Steered`, `Abort`) and waits until it is written.
    pub async fn notify(&self, msg: Message) -> Result<(), LinkError> {
        let (answer, rx) = oneshot::channel();
        self.request(Request::Notify(msg, Some(answer)), rx).await
    }

    /// Asks which of `flows` (hand-off id, client) at the VIP's `port` the agent still holds
    /// (its `Alive` answer: the ids). Only while the link is up: a link that is down answers
    /// with an error without connecting.
    pub async fn query(
        &self,
        port: u16,
        flows: Vec<(u64, SocketAddrV4)>,
    ) -> Result<Vec<u64>, LinkError> {
        if !self.is_up() {
            return Err(LinkError::Lost("link down".into()));
        }
        let (answer, rx) = oneshot::channel();
        self.tx
            .send(Request::Query(port, flows, answer))
            .map_err(|_| LinkError::Lost("link stopped".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(LinkError::Lost("link stopped".into())))
    }

    /// Sends `msg` without waiting (best effort).
    pub fn notify_later(&self, msg: Message) {
        let _ = self.tx.send(Request::Notify(msg, None));
    }

    fn paused(&self) -> Option<LinkError> {
        paused(&self.down_until)
    }

    async fn request(
        &self,
        req: Request,
        rx: oneshot::Receiver<Result<(), LinkError>>,
    ) -> Result<(), LinkError> {
        self.tx
            .send(req)
            .map_err(|_| LinkError::Lost("link stopped".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(LinkError::Lost("link stopped".into())))
    }
}

struct LinkTask {
    addr: SocketAddr,
    auth: Auth,
    connect_timeout: Duration,
    closed: mpsc::UnboundedSender<ClosedReport>,
    up: Arc<AtomicBool>,
    down_until: Arc<DownUntil>,
    /// Hand-offs sent and not yet answered.
    pending: HashMap<u64, Answer>,
    /// The `Query` waiting for its `Alive` (one at a time).
    query: Option<QueryAnswer>,
}

/// What the reader half passes to the link task.
type Incoming = Result<Message, ControlError>;

impl LinkTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>, stop: CancellationToken) {
        loop {
            // Disconnected: wait for a request.
            let first = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => return },
                () = stop.cancelled() => return,
            };
            if let Some(e) = self.paused() {
                fail(first, e);
                continue;
            }
            let conn = tokio::select! {
                c = self.connect() => c,
                () = stop.cancelled() => return,
            };
            let (reader, mut writer) = match conn {
                Ok(halves) => halves,
                Err(e) => {
                    warn!(agent = %self.addr, error = %e, "DSR agent link down; its hand-offs fall back to splicing");
                    self.set_down(e.clone());
                    // Requests queued meanwhile get the same answer.
                    while let Ok(r) = rx.try_recv() {
                        fail(r, e.clone());
                    }
                    fail(first, e);
                    continue;
                }
            };
            info!(agent = %self.addr, "DSR agent link up");
            self.up.store(true, Ordering::Relaxed);
            let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Incoming>();
            let reader_task = tokio::spawn(read_loop(reader, self.auth.clone(), in_tx));
            let mut next = Some(first);
            let mut heartbeat = tokio::time::interval(HEARTBEAT);
            heartbeat.tick().await;
            let mut last_heard = Instant::now();
            let why = loop {
                if let Some(req) = next.take() {
                    if let Err(e) = self.send_request(&mut writer, req).await {
                        break e;
                    }
                    continue;
                }
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => next = Some(r),
                        None => break LinkError::Lost("link stopped".into()),
                    },
                    m = in_rx.recv() => match m {
                        Some(Ok(msg)) => {
                            last_heard = Instant::now();
                            if let Err(e) = self.on_message(&mut writer, msg).await {
                                break e;
                            }
                        }
                        Some(Err(e)) => break classify(e),
                        None => break LinkError::Lost("reader ended".into()),
                    },
                    _ = heartbeat.tick() => {
                        if last_heard.elapsed() > 3 * HEARTBEAT {
                            break LinkError::Lost("no frame for three heartbeats".into());
                        }
                        if let Err(e) = write_message(&mut writer, &self.auth, &Message::Ping).await {
                            break LinkError::Lost(e.to_string());
                        }
                    }
                    () = stop.cancelled() => break LinkError::Lost("proxy stopping".into()),
                }
            };
            reader_task.abort();
            self.up.store(false, Ordering::Relaxed);
            warn!(agent = %self.addr, error = %why, in_flight = self.pending.len(), "DSR agent link lost");
            for (_, answer) in self.pending.drain() {
                let _ = answer.send(Err(why.clone()));
            }
            if let Some(q) = self.query.take() {
                let _ = q.send(Err(why.clone()));
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    fn paused(&self) -> Option<LinkError> {
        paused(&self.down_until)
    }

    fn set_down(&self, e: LinkError) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now() + RETRY_AFTER, e));
    }

    /// Connects and proves the agent knows the secret (Ping → authenticated Pong).
    async fn connect(&self) -> Result<(OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf), LinkError> {
        let stream = match timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(LinkError::Unreachable(e.to_string())),
            Err(_) => return Err(LinkError::Unreachable("connect timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let handshake = async {
            write_message(&mut writer, &self.auth, &Message::Ping)
                .await
                .map_err(|e| LinkError::Auth(format!("agent closed at our first frame: {e}")))?;
            loop {
                match read_message(&mut reader, &self.auth).await {
                    Ok(Message::Pong) => return Ok(()),
                    Ok(Message::Ping) => {}
                    Ok(other) => {
                        return Err(LinkError::Auth(format!(
                            "agent answered {other:?} to the handshake"
                        )))
                    }
                    Err(e) => {
                        return Err(LinkError::Auth(format!(
                            "agent did not answer the handshake ({e}); is the secret the same?"
                        )))
                    }
                }
            }
        };
        match timeout(self.connect_timeout, handshake).await {
            Ok(Ok(())) => Ok((reader, writer)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LinkError::Auth(
                "agent did not answer the handshake in time".into(),
            )),
        }
    }

    async fn send_request(
        &mut self,
        writer: &mut tokio::net::tcp::OwnedWriteHalf,
        req: Request,
    ) -> Result<(), LinkError> {
        match req {
            Request::Ready(answer) => {
                let _ = answer.send(Ok(()));
                Ok(())
            }
            Request::Handoff(msg, id, answer) => {
                if answer.is_closed() {
                    return Ok(()); // the caller gave up before it was sent
                }
                match write_message(writer, &self.auth, &msg).await {
                    Ok(()) => {
                        self.pending.insert(id, answer);
                        Ok(())
                    }
                    Err(e) => {
                        let e = LinkError::Lost(e.to_string());
                        let _ = answer.send(Err(e.clone()));
                        Err(e)
                    }
                }
            }
            Request::Query(port, flows, answer) => {
                if let Some(old) = self.query.replace(answer) {
                    let _ = old.send(Err(LinkError::Lost("superseded by a newer query".into())));
                }
                write_message(writer, &self.auth, &Message::Query { port, flows })
                    .await
                    .map_err(|e| LinkError::Lost(e.to_string()))
            }
            Request::Notify(msg, answer) => {
                let r = write_message(writer, &self.auth, &msg)
                    .await
                    .map_err(|e| LinkError::Lost(e.to_string()));
                if let Some(answer) = answer {
                    let _ = answer.send(r.clone());
                }
                r
            }
        }
    }

    async fn on_message(
        &mut self,
        writer: &mut tokio::net::tcp::OwnedWriteHalf,
        msg: Message,
    ) -> Result<(), LinkError> {
        match msg {
            Message::Ping => write_message(writer, &self.auth, &Message::Pong)
                .await
                .map_err(|e| LinkError::Lost(e.to_string())),
            Message::Pong => Ok(()),
            Message::Imported { id } => {
                let taken = match self.pending.remove(&id) {
                    Some(answer) => answer.send(Ok(())).is_ok(),
                    None => false,
                };
                if !taken {
                    // Nobody waits any more (the hand-off timed out and the proxy kept the
                    // connection): the agent must drop its copy without a word.
                    {
                        debug!(agent = %self.addr, id, "late Imported: aborting");
                        write_message(writer, &self.auth, &Message::Abort { id })
                            .await
                            .map_err(|e| LinkError::Lost(e.to_string()))?;
                    }
                }
                Ok(())
            }
            Message::Alive { ids } => {
                if let Some(q) = self.query.take() {
                    let _ = q.send(Ok(ids));
                }
                Ok(())
            }
            Message::Failed { id, errno, reason } => {
                if let Some(answer) = self.pending.remove(&id) {
                    let _ = answer.send(Err(LinkError::Refused { errno, reason }));
                }
                Ok(())
            }
            Message::Closed {
                id,
                bytes_from_client,
                bytes_to_client,
            } => {
                let _ = self.closed.send(ClosedReport {
                    agent: self.addr,
                    id,
                    bytes_from_client,
                    bytes_to_client,
                });
                Ok(())
            }
            other => Err(LinkError::Lost(format!(
                "agent sent {other:?}, which only a proxy sends"
            ))),
        }
    }
}

/// The error a link in its retry pause answers with, if it is in one.
fn paused(down_until: &DownUntil) -> Option<LinkError> {
    let guard = down_until.lock().unwrap_or_else(|p| p.into_inner());
    match &*guard {
        Some((until, e)) if Instant::now() < *until => Some(e.clone()),
        _ => None,
    }
}

fn fail(req: Request, e: LinkError) {
    match req {
        Request::Handoff(_, _, answer) | Request::Ready(answer) => {
            let _ = answer.send(Err(e));
        }
        Request::Notify(_, Some(answer)) => {
            let _ = answer.send(Err(e));
        }
        Request::Notify(_, None) => {}
        Request::Query(_, _, answer) => {
            let _ = answer.send(Err(e));
        }
    }
}

fn classify(e: ControlError) -> LinkError {
    match e {
        ControlError::Closed | ControlError::Io(_) => LinkError::Lost(e.to_string()),
        other => LinkError::Auth(other.to_string()),
    }
}

async fn read_loop(mut reader: OwnedReadHalf, auth: Auth, tx: mpsc::UnboundedSender<Incoming>) {
    loop {
        let m = read_message(&mut reader, &auth).await;
        let end = m.is_err();
        if tx.send(m).is_err() || end {
            return;
        }
    }
}
