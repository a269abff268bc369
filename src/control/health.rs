//! Health checking: one task per backend, active probes and passive ejection.
//!
//! - **Active**: every `interval` (moved at random by up to `jitter` of itself, so probes of
//!   many backends and proxies do not fall in step) a probe connects to the backend, sends
//!   `send` if set and, if `expect` is set, reads until the answer's first bytes are known.
//!   `fall` failed probes in a row mark the backend down, `rise` good ones mark it up.
//! - **Passive**: `eject_after` client connect failures in a row (counted on the data path,
//!   [`BackendState::connect_failed`]) eject it at once, for `eject_time`, doubled for each
//!   ejection in a row up to `max_eject_time`. It is re-admitted only after that time *and*
//!   good probes (`rise` of them; one when active probing is off — then probes run only
//!   while a backend is ejected).
//!
//! A probe is closed with a reset (linger 0), as HAProxy's checks are: no TIME_WAIT piles up
//! on the proxy. A transition updates the backend's state (read lock-free by the data path),
//! its metrics, and the panic state, and wakes connections under the owner-change policy.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Control;
use crate::config::HealthConfig;
use crate::metrics::BackendMetrics;
use crate::routing::{BackendState, Health, RoutingTable};

/// The checker tasks, one per backend (by name and address).
pub(super) struct Supervisor {
    checkers: Mutex<HashMap<Arc<str>, Checker>>,
    stop: CancellationToken,
    runtime: tokio::runtime::Handle,
}

struct Checker {
    state: Arc<BackendState>,
    cancel: CancellationToken,
}

