//! The authenticated control channel between the proxy and a backend host's agent
//! (docs/design.md §6, step 4): the proxy sends a frozen socket's state, the agent answers
//! whether it rebuilt it, the proxy says when the flow is steered, the agent reports when the
//! connection ends.
//!
//! Every message travels in one frame, authenticated with HMAC-SHA256 under a key derived
//! from the shared secret ([`Secret`]), stamped with the sender's clock and a random nonce.
//! A receiver refuses a frame that is too long (before allocating it), whose tag does not
//! verify, whose timestamp is outside the window, or whose nonce it has seen within the
//! window — and it looks at the body only after all of that. Any [`ControlError`] from
//! [`ControlConn::recv`] means: count [`ControlError::reason`], close this connection; an
//! agent never rebuilds a socket from a frame that did not verify and decode completely.
//!
//! # Frame layout, version 1
//!
//! All integers big-endian.
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4  | `len`: bytes that follow this field (header + body + tag), at most [`Limits::max_frame`] |
//! | 4  | 1  | version, `1` |
//! | 5  | 1  | kind (below) |
//! | 6  | 8  | timestamp, milliseconds since the Unix epoch, by the sender's clock |
//! | 14 | 16 | nonce, random per frame |
//! | 30 | n  | body (below) |
//! | 30+n | 32 | HMAC-SHA256 tag over bytes `0 .. 30+n` (the length prefix included) |
//!
//! The tag's key depends on the direction: `HMAC-SHA256(secret, "shardproxy dsr control v1:
//! proxy to agent")` for frames the proxy sends and `... agent to proxy` for frames the agent
//! sends. A frame reflected back to its sender therefore fails its tag.
//!
//! Bodies by kind (`str` = `u16` byte length + UTF-8, `bytes` = `u32` length + bytes; the body
//! must end exactly where the tag begins):
//!
//! | kind | message | body |
//! |----:|---------|------|
//! | 1 | `Ping` | empty |
//! | 2 | `Pong` | empty |
//! | 3 | `Handoff` | `id u64`, `flags u8` (bit 0: strip_header; other bits 0), `backend str` (≤ [`MAX_BACKEND_LEN`]), `state bytes` |
//! | 4 | `Imported` | `id u64` |
//! | 5 | `Failed` | `id u64`, `errno i32`, `reason str` (≤ [`MAX_REASON_LEN`]) |
//! | 6 | `Steered` | `id u64` |
//! | 7 | `Closed` | `id u64`, `bytes_from_client u64`, `bytes_to_client u64` |
//! | 8 | `Abort` | `id u64` |
//! | 9 | `Query` | `port u16`, `count u32` (≤ [`MAX_IDS`]), `count ×` (`id u64`, client IPv4 `4 bytes`, client port `u16`) |
//! | 10 | `Alive` | `count u32` (≤ [`MAX_IDS`]), `count × id u64` |
//!
//! # Replay and clocks
//!
//! A frame is accepted if its timestamp is within [`Limits::window`] (default ±30 s) of the
//! receiver's clock, so the hosts' clocks must agree that well (NTP). Within the window the
//! receiver remembers every (timestamp, nonce) it accepted and refuses a repeat; entries older
//! than the window are dropped (such frames are stale anyway), and the cache holds at most
//! [`Limits::max_replay_entries`]. Only frames whose tag verified reach the cache, so a peer
//! without the secret cannot fill it. The cache lives in the [`Auth`] and is shared by its
//! clones, so one `Auth` per process covers all its connections.
//!
//! # Timeouts
//!
//! None here: `send` and `recv` wait as long as the stream does. Callers wrap them in
//! `tokio::time::timeout` (the proxy bounds the whole hand-off; the agent bounds how long a
//! connection may sit idle or mid-frame). `recv` is not cancel-safe: a timeout may leave the
//! stream mid-frame, so after one the caller closes the connection rather than reading on.

mod auth;
mod frame;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use auth::{now_ms, Auth, Role, Secret, MIN_SECRET_LEN};
pub use frame::{Message, MAX_BACKEND_LEN, MAX_IDS, MAX_REASON_LEN};

/// The frame format version this code speaks.
pub const VERSION: u8 = 1;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes after the length prefix and before the body: version, kind, timestamp, nonce.
pub const HEADER_LEN: usize = 1 + 1 + 8 + 16;
/// Bytes of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Default bound on a frame (the length field's value): a frozen socket's send and receive
/// queues travel inside a `Handoff`, so 64 MiB for them plus room for the rest.
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024 * 1024 + 64 * 1024;

/// Bounds one end enforces. Both ends bound what they send and what they accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame sent or accepted (the length field's value). A longer length is refused
    /// before anything is allocated for it.
    pub max_frame: u32,
    /// How far a frame's timestamp may be from the receiver's clock, either way.
    pub window: Duration,
    /// Most nonces remembered at once; a frame that would exceed it is refused.
    pub max_replay_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
            window: Duration::from_secs(30),
            max_replay_entries: 1 << 20,
        }
    }
}

