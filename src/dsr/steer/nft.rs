//! The steering worker: one long-lived `nft -i` child per `Steering` for the ruleset (set up
//! and torn down in transactions answered through a numbered sentinel line), and one
//! `NETLINK_NETFILTER` socket for the element updates of the hot path (see the parent
//! module's doc and `nftnl.rs`).

use super::nftnl::{ElemOp, ElemSocket, Set};
use super::*;

pub(super) fn worker_main(
    config: SteerConfig,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    ready: oneshot::Sender<Result<(), SteerError>>,
) {
    let mut nft = Nft::new(config);
    let setup = nft.config.setup_line();
    if let Err(e) = nft.run_line(&setup) {
        nft.close();
        let _ = ready.send(Err(e));
        return;
    }
    // Element updates go over netlink, in the namespace nft built the ruleset in.
    match ElemSocket::open(nft.child.as_ref().map(|c| c.child.id())) {
        Ok(s) => nft.elems = Some(s),
        Err(e) => {
            let _ = nft.teardown();
            nft.close();
            let _ = ready.send(Err(e));
            return;
        }
    }
    if ready.send(Ok(())).is_err() {
        // The caller went away while starting: do not leave the table behind.
        let _ = nft.teardown();
        nft.close();
        return;
    }
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut shutdown = None;
        match rx.blocking_recv() {
            Some(Msg::Op(op, reply)) => batch.push((op, reply)),
            Some(Msg::Shutdown(reply)) => shutdown = Some(reply),
            None => {
                let _ = nft.teardown();
                break;
            }
        }
        while shutdown.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Op(op, reply)) => batch.push((op, reply)),
                Ok(Msg::Shutdown(reply)) => shutdown = Some(reply),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            nft.run_ops(&mut batch);
        }
        if let Some(reply) = shutdown {
            let _ = reply.send(nft.teardown());
            break;
        }
    }
    nft.close();
    // Requests still queued are answered with `Closed` when `rx` drops their reply senders.
}

/// A running `nft -i` and the thread that reads its output.
struct NftChild {
    child: Child,
    stdin: ChildStdin,
    lines: std_mpsc::Receiver<String>,
}

/// The worker's state: the child, the sentinel counter and the flows steered so far.
pub(super) struct Nft {
    config: SteerConfig,
    child: Option<NftChild>,
    seq: u64,
    /// Every flow element in the map, live or expired-but-maybe-not-collected: its value is
    /// needed to update its expiry, and a new value for the same key needs a real delete.
    flows: HashMap<SocketAddrV4, Entry>,
    batches: u64,
    /// The netlink socket for element updates (opened once the ruleset exists).
    elems: Option<ElemSocket>,
}

/// A flow element as the worker believes the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    /// The map's value: the backend host.
    pub backend: Ipv4Addr,
    /// Our estimate of its expiry.
    pub expires: Instant,
    /// Steered (true) or removed by expiring it (false: it may linger until the kernel's
    /// garbage collection, and must not be re-added with another value without a delete).
    pub live: bool,
}

/// How long a removed (expired) flow element is remembered: far longer than the kernel
/// takes to collect it.
const STALE_KEEP: Duration = Duration::from_secs(60);

/// The tracked flow changes a planned batch makes if it succeeds.
pub(super) type Overlay = HashMap<SocketAddrV4, Entry>;

impl Nft {
    pub(super) fn new(config: SteerConfig) -> Nft {
        Nft {
            config,
            child: None,
            seq: 0,
            flows: HashMap::new(),
            batches: 0,
            elems: None,
        }
    }

