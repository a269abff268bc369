//! A real etcd for the membership tests: `/usr/bin/etcd` on free 127.0.0.1 ports (client and
//! peer) with its own temporary data directory, driven with `etcdctl` (API v3). One member
//! ([`Etcd::start`]) or a three-member cluster on loopback ([`EtcdCluster::start`]). Members can
//! be SIGKILLed (by their own PID) and restarted on the same data directory and ports; dropping
//! the fixture kills what is left and removes the directory.
//!
//! Every wait is bounded: etcdctl runs with short dial/command timeouts and under a hang guard,
//! and a member that does not answer within [`START_GUARD`] fails the test with its log.
//!
//! A single member can also serve its clients over TLS with client-certificate checks
//! ([`EtcdOptions::tls`], certificates from [`super::pki`]) and have authentication enabled
//! ([`Etcd::enable_auth`]); the fixture's own etcdctl calls then use the client certificate
//! and log in as `root`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::pki::Pki;

/// The etcd server binary (Debian `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";
/// The etcd client binary (Debian `etcd-client`).
pub const ETCDCTL: &str = "/usr/bin/etcdctl";
/// Time a member (or cluster) has to answer a health check after being started.
pub const START_GUARD: Duration = Duration::from_secs(40);
/// Hang guard for one etcdctl call (it has its own, shorter, timeouts).
const CTL_GUARD: Duration = Duration::from_secs(20);

/// A distinct suffix for temporary directories within this test process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary directory, unique to this process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "shardproxy-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// `n` distinct free loopback ports (held together while chosen, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Runs `cmd` to completion under `guard`; kills it (by its PID) and fails after that.
fn output_within(cmd: &mut Command, guard: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(guard) {
        Ok(out) => out.expect("wait for the child"),
        Err(_) => {
            // Not yet reaped, so the pid is still this child's.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = rx.recv();
            panic!("{cmd:?} did not exit within {guard:?}");
        }
    }
}

/// `etcdctl` (API v3) against `endpoints` (comma-separated `HOST:PORT`), with short timeouts.
pub fn etcdctl(endpoints: &str, args: &[&str]) -> Output {
    etcdctl_with(endpoints, &[], args)
}

/// [`etcdctl`] with extra global flags (TLS files, `--user`).
fn etcdctl_with(endpoints: &str, flags: &[String], args: &[&str]) -> Output {
    output_within(
        Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=1s", "--command-timeout=3s"])
            .args(flags)
            .args(args),
        CTL_GUARD,
    )
}

