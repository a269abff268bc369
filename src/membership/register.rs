//! The `register` sidecar: keeps one backend's key `PREFIX/backends/NAME` =
//! `{"addr":...,"weight":N}` in etcd, attached to a lease, while a local TCP check passes.
//!
//! - A lease of `--ttl` is granted and kept alive every TTL/3; after a SIGKILL it expires
//!   and the key goes by itself.
//! - The check (a TCP connect to `--check`, default `--addr`) runs every
//!   `--check-interval`: the first result sets the state, then 2 failures in a row mark it
//!   down (the key is deleted, the lease stays) and 2 passes up again (the key is put back).
//! - `registered NAME at etcd://.../PREFIX` is printed on stdout once the key is first
//!   written.
//! - etcd unreachable, or the lease lost: retried with a jittered backoff (100 ms doubling
//!   to 5 s) over the endpoints, with a fresh lease; the sidecar never gives up by itself.
//! - Stop (SIGTERM/SIGINT): the key is deleted and the lease revoked, then it returns.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::etcd::{Etcd, EtcdError, KeepAlive, MembershipUrl, REQUEST_TIMEOUT};
use super::security::EtcdSecurity;
use super::source::{jittered, INITIAL_BACKOFF, MAX_BACKOFF};

/// Consecutive failed checks that delete the key.
pub const FALL: u32 = 2;
/// Consecutive good checks that put it back.
pub const RISE: u32 = 2;

/// What `shardproxy register` keeps in etcd.
#[derive(Debug, Clone)]
pub struct RegisterConfig {
    /// The prefix (and endpoints).
    pub url: MembershipUrl,
    /// TLS and authentication towards etcd.
    pub security: EtcdSecurity,
    /// The backend's name.
    pub name: String,
    /// Where proxies connect to it (`HOST:PORT`, as written into the value).
    pub addr: String,
    /// Its weight.
    pub weight: u32,
    /// The local TCP check's target (`HOST:PORT`).
    pub check: String,
    /// The lease's time to live (whole seconds, at least 1).
    pub ttl: Duration,
    /// Time between checks.
    pub check_interval: Duration,
}

impl RegisterConfig {
    /// The key's value: the admin API's PUT body.
    pub fn value(&self) -> String {
        serde_json::json!({ "addr": self.addr, "weight": self.weight }).to_string()
    }
}

/// The check's view: up/down with fall/rise counting.
#[derive(Debug, Default)]
struct Check {
    /// `None` until the first result.
    up: Option<bool>,
    run: u32,
}

impl Check {
    /// Records one result; returns the state now.
    fn record(&mut self, ok: bool) -> bool {
        match self.up {
            None => {
                self.up = Some(ok);
                self.run = 0;
            }
            Some(up) if up == ok => self.run = 0,
            Some(up) => {
                self.run += 1;
                if self.run >= if up { FALL } else { RISE } {
                    self.up = Some(ok);
                    self.run = 0;
                }
            }
        }
        self.up.unwrap_or(false)
    }
}

/// One TCP connect to `target`, bounded by `timeout`.
async fn probe(target: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await,
        Ok(Ok(_))
    )
}

/// The etcd side: a client, its lease and keep-alive stream, whether the key is written.
struct Session {
    etcd: Etcd,
    endpoint: usize,
    lease: i64,
    keep_alive: KeepAlive,
    written: bool,
}

impl Session {
    async fn open(config: &RegisterConfig, start: usize, ttl: i64) -> Result<Session, EtcdError> {
        let (mut etcd, endpoint) =
            Etcd::connect(&config.url, &config.security, start, REQUEST_TIMEOUT).await?;
        let lease = etcd.grant(ttl).await?;
        let keep_alive = etcd.keep_alive(lease).await?;
        info!(
            endpoint = etcd.endpoint(),
            lease = format_args!("{lease:x}"),
            ttl,
            "etcd lease granted"
        );
        Ok(Session {
            etcd,
            endpoint,
            lease,
            keep_alive,
            written: false,
        })
    }
}

