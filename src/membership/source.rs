//! The proxy's membership task with `--membership etcd://.../PREFIX`.
//!
//! - **Start** (`boot`): one Range over `PREFIX/backends/` gives the set and its revision
//!   (within [`START_TIMEOUT`]); if etcd cannot be reached the cache file is used; with
//!   neither the proxy does not start. An empty prefix is a valid (empty) set.
//! - **Follow** (`spawn`): a watch from revision+1; events within the debounce are
//!   coalesced into one table swap (`Control::replace_from_source`). A value that does not
//!   decode (the admin API's PUT body, one decoder for both) is logged with its key and why,
//!   counted, and the key is treated as absent; the others apply. After each applied change
//!   the cache file is rewritten (JSON, atomically by rename).
//! - **Failures**: etcd unreachable → routing continues on the last table, accepting
//!   continues, `shardproxy_membership_connected 0`; the task reconnects with a jittered
//!   backoff (100 ms doubling to 5 s), trying the next endpoint, then reads the prefix afresh
//!   (resync) and watches again. A compacted revision also means a fresh read, never a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::etcd::{Etcd, EtcdError, MembershipUrl, Watch, WatchEvent, REQUEST_TIMEOUT};
use crate::config::{BackendSpec, ProxyConfig};
use crate::control::{validate_spec, BackendBody, Control};
use crate::metrics::MembershipMetrics;

/// How long the start-up read may take before the cache file is used instead.
pub const START_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnect delay; it doubles up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The etcd membership's live status (the admin API's `GET /membership`, the metrics).
pub struct MembershipStatus {
    url: MembershipUrl,
    connected: AtomicBool,
    revision: AtomicI64,
    metrics: MembershipMetrics,
}

impl MembershipStatus {
    /// A status for `url`, not connected yet, publishing to `metrics`.
    pub(crate) fn new(url: MembershipUrl, metrics: MembershipMetrics) -> Self {
        metrics.connected.set(0.0);
        MembershipStatus {
            url,
            connected: AtomicBool::new(false),
            revision: AtomicI64::new(0),
            metrics,
        }
    }

    /// The `--membership` URL.
    pub fn url(&self) -> &MembershipUrl {
        &self.url
    }

    /// Whether the proxy follows etcd now (connected and watching).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The etcd store revision of the membership in force.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        self.metrics
            .connected
            .set(if connected { 1.0 } else { 0.0 });
    }

    fn set_revision(&self, revision: i64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.metrics.revision.set(revision as f64);
    }
}

/// The decoded membership: backend name → (its value as JSON, its spec), in name order.
type Members = BTreeMap<String, (Value, BackendSpec)>;

/// Decodes the value of key `PREFIX/backends/NAME` (the admin API's PUT body) and checks the
/// backend the way the admin API does.
pub(crate) fn decode(
    name: &str,
    value: &[u8],
    config: &ProxyConfig,
) -> Result<(Value, BackendSpec), String> {
    let json: Value = serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let body: BackendBody = serde_json::from_value(json.clone()).map_err(|e| {
        format!("{e} (expected {{\"addr\":\"HOST:PORT\",\"weight\":N}}, optional max_connections, agent, proxy_protocol)")
    })?;
    let spec = body.spec(name.to_string())?;
    validate_spec(&spec, config).map_err(|e| e.to_string())?;
    Ok((json, spec))
}

/// The membership being followed: what etcd holds (decoded) and what was last applied.
struct State {
    url: MembershipUrl,
    config: Arc<ProxyConfig>,
    members: Members,
    revision: i64,
    /// The specs last swapped in (`None`: nothing applied by this task yet).
    applied: Option<Vec<BackendSpec>>,
    invalid: MembershipMetricsOrCount,
}

/// Where invalid values are counted: the proxy's metrics, or a plain count (start-up read,
/// before the metrics exist; tests).
enum MembershipMetricsOrCount {
    Metrics(MembershipMetrics),
    Count(u64),
}