impl Supervisor {
    /// A supervisor whose tasks run on the current runtime and end with `stop`.
    pub(super) fn new(stop: CancellationToken) -> Self {
        Supervisor {
            checkers: Mutex::new(HashMap::new()),
            stop,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs one checker per backend of `table`: keeps those whose backend kept its state,
    /// stops those of backends that left (or changed address), starts the rest.
    pub(super) fn reconcile(&self, table: &RoutingTable, cfg: &HealthConfig, owner: Weak<Control>) {
        let mut checkers = self.checkers.lock().unwrap_or_else(PoisonError::into_inner);
        checkers.retain(|name, c| {
            let keep = table
                .backends
                .iter()
                .any(|b| *b.name == **name && Arc::ptr_eq(&b.state, &c.state));
            if !keep {
                c.cancel.cancel();
            }
            keep
        });
        for b in &table.backends {
            if checkers.contains_key(&b.name) {
                continue;
            }
            let cancel = self.stop.child_token();
            let task = Task {
                name: b.name.clone(),
                addr: b.addr,
                state: b.state.clone(),
                metrics: b.metrics.clone(),
                cfg: cfg.clone(),
                owner: owner.clone(),
            };
            self.runtime.spawn(task.run(cancel.clone()));
            checkers.insert(
                b.name.clone(),
                Checker {
                    state: b.state.clone(),
                    cancel,
                },
            );
        }
    }

    /// Stops every checker (the next reconcile starts them with new settings). Health
    /// states stay as they are until the new checkers decide.
    pub(super) fn restart(&self) {
        let mut checkers = self.checkers.lock().unwrap_or_else(PoisonError::into_inner);
        for c in checkers.values() {
            c.cancel.cancel();
        }
        checkers.clear();
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connect failed.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// Sending or reading failed.
    #[error("exchange: {0}")]
    Io(#[source] io::Error),
    /// No complete answer within the timeout.
    #[error("timed out")]
    Timeout,
    /// The answer does not start with the expected bytes.
    #[error("unexpected answer")]
    Unexpected,
}

/// One probe of `addr`: connect, then `send`/`expect` as configured, all within `timeout`.
pub async fn probe(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), ProbeError> {
    match timeout(cfg.timeout, exchange(addr, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

async fn exchange(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    // Closed with a reset when dropped: no TIME_WAIT per probe on the proxy's side.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    if let Some(send) = &cfg.send {
        stream.write_all(send).await.map_err(ProbeError::Io)?;
    }
    if let Some(expect) = &cfg.expect {
        let mut got = vec![0u8; expect.len()];
        let mut filled = 0;
        while filled < got.len() {
            match stream
                .read(&mut got[filled..])
                .await
                .map_err(ProbeError::Io)?
            {
                0 => return Err(ProbeError::Unexpected),
                n => filled += n,
            }
            if got[..filled] != expect[..filled] {
                return Err(ProbeError::Unexpected);
            }
        }
    }
    Ok(())
}

/// One backend's checker.
struct Task {
    name: Arc<str>,
    addr: SocketAddr,
    state: Arc<BackendState>,
    metrics: BackendMetrics,
    cfg: HealthConfig,
    owner: Weak<Control>,
}

impl Task {
    async fn run(self, cancel: CancellationToken) {
        let mut rng = Jitter::new();
        let (mut good, mut bad) = (0u32, 0u32);
        // Ejections in a row, and until when the current one lasts.
        let mut streak = 0u32;
        let mut ejected_until: Option<Instant> = None;
        let mut up_since = Instant::now();
        loop {
            let wait = rng.around(self.cfg.interval, self.cfg.jitter);
            let ejection_now = tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => false,
                () = self.state.ejection_requested() => true,
            };
            if ejection_now {
                // A wake-up stored while the backend was down (or before a re-admission
                // reset the run) is stale: only a run that is still at the threshold ejects.
                if self.state.health() == Health::Down {
                    self.state.reset_failures();
                    continue;
                }
                if self.state.failures() < self.cfg.eject_after {
                    continue;
                }
                if up_since.elapsed() > self.cfg.max_eject_time {
                    streak = 0;
                }
                let time = self
                    .cfg
                    .eject_time
                    .saturating_mul(1 << streak.min(16))
                    .min(self.cfg.max_eject_time);
                streak += 1;
                ejected_until = Some(Instant::now() + time);
                self.metrics.ejections.increment(1);
                warn!(backend = %self.name, addr = %self.addr, eject_after = self.cfg.eject_after, ?time, "backend ejected: consecutive connect failures");
                self.transition(Health::Down);
                (good, bad) = (0, 0);
                continue;
            }
            if ejected_until.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let down = self.state.health() == Health::Down;
            if !self.cfg.active && !down {
                continue;
            }
            match probe(self.addr, &self.cfg).await {
                Ok(()) => {
                    self.metrics.checks_ok.increment(1);
                    good += 1;
                    bad = 0;
                    let rise = if self.cfg.active { self.cfg.rise } else { 1 };
                    if down && good >= rise {
                        ejected_until = None;
                        up_since = Instant::now();
                        self.state.reset_failures();
                        self.transition(Health::Up);
                    }
                }
                Err(e) => {
                    self.metrics.checks_failed.increment(1);
                    bad += 1;
                    good = 0;
                    if !down && bad >= self.cfg.fall {
                        warn!(backend = %self.name, addr = %self.addr, error = %e, fall = self.cfg.fall, "backend down: health checks failed");
                        self.transition(Health::Down);
                    }
                }
            }
        }
    }

    fn transition(&self, to: Health) {
        if !self.state.set_health(to) {
            return;
        }
        match to {
            Health::Up => {
                info!(backend = %self.name, addr = %self.addr, "backend up");
                self.metrics.up.set(1.0);
                self.metrics.went_up.increment(1);
            }
            Health::Down => {
                self.metrics.up.set(0.0);
                self.metrics.went_down.increment(1);
            }
        }
        if let Some(control) = self.owner.upgrade() {
            control.health_changed();
        }
    }
}

/// A small xorshift generator for the probe jitter, seeded from the OS once per checker.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Jitter(getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `base` moved by a uniform share in `-jitter..=jitter` of itself.
    fn around(&mut self, base: Duration, jitter: f64) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64; // 0..1
        base.mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_share_and_varies() {
        let mut j = Jitter::new();
        let base = Duration::from_secs(2);
        let waits: Vec<Duration> = (0..1000).map(|_| j.around(base, 0.1)).collect();
        assert!(waits
            .iter()
            .all(|w| *w >= Duration::from_millis(1800) && *w <= Duration::from_millis(2200)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 900, "{} distinct waits", distinct.len());
        assert_eq!(j.around(base, 0.0), base);
    }

    /// A wake-up the data path stored before a re-admission reset the run of failures must
    /// not eject the re-admitted backend.
    #[tokio::test]
    async fn a_stale_ejection_wakeup_ejects_nothing() {
        let metrics = crate::metrics::Metrics::new();
        let bm = metrics.backend("b1");
        let state = Arc::new(BackendState::new(bm.active.clone()));
        let cfg = HealthConfig {
            active: false,
            eject_after: 2,
            interval: Duration::from_secs(3600),
            ..HealthConfig::default()
        };
        assert!(!state.connect_failed(2));
        assert!(
            state.connect_failed(2),
            "the second failure asks for an ejection"
        );
        state.reset_failures(); // as a re-admission does
        let task = Task {
            name: "b1".into(),
            addr: ([127, 0, 0, 1], 1).into(),
            state: state.clone(),
            metrics: bm.clone(),
            cfg: cfg.clone(),
            owner: Weak::new(),
        };
        let cancel = CancellationToken::new();
        let run = tokio::spawn(task.run(cancel.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(state.health(), Health::Up, "ejected on a stale wake-up");
        // A real run of failures still ejects.
        state.connect_failed(2);
        state.connect_failed(2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while state.health() == Health::Up && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state.health(), Health::Down, "a real run did not eject");
        cancel.cancel();
        run.await.unwrap();
    }

    #[tokio::test]
    async fn probe_checks_the_answer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 5];
                    if s.read_exact(&mut buf).await.is_ok() && &buf == b"PING\n" {
                        let _ = s.write_all(b"+PONG\r\n").await;
                    } else {
                        let _ = s.write_all(b"-ERR\r\n").await;
                    }
                });
            }
        });
        let mut cfg = HealthConfig::default();
        assert!(probe(addr, &cfg).await.is_ok(), "plain connect");
        cfg.send = Some(b"PING\n".to_vec());
        cfg.expect = Some(b"+PONG".to_vec());
        assert!(probe(addr, &cfg).await.is_ok());
        cfg.send = Some(b"PINK\n".to_vec());
        assert!(matches!(
            probe(addr, &cfg).await,
            Err(ProbeError::Unexpected)
        ));
        // A listener that never answers: the timeout.
        cfg.send = None;
        cfg.timeout = Duration::from_millis(200);
        assert!(matches!(probe(addr, &cfg).await, Err(ProbeError::Timeout)));
        drop(cfg);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            probe(closed, &HealthConfig::default()).await,
            Err(ProbeError::Connect(_))
        ));
    }
}