/// Runs the sidecar until `stop`; then deletes the key and revokes the lease (best effort,
/// each bounded in time) and returns.
pub async fn run(config: RegisterConfig, stop: CancellationToken) {
    let key = config.url.backend_key(&config.name);
    let value = config.value();
    let ttl = i64::try_from(config.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let mut checks = tokio::time::interval(config.check_interval);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval((config.ttl / 3).max(Duration::from_millis(300)));
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let probe_timeout = config
        .check_interval
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut check = Check::default();
    let mut session: Option<Session> = None;
    let mut next_endpoint = 0usize;
    let mut backoff = INITIAL_BACKOFF;
    let mut retry_at = Instant::now();
    let mut announced = false;
    let mut was_up: Option<bool> = None;
    loop {
        let retry = tokio::time::sleep_until(retry_at);
        tokio::select! {
            () = stop.cancelled() => break,
            _ = checks.tick() => {
                let up = check.record(probe(&config.check, probe_timeout).await);
                if was_up != Some(up) {
                    if up {
                        info!(check = config.check, "local check passes");
                    } else {
                        warn!(check = config.check, "local check fails: the key is withdrawn");
                    }
                    was_up = Some(up);
                }
            }
            _ = refresh.tick(), if session.is_some() => {
                if let Some(s) = &mut session {
                    match s.keep_alive.refresh().await {
                        Ok(left) if left > 0 => {}
                        Ok(_) => {
                            warn!("the etcd lease expired: granting a new one");
                            session = None;
                        }
                        Err(e) => {
                            warn!(error = %e, "etcd lease keep-alive failed: reconnecting");
                            next_endpoint = s.endpoint + 1;
                            session = None;
                            retry_at = Instant::now() + jittered(backoff);
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
            () = retry, if session.is_none() && check.up.is_some() => {}
        }
        // Reconcile etcd with the check's state.
        let Some(up) = check.up else { continue };
        if session.is_none() {
            if Instant::now() < retry_at {
                continue;
            }
            match Session::open(&config, next_endpoint, ttl).await {
                Ok(s) => session = Some(s),
                Err(e) => {
                    warn!(error = %e, "etcd unreachable: retrying");
                    next_endpoint += 1;
                    retry_at = Instant::now() + jittered(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(s) = &mut session else { continue };
        let result = if up && !s.written {
            s.etcd.put(&key, value.as_bytes(), s.lease).await.map(|()| {
                s.written = true;
                info!(key, value, "registered");
                if !announced {
                    announced = true;
                    println!("registered {} at {}", config.name, config.url);
                }
            })
        } else if !up && s.written {
            s.etcd.delete(&key).await.map(|()| {
                s.written = false;
                info!(key, "deregistered (local check failing)");
            })
        } else {
            Ok(())
        };
        match result {
            Ok(()) => backoff = INITIAL_BACKOFF,
            Err(e) => {
                warn!(error = %e, "etcd request failed: reconnecting");
                next_endpoint = s.endpoint + 1;
                session = None;
                retry_at = Instant::now() + jittered(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    if let Some(mut s) = session {
        if let Err(e) = s.etcd.delete(&key).await {
            warn!(error = %e, "could not delete the key at exit (the lease expiry removes it)");
        }
        match s.etcd.revoke(s.lease).await {
            Ok(()) => info!(key, "deregistered; lease revoked"),
            Err(e) => {
                warn!(error = %e, "could not revoke the lease at exit (it expires by itself)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_falls_and_rises_after_two_in_a_row() {
        let mut c = Check::default();
        assert!(c.record(true), "the first result sets the state");
        assert!(c.record(false), "one failure is not enough");
        assert!(c.record(true));
        assert!(c.record(false));
        assert!(!c.record(false), "two failures in a row");
        assert!(!c.record(true), "one pass is not enough");
        assert!(!c.record(false));
        assert!(!c.record(true));
        assert!(c.record(true), "two passes in a row");
        let mut c = Check::default();
        assert!(!c.record(false), "down from the start");
    }

    #[test]
    fn the_value_is_the_admin_put_body() {
        let c = RegisterConfig {
            url: "etcd://127.0.0.1:2379/p".parse().unwrap(),
            security: EtcdSecurity::default(),
            name: "b1".into(),
            addr: "127.0.0.1:9001".into(),
            weight: 3,
            check: "127.0.0.1:9001".into(),
            ttl: Duration::from_secs(5),
            check_interval: Duration::from_secs(1),
        };
        let config = crate::ProxyConfig::new(([127, 0, 0, 1], 0).into(), Vec::new());
        let (_, spec) = super::super::source::decode("b1", c.value().as_bytes(), &config).unwrap();
        assert_eq!(
            (spec.addr, spec.weight),
            ("127.0.0.1:9001".parse().unwrap(), 3)
        );
    }
}