impl State {
    fn new(url: MembershipUrl, config: Arc<ProxyConfig>) -> Self {
        State {
            url,
            config,
            members: Members::new(),
            revision: 0,
            applied: None,
            invalid: MembershipMetricsOrCount::Count(0),
        }
    }

    fn count_invalid(&mut self) {
        match &mut self.invalid {
            MembershipMetricsOrCount::Metrics(m) => m.invalid_values.increment(1),
            MembershipMetricsOrCount::Count(n) => *n += 1,
        }
    }

    /// Applies one event to `members`; keys outside `PREFIX/backends/` are ignored.
    fn event(&mut self, event: WatchEvent) {
        let prefix = self.url.backends_prefix();
        match event {
            WatchEvent::Put { key, value } => {
                let Some(name) = key.strip_prefix(&prefix) else {
                    return;
                };
                match decode(name, &value, &self.config) {
                    Ok(entry) => {
                        self.members.insert(name.to_string(), entry);
                    }
                    Err(why) => {
                        warn!(
                            key,
                            why,
                            "invalid membership value in etcd: skipped (the backend is left out)"
                        );
                        self.count_invalid();
                        self.members.remove(name);
                    }
                }
            }
            WatchEvent::Delete { key } => {
                if let Some(name) = key.strip_prefix(&prefix) {
                    self.members.remove(name);
                }
            }
        }
    }

    /// Replaces `members` with a fresh read of the prefix.
    fn reset(&mut self, kvs: Vec<(String, Vec<u8>)>, revision: i64) {
        self.members.clear();
        for (key, value) in kvs {
            self.event(WatchEvent::Put { key, value });
        }
        self.revision = revision;
    }

    fn specs(&self) -> Vec<BackendSpec> {
        self.members.values().map(|(_, s)| s.clone()).collect()
    }
}

/// The cache file: the last membership applied, as etcd had it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    url: String,
    revision: i64,
    backends: BTreeMap<String, Value>,
}