/// Like [`etcdctl_with`], retried (bounded) until it succeeds: a cluster that just lost or
/// regained a member may refuse a request or two while it elects a leader. Returns stdout.
fn etcdctl_ok(endpoints: &str, flags: &[String], args: &[&str]) -> String {
    let deadline = Instant::now() + START_GUARD;
    loop {
        let out = etcdctl_with(endpoints, flags, args);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "etcdctl {args:?} at {endpoints} kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `header.revision` of etcdctl's JSON output.
fn header_revision(json: &str) -> i64 {
    let v: serde_json::Value =
        serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("etcdctl JSON {json:?}: {e}"));
    v["header"]["revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("no header.revision in {json}"))
}

/// A key's value and lease (0: none) as etcd has them, or `None` if the key is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value, as UTF-8 (lossy).
    pub value: String,
    /// The lease the key is attached to (0 without one).
    pub lease: i64,
}

/// Operations common to a member and a cluster: everything goes through `endpoints()`.
pub trait EtcdApi {
    /// The client endpoints, `HOST:PORT[,HOST:PORT...]`.
    fn endpoints(&self) -> String;

    /// Runs etcdctl (retried until it succeeds, bounded) with whatever flags this etcd needs;
    /// returns stdout.
    fn ctl_ok(&self, args: &[&str]) -> String {
        etcdctl_ok(&self.endpoints(), &[], args)
    }

    /// `etcd://ENDPOINTS/PREFIX` (PREFIX starts with `/`, no trailing slash).
    fn url(&self, prefix: &str) -> String {
        assert!(prefix.starts_with('/') && !prefix.ends_with('/'));
        format!("etcd://{}{prefix}", self.endpoints())
    }

    /// Puts `key` = `value`; returns the revision of the write.
    fn put(&self, key: &str, value: &str) -> i64 {
        header_revision(&self.ctl_ok(&["put", "-w", "json", "--", key, value]))
    }

    /// Deletes `key`; returns the revision after the delete.
    fn delete(&self, key: &str) -> i64 {
        header_revision(&self.ctl_ok(&["del", "-w", "json", "--", key]))
    }

    /// `key`'s value and lease, or `None` if it is absent.
    fn get(&self, key: &str) -> Option<Entry> {
        let out = self.ctl_ok(&["get", "-w", "json", "--", key]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("etcdctl get JSON");
        let kv = v["kvs"].as_array()?.first()?.clone();
        let value = kv["value"].as_str().unwrap_or_default();
        let value = base64_decode(value);
        Some(Entry {
            value: String::from_utf8_lossy(&value).into_owned(),
            lease: kv["lease"].as_i64().unwrap_or(0),
        })
    }

    /// The current revision of the store.
    fn revision(&self) -> i64 {
        header_revision(&self.ctl_ok(&["get", "-w", "json", "--", "/shardproxy-tests/none"]))
    }

    /// Compacts the history up to the current revision; returns that revision.
    fn compact(&self) -> i64 {
        let rev = self.revision();
        self.ctl_ok(&["compact", "--physical", &rev.to_string()]);
        rev
    }

    /// The IDs of the leases etcd holds (decimal).
    fn leases(&self) -> Vec<i64> {
        let out = self.ctl_ok(&["lease", "list", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("lease list JSON");
        v["leases"]
            .as_array()
            .map(|a| a.iter().filter_map(|l| l["id"].as_i64()).collect())
            .unwrap_or_default()
    }
}

/// Standard base64 (etcdctl's JSON encodes keys and values so).
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let Some(v) = ALPHABET.iter().position(|&a| a == c) else {
            panic!("bad base64 {s:?}");
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// How a single member serves its clients.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Serve clients over TLS with these certificates and require a client certificate
    /// signed by the same CA (`--client-cert-auth`).
    pub tls: Option<Pki>,
    /// More `etcd` flags (e.g. `--auth-token-ttl=2`).
    pub extra_args: Vec<String>,
}

/// One etcd member: its process (if running), its ports and its data directory.
pub struct Etcd {
    options: EtcdOptions,
    /// `root:PASSWORD` once [`Etcd::enable_auth`] has run.
    ctl_user: Option<String>,
    name: String,
    /// The client address (`--listen-client-urls`).
    pub client: SocketAddr,
    /// The peer address (`--listen-peer-urls`).
    pub peer: SocketAddr,
    initial_cluster: String,
    dir: PathBuf,
    owns_dir: bool,
    child: Option<Child>,
}

impl Etcd {
    /// A single-member etcd on free loopback ports, answering when this returns.
    pub fn start() -> Etcd {
        Self::start_with(EtcdOptions::default())
    }

    /// [`Etcd::start`] with `options` (TLS, more flags).
    pub fn start_with(options: EtcdOptions) -> Etcd {
        for attempt in 0.. {
            let ports = free_ports(2);
            let dir = temp_dir("etcd");
            let mut etcd = Etcd::new("m0", ports[0], ports[1], None, dir, true);
            etcd.options = options.clone();
            etcd.spawn();
            match etcd.wait_healthy() {
                Ok(()) => return etcd,
                // A port taken between choosing and binding: etcd exits; choose again.
                Err(why) if attempt < 3 => eprintln!("etcd did not start ({why}); retrying"),
                Err(why) => panic!("etcd did not start: {why}"),
            }
        }
        unreachable!()
    }

    fn new(
        name: &str,
        client: u16,
        peer: u16,
        initial_cluster: Option<String>,
        dir: PathBuf,
        owns_dir: bool,
    ) -> Etcd {
        let initial_cluster =
            initial_cluster.unwrap_or_else(|| format!("{name}=http://127.0.0.1:{peer}"));
        Etcd {
            options: EtcdOptions::default(),
            ctl_user: None,
            name: name.to_string(),
            client: ([127, 0, 0, 1], client).into(),
            peer: ([127, 0, 0, 1], peer).into(),
            initial_cluster,
            dir,
            owns_dir,
            child: None,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}.data", self.name))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The member's log so far (for failure messages).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd {} is already running",
            self.name
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the etcd log");
        let err = log.try_clone().expect("clone the log fd");
        let client = format!("{}://{}", self.scheme(), self.client);
        let peer = format!("http://{}", self.peer);
        let mut tls_args = Vec::new();
        if let Some(pki) = &self.options.tls {
            tls_args = vec![
                format!("--cert-file={}", pki.server_cert.display()),
                format!("--key-file={}", pki.server_key.display()),
                format!("--trusted-ca-file={}", pki.ca.display()),
                "--client-cert-auth".to_string(),
            ];
        }
        let child = Command::new(ETCD)
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=shardproxy-tests")
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .args(&tls_args)
            .args(&self.options.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {ETCD}: {e}"));
        self.child = Some(child);
    }

    /// Waits until this member answers a health check (a committed proposal, so it also
    /// needs a quorum); `Err` if it exited or never answered.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_GUARD;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("etcd exited ({status}):\n{}", self.log()));
                }
            }
            let out = etcdctl_with(
                &self.ctl_endpoint(),
                &self.ctl_flags(),
                &["endpoint", "health"],
            );
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no health within {START_GUARD:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the member (its own PID) and reaps it. No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID; it has not been reaped yet.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same data directory and ports and waits until it
    /// answers (for a cluster member, that needs a quorum).
    pub fn restart(&mut self) {
        self.kill();
        for attempt in 0.. {
            self.spawn();
            match self.wait_healthy() {
                Ok(()) => return,
                // The ports may linger a moment after the kill.
                Err(why) if attempt < 3 => {
                    eprintln!("etcd {} did not restart ({why}); retrying", self.name);
                    self.kill();
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(why) => panic!("etcd {} did not restart: {why}", self.name),
            }
        }
    }

    /// Starts a member that was killed, without waiting (a cluster member needs its peers).
    fn restart_nowait(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The data directory's parent (its log is there too).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Etcd {
    fn scheme(&self) -> &'static str {
        if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The endpoint as etcdctl is given it (with its scheme).
    fn ctl_endpoint(&self) -> String {
        format!("{}://{}", self.scheme(), self.client)
    }

    /// etcdctl's TLS files and login.
    fn ctl_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(pki) = &self.options.tls {
            flags.push(format!("--cacert={}", pki.ca.display()));
            flags.push(format!("--cert={}", pki.client_cert.display()));
            flags.push(format!("--key={}", pki.client_key.display()));
        }
        if let Some(user) = &self.ctl_user {
            flags.push(format!("--user={user}"));
        }
        flags
    }

    /// Turns authentication on: creates `root` with `root_password` and, for each
    /// `(user, password, prefix, permission)` (`read` or `readwrite`), a role with that
    /// permission on every key under `prefix` granted to that user; then `auth enable`.
    /// The fixture's later etcdctl calls log in as root.
    pub fn enable_auth(&mut self, root_password: &str, users: &[(&str, &str, &str, &str)]) {
        self.ctl_ok(&["user", "add", &format!("root:{root_password}")]);
        for (user, password, prefix, permission) in users {
            let role = format!("{user}-role");
            self.ctl_ok(&["role", "add", &role]);
            self.ctl_ok(&[
                "role",
                "grant-permission",
                "--prefix=true",
                &role,
                permission,
                prefix,
            ]);
            self.ctl_ok(&["user", "add", &format!("{user}:{password}")]);
            self.ctl_ok(&["user", "grant-role", user, &role]);
        }
        self.ctl_ok(&["auth", "enable"]);
        self.ctl_user = Some(format!("root:{root_password}"));
    }
}

impl EtcdApi for Etcd {
    fn endpoints(&self) -> String {
        self.client.to_string()
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        etcdctl_ok(&self.ctl_endpoint(), &self.ctl_flags(), args)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A three-member (or `n`-member) etcd cluster on loopback, one process per member.
pub struct EtcdCluster {
    /// The members, in order.
    pub members: Vec<Etcd>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members on free loopback ports and waits until each answers.
    pub fn start(n: usize) -> EtcdCluster {
        for attempt in 0.. {
            let ports = free_ports(2 * n);
            let dir = temp_dir("etcd-cluster");
            let initial: Vec<String> = (0..n)
                .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
                .collect();
            let initial = initial.join(",");
            let mut members: Vec<Etcd> = (0..n)
                .map(|i| {
                    Etcd::new(
                        &format!("m{i}"),
                        ports[2 * i],
                        ports[2 * i + 1],
                        Some(initial.clone()),
                        dir.clone(),
                        false,
                    )
                })
                .collect();
            members.iter_mut().for_each(Etcd::spawn);
            let mut failed = None;
            for m in members.iter_mut() {
                if let Err(why) = m.wait_healthy() {
                    failed = Some(why);
                    break;
                }
            }
            let cluster = EtcdCluster { members, dir };
            match failed {
                None => return cluster,
                Some(why) if attempt < 2 => {
                    eprintln!("etcd cluster did not start ({why}); retrying");
                    drop(cluster);
                }
                Some(why) => panic!("etcd cluster did not start: {why}"),
            }
        }
        unreachable!()
    }

    /// The client endpoints of the members that are running, `HOST:PORT,...`.
    pub fn live_endpoints(&self) -> String {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.pid().is_some())
            .map(|m| m.client.to_string())
            .collect();
        live.join(",")
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Restarts member `i` (same data directory and ports) and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart_nowait();
        if let Err(why) = self.members[i].wait_healthy() {
            panic!("etcd member {i} did not rejoin: {why}");
        }
    }
}

impl EtcdApi for EtcdCluster {
    /// All members' endpoints (etcdctl, like the proxy, fails over between them).
    fn endpoints(&self) -> String {
        let all: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        all.join(",")
    }

    fn put(&self, key: &str, value: &str) -> i64 {
        header_revision(&etcdctl_ok(
            &self.live_endpoints(),
            &[],
            &["put", "-w", "json", "--", key, value],
        ))
    }

    fn delete(&self, key: &str) -> i64 {
        header_revision(&etcdctl_ok(
            &self.live_endpoints(),
            &[],
            &["del", "-w", "json", "--", key],
        ))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in self.members.iter_mut() {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
