//! The control channel's authentication: the shared secret, the directional keys, sealing
//! and opening frames, and the replay cache (layout and rules in [`super`]).
//!
//! Opening a frame is pure apart from the shared replay cache: the caller passes the clock,
//! so tests can check the timestamp window without sleeping.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::frame::Message;
use super::{ControlError, Limits, HEADER_LEN, LEN_PREFIX, TAG_LEN, VERSION};

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// The shared secret both ends derive their keys from. `Debug` shows only its length.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

impl Secret {
    /// Reads the secret from a file (`--dsr-secret-file` on the proxy, `--secret-file` on the
    /// agent). Trailing ASCII whitespace (the newline an editor or `echo` adds) is not part of
    /// the secret. Refuses a file that cannot be read, or whose secret is shorter than
    /// [`MIN_SECRET_LEN`] bytes; the error says what to fix and never contains the secret.
    pub fn from_file(path: &Path) -> Result<Secret, ControlError> {
        let bytes = std::fs::read(path).map_err(|source| ControlError::SecretFile {
            path: path.to_path_buf(),
            source,
        })?;
        Secret::from_bytes(bytes).map_err(|e| match e {
            ControlError::SecretTooShort { len, .. } => ControlError::SecretTooShort {
                path: path.to_path_buf(),
                len,
            },
            other => other,
        })
    }

    /// The secret from bytes already in memory (trailing ASCII whitespace removed, as in
    /// [`Secret::from_file`]).
    pub fn from_bytes(mut bytes: Vec<u8>) -> Result<Secret, ControlError> {
        while bytes.last().is_some_and(u8::is_ascii_whitespace) {
            bytes.pop();
        }
        if bytes.len() < MIN_SECRET_LEN {
            return Err(ControlError::SecretTooShort {
                path: Default::default(),
                len: bytes.len(),
            });
        }
        Ok(Secret(bytes))
    }
}

/// Which end of the control channel this is. Each direction has its own key, so a frame sent
/// by one end is never accepted back by that same end (no reflection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The proxy: sends with the proxy-to-agent key, accepts the agent-to-proxy key.
    Proxy,
    /// The agent: sends with the agent-to-proxy key, accepts the proxy-to-agent key.
    Agent,
}

const LABEL_TO_AGENT: &[u8] = b"shardproxy dsr control v1: proxy to agent";
const LABEL_TO_PROXY: &[u8] = b"shardproxy dsr control v1: agent to proxy";