/// Why a control-channel operation failed. Any of these on `recv` closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The stream failed, or ended in the middle of a frame.
    #[error("control connection i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly between frames.
    #[error("control connection closed by the peer")]
    Closed,
    /// A frame's length is over the bound (nothing was allocated for it).
    #[error("control frame of {len} bytes is over the {max}-byte bound")]
    TooLarge {
        /// The announced (or, when sending, the needed) length.
        len: u64,
        /// The bound.
        max: u32,
    },
    /// The tag did not verify: wrong secret, wrong direction, or altered bytes.
    #[error("control frame failed authentication (wrong secret or altered frame)")]
    BadMac,
    /// A frame already accepted within the window came again.
    #[error("control frame replayed")]
    Replay,
    /// The frame's timestamp is outside the window (clock skew or an old capture).
    #[error("control frame timestamp is {skew_ms} ms off this host's clock (check NTP)")]
    Stale {
        /// Frame timestamp minus receiver clock, in milliseconds.
        skew_ms: i128,
    },
    /// The replay cache is full; the frame was refused rather than remembered.
    #[error("control replay cache is full")]
    ReplayCacheFull,
    /// The frame authenticated but speaks another format version.
    #[error("control frame version {0} is not supported (this end speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// The frame is inconsistent (lengths, kind, UTF-8, trailing bytes), or a message to send
    /// is over a field bound.
    #[error("malformed control frame: {0}")]
    Malformed(&'static str),
    /// The system's random source failed (no nonce, nothing sent).
    #[error("no random nonce: {0}")]
    Random(#[source] getrandom::Error),
    /// The secret file could not be read.
    #[error("cannot read the DSR secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The secret is empty or too short.
    #[error(
        "the DSR secret in {path} is {} ({len} bytes after trailing whitespace): put at least \
         {MIN_SECRET_LEN} random bytes in it, the same file on the proxy and every agent, e.g. \
         `head -c 32 /dev/urandom | base64 > FILE`",
        if *len == 0 { "empty" } else { "too short" }
    )]
    SecretTooShort {
        /// The file (empty when the secret did not come from a file).
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
}

impl ControlError {
    /// A short fixed label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ControlError::Io(_) => "io",
            ControlError::Closed => "closed",
            ControlError::TooLarge { .. } => "too_large",
            ControlError::BadMac => "bad_mac",
            ControlError::Replay => "replay",
            ControlError::Stale { .. } => "stale",
            ControlError::ReplayCacheFull => "replay_cache_full",
            ControlError::UnsupportedVersion(_) => "version",
            ControlError::Malformed(_) => "malformed",
            ControlError::Random(_) => "random",
            ControlError::SecretFile { .. } | ControlError::SecretTooShort { .. } => "secret",
        }
    }
}

/// One control connection: frames over any byte stream (TCP in production, `duplex` in
/// tests). Not split into halves: one task owns it. See the module doc for timeouts.
#[derive(Debug)]
pub struct ControlConn<S> {
    io: S,
    auth: Auth,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ControlConn<S> {
    /// Wraps a connected stream; `auth` is this end's (shared) [`Auth`].
    pub fn new(io: S, auth: Auth) -> Self {
        ControlConn { io, auth }
    }

    /// Seals and writes one message, then flushes.
    pub async fn send(&mut self, msg: &Message) -> Result<(), ControlError> {
        write_message(&mut self.io, &self.auth, msg).await
    }

    /// Reads one frame and returns its message (not cancel-safe; see the module doc): the length is checked against the bound
    /// before any buffer grows, the buffer grows only as bytes arrive, and the body is decoded
    /// only after the tag, timestamp and nonce pass. On error, close the connection.
    pub async fn recv(&mut self) -> Result<Message, ControlError> {
        read_message(&mut self.io, &self.auth).await
    }

    /// This end's [`Auth`].
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Gives the stream back.
    pub fn into_inner(self) -> S {
        self.io
    }
}

/// Seals `msg` with `auth`, writes the frame and flushes: [`ControlConn::send`] over a
/// write half, for a connection whose reading and writing are done by different tasks.
pub async fn write_message<W: AsyncWrite + Unpin>(
    io: &mut W,
    auth: &Auth,
    msg: &Message,
) -> Result<(), ControlError> {
    let frame = auth.seal(msg, now_ms())?;
    io.write_all(&frame).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one frame and returns its message: [`ControlConn::recv`] over a read half (not
/// cancel-safe; see the module doc). The length is checked against the bound before any
/// buffer grows, the buffer grows only as bytes arrive, and the body is decoded only after
/// the tag, timestamp and nonce pass. On error, close the connection.
pub async fn read_message<R: AsyncRead + Unpin>(
    io: &mut R,
    auth: &Auth,
) -> Result<Message, ControlError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut got = 0;
    while got < LEN_PREFIX {
        match io.read(&mut prefix[got..]).await? {
            0 if got == 0 => return Err(ControlError::Closed),
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            n => got += n,
        }
    }
    let len = auth.check_len(prefix)?;
    // Grow with the bytes that actually arrive, not with the announced length.
    let mut frame = Vec::with_capacity(LEN_PREFIX + len.min(64 * 1024));
    frame.extend_from_slice(&prefix);
    let read = io.take(len as u64).read_to_end(&mut frame).await?;
    if read < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    auth.open(&frame, now_ms())
}

#[cfg(test)]
mod tests;