    fn spawn(&self) -> Result<NftChild, SteerError> {
        let program = self.config.command[0].clone();
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SteerError::Process(format!("pipe: {e}")))?;
        let err_end = write_end
            .try_clone()
            .map_err(|e| SteerError::Process(format!("pipe: {e}")))?;
        let mut cmd = Command::new(&program);
        cmd.args(&self.config.command[1..])
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(err_end));
        let spawned = cmd.spawn();
        // The write ends must close here, or the reader never sees the child's exit.
        drop(cmd);
        let mut child = spawned.map_err(|source| SteerError::NftMissing { program, source })?;
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SteerError::Process("no stdin pipe".to_owned()));
        };
        let (line_tx, lines) = std_mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("dsr-steer-out".to_owned())
            .spawn(move || {
                let mut out = BufReader::new(File::from(read_end));
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match out.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                            if line_tx.send(line).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        if let Err(e) = reader {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SteerError::Process(format!(
                "cannot start reader thread: {e}"
            )));
        }
        Ok(NftChild {
            child,
            stdin,
            lines,
        })
    }

    /// Kills the child (our own, by its handle) and reaps it.
    fn close(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin);
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }

    fn teardown(&mut self) -> Result<(), SteerError> {
        let line = self.config.teardown_line();
        let result = self.run_line(&line);
        self.flows.clear();
        result
    }

    /// Runs one line (one transaction) and waits for its sentinel.
    fn run_line(&mut self, line: &str) -> Result<(), SteerError> {
        if self.child.is_none() {
            self.child = Some(self.spawn()?);
        }
        self.seq += 1;
        let token = format!("{SENTINEL_PREFIX}{}", self.seq);
        let deadline = Instant::now() + self.config.reply_timeout;
        let result = match self.child.as_mut() {
            Some(c) => exchange(c, line, &token, deadline),
            None => Err(SteerError::Process("nft not running".to_owned())),
        };
        if matches!(result, Err(SteerError::Process(_))) {
            // Hung, exited or unwritable: the next batch starts a fresh child.
            self.close();
        }
        result
    }

    /// The element operations for `op` given the tracked flows and this batch's earlier
    /// changes.
    ///
    /// No element is deleted on the hot path: on this kernel (6.18) a transaction that
    /// deletes a committed set element takes 10-20 ms (an RCU grace period) and stalls the
    /// transactions behind it, while updating an element's expiry costs what an add does.
    /// So an unfreeze or a removal re-adds the element with `expires 1ms` (the kernel updates
    /// the timeout of an existing element; an expired element no longer matches and is
    /// garbage-collected), and every add states its timeout, which revives an expired
    /// element with the same value. Only moving a key to another value needs a delete.
    pub(super) fn plan(
        &self,
        op: Op,
        overlay: &mut Overlay,
        ops: &mut Vec<ElemOp>,
    ) -> Result<(), SteerError> {
        let current = |overlay: &Overlay, c: &SocketAddrV4| {
            overlay.get(c).or_else(|| self.flows.get(c)).copied()
        };
        let now = Instant::now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let flow_ms = ms(self.config.flow_timeout);
        let frozen_ms = ms(self.config.frozen_timeout);
        let set_flow = |ops: &mut Vec<ElemOp>, c: SocketAddrV4, b: Ipv4Addr, expires_ms: u64| {
            ops.push(ElemOp::Add {
                set: Set::Flows,
                client: c,
                value: Some(b),
                timeout_ms: Some(flow_ms),
                expires_ms: Some(expires_ms),
            });
        };
        let set_frozen = |ops: &mut Vec<ElemOp>, c: SocketAddrV4, expires_ms: u64| {
            ops.push(ElemOp::Add {
                set: Set::Frozen,
                client: c,
                value: None,
                timeout_ms: Some(frozen_ms),
                expires_ms: Some(expires_ms),
            });
        };
        let live = |b: Ipv4Addr| Entry {
            backend: b,
            expires: now + self.config.flow_timeout,
            live: true,
        };
        match op {
            Op::Freeze(c) => set_frozen(ops, c, frozen_ms),
            Op::Unfreeze(c) => set_frozen(ops, c, 1),
            Op::Steer(c, b) => {
                if let Some(old) = current(overlay, &c).filter(|e| e.backend != b) {
                    // Another value under the same key: the one delete (add first, so the
                    // delete cannot fail whatever the kernel collected meanwhile).
                    ops.push(ElemOp::Add {
                        set: Set::Flows,
                        client: c,
                        value: Some(old.backend),
                        timeout_ms: None,
                        expires_ms: None,
                    });
                    ops.push(ElemOp::Delete {
                        set: Set::Flows,
                        client: c,
                    });
                }
                set_flow(ops, c, b, flow_ms);
                set_frozen(ops, c, 1);
                overlay.insert(c, live(b));
            }
            Op::Remove(c) => {
                if let Some(old) = current(overlay, &c).filter(|e| e.live) {
                    set_flow(ops, c, old.backend, 1);
                    overlay.insert(
                        c,
                        Entry {
                            expires: now,
                            live: false,
                            ..old
                        },
                    );
                }
            }
            Op::Refresh(c) => {
                let Some(old) = current(overlay, &c).filter(|e| e.live) else {
                    return Err(SteerError::NotSteered(c));
                };
                set_flow(ops, c, old.backend, flow_ms);
                overlay.insert(c, live(old.backend));
            }
        }
        Ok(())
    }

    /// Runs `batch` as one transaction, or each request alone if that fails; answers all.
    fn run_ops(&mut self, batch: &mut Vec<(Op, Reply)>) {
        self.batches += 1;
        if self.batches % 1024 == 0 {
            self.prune();
        }
        if batch.len() > 1 {
            let mut overlay = Overlay::new();
            let mut cmds = Vec::new();
            let mut planned = true;
            for (op, _) in batch.iter() {
                planned &= self.plan(*op, &mut overlay, &mut cmds).is_ok();
            }
            if planned {
                let result = self.run_elems(&cmds);
                match result {
                    Ok(()) => {
                        self.apply(overlay);
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Ok(()));
                        }
                        return;
                    }
                    // One request's error: find it by running each alone.
                    Err(SteerError::Command { .. }) => {}
                    Err(e) => {
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Err(e.replicate()));
                        }
                        return;
                    }
                }
            }
        }
        for (op, reply) in batch.drain(..) {
            let mut overlay = Overlay::new();
            let mut cmds = Vec::new();
            let result = self
                .plan(op, &mut overlay, &mut cmds)
                .and_then(|()| self.run_elems(&cmds));
            if result.is_ok() {
                self.apply(overlay);
            }
            let _ = reply.send(result);
        }
    }

    /// Runs element operations as one netlink transaction (nothing to do: success).
    fn run_elems(&mut self, ops: &[ElemOp]) -> Result<(), SteerError> {
        match self.elems.as_mut() {
            Some(s) => s.run(&self.config.table, ops),
            None if ops.is_empty() => Ok(()),
            None => Err(SteerError::Process("no netlink socket".to_owned())),
        }
    }

    fn apply(&mut self, overlay: Overlay) {
        self.flows.extend(overlay);
    }

    /// Forgets flows the kernel has expired and collected (with a wide margin), bounding
    /// the memory of flows whose close was never reported.
    fn prune(&mut self) {
        let now = Instant::now();
        self.flows.retain(|_, e| e.expires + STALE_KEEP > now);
    }
}