/// Writes the cache file atomically (a temporary file next to it, then a rename).
fn write_cache(path: &Path, state: &State) -> std::io::Result<()> {
    let file = CacheFile {
        url: state.url.to_string(),
        revision: state.revision,
        backends: state
            .members
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads the cache file into `state` (its values decoded like etcd's); refuses a file that
/// is not a membership cache, or was written for another URL's prefix.
fn read_cache(path: &Path, state: &mut State) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let file: CacheFile = serde_json::from_slice(&text)
        .map_err(|e| format!("it is not a shardproxy membership cache: {e}"))?;
    let written_for: MembershipUrl = file
        .url
        .parse()
        .map_err(|e| format!("it is not a shardproxy membership cache: {e}"))?;
    if written_for.prefix != state.url.prefix {
        return Err(format!(
            "it was written for prefix {} (not {})",
            written_for.prefix, state.url.prefix
        ));
    }
    let kvs = file
        .backends
        .into_iter()
        .map(|(name, value)| {
            let bytes = serde_json::to_vec(&value).unwrap_or_default();
            (state.url.backend_key(&name), bytes)
        })
        .collect();
    state.reset(kvs, file.revision);
    Ok(())
}

/// The start-up read: the membership to start with, and the client that read it.
pub(crate) struct Boot {
    state: State,
    client: Option<(Etcd, usize)>,
}

impl Boot {
    /// The backends to start with.
    pub(crate) fn specs(&self) -> Vec<BackendSpec> {
        self.state.specs()
    }
}

/// Reads the membership at start: etcd (within [`START_TIMEOUT`]), else the cache file.
/// The error names both when neither can be used.
pub(crate) async fn boot(config: &ProxyConfig) -> Result<Boot, String> {
    let Some(m) = &config.membership else {
        return Err("no --membership given".into());
    };
    if let Some(w) = m.security.warning() {
        warn!("{w}");
    }
    let mut state = State::new(m.url.clone(), Arc::new(config.clone()));
    let per_endpoint = START_TIMEOUT / u32::try_from(m.url.endpoints.len().max(1)).unwrap_or(1);
    let read = tokio::time::timeout(START_TIMEOUT, async {
        let (mut etcd, i) = Etcd::connect(&m.url, &m.security, 0, per_endpoint).await?;
        let (kvs, revision) = etcd.get_prefix(&m.url.backends_prefix()).await?;
        Ok::<_, EtcdError>((etcd, i, kvs, revision))
    })
    .await
    .unwrap_or(Err(EtcdError::Timeout("start-up read")));
    match read {
        Ok((etcd, i, kvs, revision)) => {
            state.reset(kvs, revision);
            info!(
                url = %m.url,
                revision,
                backends = state.members.len(),
                "membership read from etcd"
            );
            if let Some(path) = &m.cache_file {
                if let Err(e) = write_cache(path, &state) {
                    warn!(file = %path.display(), error = %e, "cannot write the membership cache file");
                }
            }
            Ok(Boot {
                state,
                client: Some((etcd, i)),
            })
        }
        Err(e) => match &m.cache_file {
            Some(path) => match read_cache(path, &mut state) {
                Ok(()) => {
                    warn!(
                        url = %m.url,
                        error = %e,
                        file = %path.display(),
                        revision = state.revision,
                        backends = state.members.len(),
                        "etcd unreachable at start: starting from the membership cache file"
                    );
                    Ok(Boot {
                        state,
                        client: None,
                    })
                }
                Err(why) => Err(format!(
                    "cannot read the membership: etcd at {} cannot be used ({e}) and the cache file {} cannot be used ({why})",
                    m.url,
                    path.display()
                )),
            },
            None => Err(format!(
                "cannot read the membership: etcd at {} cannot be used ({e}) and no cache file was given (--membership-cache, [membership] cache_file)",
                m.url
            )),
        },
    }
}

/// Something that yields watch batches (the etcd watch; a fake one in tests).
trait Feed {
    /// The next batch and the store revision it brings.
    async fn next(&mut self) -> Result<(Vec<WatchEvent>, i64), EtcdError>;
}

impl Feed for Watch {
    async fn next(&mut self) -> Result<(Vec<WatchEvent>, i64), EtcdError> {
        Watch::next(self).await
    }
}

/// Follows `feed` until it fails (returned) or `stop` (Ok): events are folded into `state`
/// and `commit` is called once per debounce window that saw events. Pending events are
/// committed before a failure is returned.
async fn follow<F: Feed>(
    feed: &mut F,
    state: &mut State,
    debounce: Duration,
    stop: &CancellationToken,
    mut commit: impl FnMut(&mut State),
) -> Result<(), EtcdError> {
    let mut due: Option<Instant> = None;
    loop {
        let deadline = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(deadline), if due.is_some() => {
                commit(state);
                due = None;
            }
            batch = feed.next() => match batch {
                Ok((events, revision)) => {
                    if !events.is_empty() {
                        for e in events {
                            state.event(e);
                        }
                        state.revision = state.revision.max(revision);
                        due.get_or_insert_with(|| Instant::now() + debounce);
                    }
                }
                Err(e) => {
                    if due.is_some() {
                        commit(state);
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Swaps the followed membership in (unless it is the one in force) and rewrites the cache.
fn commit(control: &Control, status: &MembershipStatus, cache: Option<&Path>, state: &mut State) {
    let specs = state.specs();
    if state.applied.as_ref() != Some(&specs) {
        match control.replace_from_source(&specs) {
            Ok(generation) => {
                status.metrics.applied.increment(1);
                info!(
                    generation,
                    revision = state.revision,
                    backends = specs.len(),
                    "membership from etcd applied"
                );
                state.applied = Some(specs);
                if let Some(path) = cache {
                    if let Err(e) = write_cache(path, state) {
                        warn!(file = %path.display(), error = %e, "cannot write the membership cache file");
                    }
                }
            }
            Err(e) => {
                status.metrics.rejected.increment(1);
                warn!(error = %e, revision = state.revision, "membership from etcd rejected: the old table stays");
            }
        }
    }
    status.set_revision(state.revision);
}

/// A delay in `[d/2, d]`, so that proxies that lost etcd together do not come back in step.
pub(crate) fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let frac = f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(0.5 + frac / 2.0)
}

/// Starts following etcd from the start-up read, on the current runtime, until `stop`.
pub(crate) fn spawn(
    control: Arc<Control>,
    boot: Boot,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(control, boot, stop))
}

/// `fut`'s output, or `None` once `stop` is cancelled (the proxy's shutdown does not wait
/// for an etcd request in flight).
async fn unless_stopped<T>(
    stop: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        () = stop.cancelled() => None,
        v = fut => Some(v),
    }
}

async fn run(control: Arc<Control>, boot: Boot, stop: CancellationToken) {
    let Some(status) = control.membership().cloned() else {
        return;
    };
    let config = control.config();
    let Some(m) = config.membership.clone() else {
        return;
    };
    let cache = m.cache_file.as_deref();
    let Boot { mut state, client } = boot;
    // The start-up read's invalid values were counted before the metrics existed: carry them.
    if let MembershipMetricsOrCount::Count(n) = state.invalid {
        status.metrics.invalid_values.increment(n);
    }
    state.invalid = MembershipMetricsOrCount::Metrics(status.metrics.clone());
    // The start-up set is in force already (it built the first table).
    state.applied = Some(state.specs());
    status.set_revision(state.revision);
    let need_read = client.is_none();
    let mut client = client;
    let mut need_read = need_read;
    let mut next = 0usize;
    let mut backoff = INITIAL_BACKOFF;
    let prefix = m.url.backends_prefix();
    loop {
        let (etcd, i) = match client.as_mut() {
            Some(c) => c,
            None => {
                status.set_connected(false);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(jittered(backoff)) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                status.metrics.reconnects.increment(1);
                let Some(connected) = unless_stopped(
                    &stop,
                    Etcd::connect(&m.url, &m.security, next, REQUEST_TIMEOUT),
                )
                .await
                else {
                    return;
                };
                match connected {
                    Ok(c) => {
                        need_read = true;
                        client.insert(c)
                    }
                    Err(e) => {
                        warn!(error = %e, "etcd still unreachable: routing on the last table");
                        next += 1;
                        continue;
                    }
                }
            }
        };
        let i = *i;
        if need_read {
            let Some(read) = unless_stopped(&stop, etcd.get_prefix(&prefix)).await else {
                return;
            };
            match read {
                Ok((kvs, revision)) => {
                    state.reset(kvs, revision);
                    commit(&control, &status, cache, &mut state);
                    need_read = false;
                }
                Err(e) => {
                    warn!(endpoint = etcd.endpoint(), error = %e, "reading the membership from etcd failed");
                    client = None;
                    next = i + 1;
                    continue;
                }
            }
        }
        let Some(watched) =
            unless_stopped(&stop, etcd.watch_prefix(&prefix, state.revision + 1)).await
        else {
            return;
        };
        let mut watch = match watched {
            Ok(w) => w,
            Err(EtcdError::Compacted(_)) => {
                need_read = true;
                continue;
            }
            Err(e) => {
                warn!(endpoint = etcd.endpoint(), error = %e, "watching the membership in etcd failed");
                client = None;
                next = i + 1;
                continue;
            }
        };
        status.set_connected(true);
        backoff = INITIAL_BACKOFF;
        info!(
            endpoint = etcd.endpoint(),
            revision = state.revision,
            "following the membership in etcd"
        );
        let followed = follow(&mut watch, &mut state, m.debounce, &stop, |s| {
            commit(&control, &status, cache, s)
        })
        .await;
        match followed {
            Ok(()) => return,
            Err(EtcdError::Compacted(oldest)) => {
                info!(
                    oldest,
                    "etcd compacted past the watched revision: reading the prefix afresh"
                );
                need_read = true;
            }
            Err(e) => {
                status.set_connected(false);
                warn!(error = %e, "lost etcd: routing continues on the last table; reconnecting");
                client = None;
                next = i + 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> MembershipUrl {
        "etcd://127.0.0.1:2379/sp/pool".parse().unwrap()
    }

    fn state() -> State {
        let config = ProxyConfig::new(([127, 0, 0, 1], 0).into(), Vec::new());
        State::new(url(), Arc::new(config))
    }

    fn put(name: &str, value: &str) -> WatchEvent {
        WatchEvent::Put {
            key: url().backend_key(name),
            value: value.as_bytes().to_vec(),
        }
    }

    fn invalid(s: &State) -> u64 {
        match s.invalid {
            MembershipMetricsOrCount::Count(n) => n,
            MembershipMetricsOrCount::Metrics(_) => unreachable!(),
        }
    }

    #[test]
    fn values_decode_like_the_admin_api() {
        let config = ProxyConfig::new(([127, 0, 0, 1], 0).into(), Vec::new());
        let (_, spec) = decode("b1", br#"{"addr":"127.0.0.1:9001","weight":3}"#, &config).unwrap();
        assert_eq!((spec.name.as_str(), spec.weight), ("b1", 3));
        let (_, spec) = decode("b2", br#"{"addr":"127.0.0.1:9002"}"#, &config).unwrap();
        assert_eq!(spec.weight, 1);
        let (_, spec) = decode(
            "b3",
            br#"{"addr":"127.0.0.1:9003","weight":0,"max_connections":5,"proxy_protocol":"v2"}"#,
            &config,
        )
        .unwrap();
        assert_eq!(
            (spec.weight, spec.max_connections, spec.proxy_protocol),
            (0, Some(5), Some(true))
        );
        for (name, value, why) in [
            ("b", "not json", "not JSON"),
            ("b", r#"{"weight":1}"#, "missing field `addr`"),
            (
                "b",
                r#"{"addr":"127.0.0.1:1","wieght":2}"#,
                "unknown field `wieght`",
            ),
            (
                "b",
                r#"{"addr":"127.0.0.1:1","weight":-1}"#,
                "expected {\"addr\"",
            ),
            ("b", r#"{"addr":"nowhere"}"#, "nowhere"),
            (
                "b",
                r#"{"addr":"127.0.0.1:1","weight":1000001}"#,
                "out of range",
            ),
            ("b", r#"{"addr":"127.0.0.1:0"}"#, "cannot be connected to"),
            (
                "b",
                r#"{"addr":"127.0.0.1:1","proxy_protocol":"v1"}"#,
                "not v2 or none",
            ),
            ("a b", r#"{"addr":"127.0.0.1:1"}"#, "no spaces"),
        ] {
            let e = decode(name, value.as_bytes(), &config).unwrap_err();
            assert!(e.contains(why), "{value}: {e}");
        }
    }

    #[test]
    fn a_malformed_value_is_counted_and_leaves_the_backend_out() {
        let mut s = state();
        s.event(put("b1", r#"{"addr":"127.0.0.1:9001"}"#));
        s.event(put("b2", r#"{"addr":"127.0.0.1:9002"}"#));
        s.event(put("b2", r#"{"addr":"#));
        s.event(WatchEvent::Put {
            key: "/sp/pool/other".into(),
            value: b"ignored".to_vec(),
        });
        assert_eq!(s.members.keys().collect::<Vec<_>>(), ["b1"]);
        assert_eq!(invalid(&s), 1);
        s.event(WatchEvent::Delete {
            key: url().backend_key("b1"),
        });
        assert!(s.members.is_empty());
    }

    #[test]
    fn the_cache_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("sp-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("members.json");
        let mut s = state();
        s.event(put("b1", r#"{"addr":"127.0.0.1:9001","weight":2}"#));
        s.event(put(
            "b2",
            r#"{"addr":"127.0.0.1:9002","max_connections":7}"#,
        ));
        s.revision = 42;
        write_cache(&path, &s).unwrap();
        let mut back = state();
        read_cache(&path, &mut back).unwrap();
        assert_eq!(back.revision, 42);
        assert_eq!(back.specs(), s.specs());
        assert_eq!(invalid(&back), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_cache_file_is_refused_with_why() {
        let dir = std::env::temp_dir().join(format!("sp-cache-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("members.json");
        for (text, why) in [
            (
                "{\"url\":\"etcd://127.0.0.1:2379/sp/pool\",\"revision\":3,\"backe",
                "not a shardproxy membership cache",
            ),
            ("[1,2]", "not a shardproxy membership cache"),
            (
                r#"{"url":"etcd://127.0.0.1:2379/sp/pool","revision":3,"backends":{},"x":1}"#,
                "unknown field `x`",
            ),
            (
                r#"{"url":"etcd://127.0.0.1:2379/other","revision":3,"backends":{}}"#,
                "written for prefix /other",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = read_cache(&path, &mut state()).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let e = read_cache(&dir.join("missing.json"), &mut state()).unwrap_err();
        assert!(e.contains("cannot read it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fake watch: batches (or a failure) sent by the test.
    struct FakeFeed(
        tokio::sync::mpsc::UnboundedReceiver<Result<(Vec<WatchEvent>, i64), EtcdError>>,
    );

    impl Feed for FakeFeed {
        async fn next(&mut self) -> Result<(Vec<WatchEvent>, i64), EtcdError> {
            match self.0.recv().await {
                Some(r) => r,
                None => std::future::pending().await,
            }
        }
    }

    #[tokio::test]
    async fn events_within_the_debounce_make_one_swap() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut feed = FakeFeed(rx);
        let mut s = state();
        let stop = CancellationToken::new();
        // Three batches already waiting: one window, one commit with all three.
        tx.send(Ok((vec![put("b1", r#"{"addr":"127.0.0.1:9001"}"#)], 2)))
            .unwrap();
        tx.send(Ok((vec![put("b2", r#"{"addr":"127.0.0.1:9002"}"#)], 3)))
            .unwrap();
        tx.send(Ok((vec![], 3))).unwrap();
        tx.send(Ok((vec![put("b3", r#"{"addr":"127.0.0.1:9003"}"#)], 4)))
            .unwrap();
        let commits = std::sync::Mutex::new(Vec::<(Vec<String>, i64)>::new());
        let record = |s: &mut State| {
            commits
                .lock()
                .unwrap()
                .push((s.members.keys().cloned().collect(), s.revision))
        };
        let followed = {
            let following = follow(&mut feed, &mut s, Duration::from_millis(300), &stop, record);
            tokio::pin!(following);
            // The window closes, then a later batch opens a second one; then the feed fails.
            let sender = async {
                while commits.lock().unwrap().is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tx.send(Ok((
                    vec![WatchEvent::Delete {
                        key: url().backend_key("b1"),
                    }],
                    5,
                )))
                .unwrap();
                tx.send(Err(EtcdError::WatchEnded)).unwrap();
                std::future::pending::<()>().await
            };
            tokio::select! {
                r = &mut following => r,
                () = sender => unreachable!(),
            }
        };
        assert!(
            matches!(followed, Err(EtcdError::WatchEnded)),
            "{followed:?}"
        );
        let commits = commits.into_inner().unwrap();
        assert_eq!(
            commits,
            [
                (vec!["b1".to_string(), "b2".into(), "b3".into()], 4),
                // Pending events are committed before the failure is returned.
                (vec!["b2".to_string(), "b3".into()], 5),
            ]
        );
    }

    #[tokio::test]
    async fn stop_ends_following() {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        stop.cancel();
        let r = follow(
            &mut FakeFeed(rx),
            &mut state(),
            Duration::from_millis(10),
            &stop,
            |_| {},
        )
        .await;
        assert!(r.is_ok());
    }
}