/// One end's keys, limits and replay cache. Cheap to clone; clones share the replay cache, so
/// give every connection of one process a clone of the same `Auth` — then a frame captured on
/// one connection is refused on another.
#[derive(Clone)]
pub struct Auth {
    send: HmacSha256,
    recv: HmacSha256,
    limits: Limits,
    replay: Arc<Mutex<ReplayCache>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// `HMAC-SHA256(secret, label)`: a key for one direction.
fn derive(secret: &Secret, label: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; new_from_slice cannot fail for it.
    let mut kdf = match HmacSha256::new_from_slice(&secret.0) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    kdf.update(label);
    let key = kdf.finalize().into_bytes();
    match HmacSha256::new_from_slice(&key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

impl Auth {
    /// Keys for `role` from `secret`, with the given limits and a fresh replay cache.
    pub fn new(secret: &Secret, role: Role, limits: Limits) -> Auth {
        let to_agent = derive(secret, LABEL_TO_AGENT);
        let to_proxy = derive(secret, LABEL_TO_PROXY);
        let (send, recv) = match role {
            Role::Proxy => (to_agent, to_proxy),
            Role::Agent => (to_proxy, to_agent),
        };
        Auth {
            send,
            recv,
            limits,
            replay: Arc::new(Mutex::new(ReplayCache::default())),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Encodes and seals `msg` into a whole frame (length prefix included), stamped `now_ms`
    /// (milliseconds since the Unix epoch) with a fresh random nonce.
    pub fn seal(&self, msg: &Message, now_ms: u64) -> Result<Vec<u8>, ControlError> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(ControlError::Random)?;
        self.seal_with_nonce(msg, now_ms, nonce)
    }

    pub(crate) fn seal_with_nonce(
        &self,
        msg: &Message,
        now_ms: u64,
        nonce: [u8; 16],
    ) -> Result<Vec<u8>, ControlError> {
        let body_len = msg.body_len()?;
        let len = (HEADER_LEN + body_len + TAG_LEN) as u64;
        if len > u64::from(self.limits.max_frame) {
            return Err(ControlError::TooLarge {
                len,
                max: self.limits.max_frame,
            });
        }
        let mut out = Vec::with_capacity(LEN_PREFIX + len as usize);
        // len <= max_frame, a u32.
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(VERSION);
        out.push(msg.kind());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        msg.encode_body(&mut out);
        let mut mac = self.send.clone();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        Ok(out)
    }

    /// Test helper: rewrites a whole frame's length prefix and tag after the test edited its
    /// header or body, as a sender holding this end's send key would.
    #[cfg(test)]
    pub(crate) fn reseal(&self, frame: &mut Vec<u8>) {
        frame.truncate(frame.len() - TAG_LEN);
        let len = (frame.len() - LEN_PREFIX + TAG_LEN) as u32;
        frame[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        let mut mac = self.send.clone();
        mac.update(frame);
        let tag = mac.finalize().into_bytes();
        frame.extend_from_slice(&tag);
    }

    /// Checks a frame's length prefix: `Ok(n)` is the number of bytes that follow it.
    pub fn check_len(&self, prefix: [u8; LEN_PREFIX]) -> Result<usize, ControlError> {
        let len = u32::from_be_bytes(prefix);
        if len > self.limits.max_frame {
            return Err(ControlError::TooLarge {
                len: u64::from(len),
                max: self.limits.max_frame,
            });
        }
        let len = len as usize;
        if len < HEADER_LEN + TAG_LEN {
            return Err(ControlError::Malformed(
                "frame shorter than its header and tag",
            ));
        }
        Ok(len)
    }

    /// Opens a whole frame (length prefix included) received at `now_ms`: length, then the
    /// tag (constant-time), then version, timestamp window and replay cache, and only then
    /// the body. Nothing from the body is looked at unless the tag verified.
    pub fn open(&self, frame: &[u8], now_ms: u64) -> Result<Message, ControlError> {
        let Some((prefix, rest)) = frame.split_first_chunk::<LEN_PREFIX>() else {
            return Err(ControlError::Malformed(
                "frame shorter than its length prefix",
            ));
        };
        let len = self.check_len(*prefix)?;
        if rest.len() != len {
            return Err(ControlError::Malformed(
                "frame length does not match its prefix",
            ));
        }
        let (signed, tag) = frame.split_at(frame.len() - TAG_LEN);
        let mut mac = self.recv.clone();
        mac.update(signed);
        mac.verify_slice(tag).map_err(|_| ControlError::BadMac)?;

        // Authenticated from here on.
        let Some((head, body)) = rest[..len - TAG_LEN].split_first_chunk::<{ HEADER_LEN }>() else {
            return Err(ControlError::Malformed("frame shorter than its header"));
        };
        if head[0] != VERSION {
            return Err(ControlError::UnsupportedVersion(head[0]));
        }
        let kind = head[1];
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&head[2..10]);
        let ts = u64::from_be_bytes(ts);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&head[10..26]);
        let window = u64::try_from(self.limits.window.as_millis()).unwrap_or(u64::MAX);
        if ts.abs_diff(now_ms) > window {
            return Err(ControlError::Stale {
                skew_ms: i128::from(ts) - i128::from(now_ms),
            });
        }
        {
            let mut cache = self.replay.lock().unwrap_or_else(|p| p.into_inner());
            cache.check_and_insert(
                ts,
                nonce,
                now_ms.saturating_sub(window),
                self.limits.max_replay_entries,
            )?;
        }
        Message::decode(kind, body)
    }
}

/// Nonces seen within the window, keyed by (timestamp, nonce). An entry whose timestamp is
/// older than the window can go: such a frame is refused as stale before the cache is asked.
#[derive(Default)]
struct ReplayCache {
    seen: BTreeSet<(u64, [u8; 16])>,
}

impl ReplayCache {
    fn check_and_insert(
        &mut self,
        ts: u64,
        nonce: [u8; 16],
        oldest: u64,
        max_entries: usize,
    ) -> Result<(), ControlError> {
        // Evict everything stamped before `oldest`.
        self.seen = self.seen.split_off(&(oldest, [0u8; 16]));
        if self.seen.contains(&(ts, nonce)) {
            return Err(ControlError::Replay);
        }
        if self.seen.len() >= max_entries {
            return Err(ControlError::ReplayCacheFull);
        }
        self.seen.insert((ts, nonce));
        Ok(())
    }
}

/// Milliseconds since the Unix epoch by the system clock (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_empty_secrets_are_refused_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("shardproxy-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"\n").unwrap();
        let err = Secret::from_file(&empty).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ControlError::SecretTooShort { len: 0, .. }),
            "{err:?}"
        );
        assert!(text.contains("at least 16"), "{text}");
        assert!(text.contains("empty"), "{text}");

        let short = dir.join("short");
        std::fs::write(&short, b"hunter2-secret\n").unwrap();
        let err = Secret::from_file(&short).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");

        let good = dir.join("good");
        std::fs::write(&good, b"correct horse battery staple\n").unwrap();
        let secret = Secret::from_file(&good).unwrap();
        assert_eq!(secret.0, b"correct horse battery staple");
        assert!(!format!("{secret:?}").contains("horse"));

        let missing = Secret::from_file(&dir.join("missing")).unwrap_err();
        assert!(matches!(missing, ControlError::SecretFile { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replay_cache_forgets_only_what_the_window_refuses_anyway() {
        let mut c = ReplayCache::default();
        c.check_and_insert(1_000, [1; 16], 0, 10).unwrap();
        c.check_and_insert(2_000, [2; 16], 0, 10).unwrap();
        assert!(matches!(
            c.check_and_insert(1_000, [1; 16], 500, 10),
            Err(ControlError::Replay)
        ));
        // Oldest moves past 1_000: that entry goes, 2_000 stays.
        c.check_and_insert(3_000, [3; 16], 1_500, 10).unwrap();
        assert_eq!(c.seen.len(), 2);
        assert!(matches!(
            c.check_and_insert(2_000, [2; 16], 1_500, 10),
            Err(ControlError::Replay)
        ));
        // The bound holds.
        assert!(matches!(
            c.check_and_insert(3_001, [4; 16], 1_500, 2),
            Err(ControlError::ReplayCacheFull)
        ));
    }
}