/// Writes `line` and the sentinel, then reads nft's answer up to the sentinel's echo.
fn exchange(
    c: &mut NftChild,
    line: &str,
    token: &str,
    deadline: Instant,
) -> Result<(), SteerError> {
    let mut input = String::with_capacity(line.len() + token.len() + 2);
    let _ = writeln!(input, "{line}");
    let _ = writeln!(input, "{token}");
    c.stdin
        .write_all(input.as_bytes())
        .and_then(|()| c.stdin.flush())
        .map_err(|e| SteerError::Process(format!("writing to nft: {e}")))?;
    let mut out: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.lines.recv_timeout(left) {
            Ok(l) if l.trim() == token => break,
            Ok(l) => out.push(l),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                return Err(SteerError::Process(format!(
                    "no answer from nft in time; output so far: {}",
                    summarize(&out)
                )));
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                let status = c.child.try_wait().ok().flatten();
                let message = summarize(&out);
                if is_permission(&message) {
                    return Err(SteerError::Permission { message });
                }
                return Err(SteerError::Process(format!(
                    "nft exited ({}): {message}",
                    status.map_or_else(|| "still running".to_owned(), |s| s.to_string())
                )));
            }
        }
    }
    // The line before the echo is the sentinel's own `Error: syntax error ...`.
    if out.last().is_some_and(|l| l.starts_with("Error:")) {
        out.pop();
    }
    classify(&out)
}

/// Caret lines (`   ^^^^`) point into the echoed line; the sentinel's one arrives at the
/// start of the next batch's output.
fn is_caret_line(l: &str) -> bool {
    let t = l.trim();
    !t.is_empty() && t.chars().all(|c| c == '^')
}

pub(super) fn is_permission(message: &str) -> bool {
    message.contains("Operation not permitted") || message.contains("Permission denied")
}

/// nft's output for one batch, shortened: error lines whole, echoed lines cut.
pub(super) fn summarize(out: &[String]) -> String {
    const ECHO_MAX: usize = 160;
    out.iter()
        .filter(|l| !l.trim().is_empty() && !is_caret_line(l))
        .map(|l| {
            if l.len() > ECHO_MAX && !l.starts_with("Error:") {
                let mut end = ECHO_MAX;
                while !l.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{} ...", &l[..end])
            } else {
                l.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The result of one batch from what nft printed before the sentinel.
pub(super) fn classify(out: &[String]) -> Result<(), SteerError> {
    let message = summarize(out);
    if message.is_empty() {
        Ok(())
    } else if is_permission(&message) {
        Err(SteerError::Permission { message })
    } else {
        Err(SteerError::Command { message })
    }
}
