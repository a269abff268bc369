//! A small wrapper over the `etcdv3client` crate: exactly the calls the membership source and
//! the `register` sidecar make (range over a prefix with its revision, watch from a revision,
//! leases, put with a lease, delete), each bounded in time, with failover over the endpoints
//! of an `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` URL ([`MembershipUrl`]).
//!
//! A client is bound to one endpoint; on failure the caller drops it and connects again with
//! [`Etcd::connect`] starting at the next endpoint (the source and the sidecar do that with
//! a backoff). A compacted start revision is reported as [`EtcdError::Compacted`], so the
//! caller reads the prefix afresh instead of missing events.
//!
//! TLS and login come from [`EtcdSecurity`] (`security.rs`), read afresh on every connect.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use etcdv3client::grpc::{CredentialInterceptor, TonicClient};
use etcdv3client::{pb, EtcdClient};
use futures_util::StreamExt;

use super::security::{Credentials, EtcdSecurity, Given};

/// How long one request (not a watch) may take before the endpoint counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The `--membership` URL cannot be used.
    #[error("invalid membership URL {url:?}: {why} (expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX, e.g. etcd://127.0.0.1:2379/shardproxy/pool-a)")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// No endpoint could be connected to.
    #[error("cannot reach etcd at {endpoints}: {why}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        why: String,
    },
    /// A request failed (the endpoint is to be counted as failed).
    #[error("etcd {op} failed: {why}")]
    Request {
        /// What was asked.
        op: &'static str,
        /// The error.
        why: String,
    },
    /// A request did not answer within [`REQUEST_TIMEOUT`].
    #[error("etcd {0} timed out")]
    Timeout(&'static str),
    /// The watch's start revision has been compacted: read the prefix afresh.
    #[error("revision compacted (oldest kept: {0}); a fresh read is needed")]
    Compacted(i64),
    /// etcd cancelled the watch.
    #[error("etcd cancelled the watch: {0}")]
    WatchCanceled(String),
    /// The watch stream ended (the connection closed).
    #[error("the watch stream ended")]
    WatchEnded,
    /// A TLS or authentication setting cannot be used (a missing file, no PEM in it, a
    /// certificate without its key, ...).
    #[error("{field}: {why}")]
    Security {
        /// The flag that is wrong (`--etcd-ca`, `--etcd-password-file`, ...).
        field: &'static str,
        /// What is wrong and how to fix it.
        why: String,
    },
}

/// A parsed `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipUrl {
    /// `HOST:PORT` of each endpoint, in the order given (tried in turn).
    pub endpoints: Vec<String>,
    /// The key prefix, starting with `/`, without a trailing slash.
    pub prefix: String,
}

impl MembershipUrl {
    /// The prefix under which one key per backend lives: `PREFIX/backends/`.
    pub fn backends_prefix(&self) -> String {
        format!("{}/backends/", self.prefix)
    }

    /// The key of backend `name`: `PREFIX/backends/NAME`.
    pub fn backend_key(&self, name: &str) -> String {
        format!("{}{name}", self.backends_prefix())
    }
}

impl fmt::Display for MembershipUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

impl FromStr for MembershipUrl {
    type Err = EtcdError;

    fn from_str(url: &str) -> Result<Self, EtcdError> {
        let bad = |why: &str| EtcdError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("the scheme must be etcd://"))?;
        let (hosts, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => return Err(bad("no /PREFIX after the endpoints")),
        };
        if hosts.is_empty() {
            return Err(bad("no endpoint: give HOST:PORT after etcd://"));
        }
        let mut endpoints = Vec::new();
        for ep in hosts.split(',') {
            let (host, port) = ep
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("endpoint {ep:?} has no :PORT")))?;
            let host_ok = !host.is_empty()
                && (host.starts_with('[') && host.ends_with(']')
                    || host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
            if !host_ok {
                return Err(bad(&format!("endpoint {ep:?}: invalid host")));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(bad(&format!("endpoint {ep:?}: invalid port {port:?}"))),
            }
            endpoints.push(ep.to_string());
        }
        if path.len() < 2 {
            return Err(bad(
                "the prefix is empty: give /PREFIX, e.g. /shardproxy/pool-a",
            ));
        }
        if path.ends_with('/') {
            return Err(bad("the prefix must not end with '/'"));
        }
        if path.contains("//") {
            return Err(bad("the prefix has an empty segment ('//')"));
        }
        if path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | ','))
        {
            return Err(bad(
                "the prefix must not contain spaces, control characters, '?', '#' or ','",
            ));
        }
        Ok(MembershipUrl {
            endpoints,
            prefix: path.to_string(),
        })
    }
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` was set to `value`.
    Put {
        /// The key (UTF-8, lossy).
        key: String,
        /// The raw value.
        value: Vec<u8>,
    },
    /// `key` was deleted (or its lease expired).
    Delete {
        /// The key (UTF-8, lossy).
        key: String,
    },
}

/// A client bound to one endpoint.
pub struct Etcd {
    client: EtcdClient,
    endpoint: String,
    given: Given,
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Bounds `fut` by [`REQUEST_TIMEOUT`] and maps its error.
async fn bounded<T>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, etcdv3client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(request_error(op, &e)),
        Err(_) => Err(EtcdError::Timeout(op)),
    }
}

fn request_error(op: &'static str, e: &etcdv3client::Error) -> EtcdError {
    use etcdv3client::ErrKind;
    let why = match e.kind() {
        ErrKind::Compacted => return EtcdError::Compacted(0),
        ErrKind::UserEmpty => "etcd has authentication enabled and no user was given: give \
                               --etcd-user and --etcd-password-file"
            .to_string(),
        ErrKind::PermissionDenied => format!(
            "permission denied: the user's role needs read (run) or readwrite (register) \
             permission on every key under PREFIX/backends/ ({e})"
        ),
        _ => e.to_string(),
    };
    EtcdError::Request { op, why }
}

impl Etcd {
    /// Connects to the first endpoint of `url` that answers, trying them in turn from index
    /// `start` (wrapping); returns the client and the index of the endpoint it is bound to.
    /// Each attempt is bounded by `timeout`.
    /// The files of `security` are read afresh (rotation is picked up); an unusable one is
    /// [`EtcdError::Security`], and a refused login ends the attempt at that endpoint.
    pub async fn connect(
        url: &MembershipUrl,
        security: &EtcdSecurity,
        start: usize,
        timeout: Duration,
    ) -> Result<(Self, usize), EtcdError> {
        let credentials = security.load()?;
        let given = Given {
            tls: security.tls(),
            client_certificate: security.cert_file.is_some(),
        };
        let n = url.endpoints.len();
        let mut last = String::from("no endpoint");
        for k in 0..n {
            let i = (start + k) % n;
            let ep = &url.endpoints[i];
            match Self::connect_one(ep, &credentials, timeout).await {
                Ok(client) => {
                    return Ok((
                        Etcd {
                            client,
                            endpoint: ep.clone(),
                            given,
                        },
                        i,
                    ))
                }
                Err(why) => last = format!("{ep}: {why}{}", given.hint(&why)),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: url.endpoints.join(","),
            why: last,
        })
    }

    async fn connect_one(
        ep: &str,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<EtcdClient, String> {
        let scheme = if credentials.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{ep}"))
            .map_err(|e| e.to_string())?;
        if let Some(tls) = &credentials.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS settings: {}", error_chain(&e)))?;
        }
        let endpoint = endpoint
            .connect_timeout(timeout)
            // A dead peer (no RST) is noticed by the keepalive, not by a hung watch.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(error_chain(&e)),
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        };
        let Some((user, password)) = &credentials.login else {
            return Ok(EtcdClient::with_service(CredentialInterceptor::new(
                None,
                None,
                TonicClient::new(channel),
            )));
        };
        // Log in once here, so a refused password fails the connect with a clear message
        // instead of every request; the interceptor then adds the token to each request and
        // logs in again when etcd says the token expired (simple tokens time out when idle).
        // (The RPC is called on the plain client: the crate's AuthClient future is not Send.)
        let mut plain = TonicClient::new(channel.clone());
        let login = plain.unary::<pb::AuthenticateRequest, pb::AuthenticateResponse>(
            tonic::Request::new(pb::AuthenticateRequest {
                name: user.clone(),
                password: password.clone(),
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Auth/Authenticate"),
        );
        let token = match tokio::time::timeout(timeout, login).await {
            Ok(Ok(resp)) => Some(
                tonic::metadata::AsciiMetadataValue::try_from(resp.into_inner().token)
                    .map_err(|e| format!("etcd returned an unusable token: {e}"))?,
            ),
            Ok(Err(e)) if e.is_auth_not_enabled() => {
                tracing::warn!(
                    endpoint = ep,
                    "etcd has authentication disabled: --etcd-user is not needed"
                );
                None
            }
            Ok(Err(e)) if e.kind() == etcdv3client::ErrKind::AuthFailed => {
                return Err(format!(
                    "etcd refused user {user:?}: wrong user name or password ({e})"
                ))
            }
            Ok(Err(e)) => return Err(format!("logging in as {user:?}: {e}")),
            Err(_) => {
                return Err(format!(
                    "logging in as {user:?}: no answer within {timeout:?}"
                ))
            }
        };
        Ok(EtcdClient::with_service(CredentialInterceptor::new(
            Some((user.clone(), password.clone())),
            token,
            TonicClient::new(channel),
        )))
    }

    /// The endpoint this client is bound to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every key under `prefix` with its value, and the store revision they were read at.
    pub async fn get_prefix(
        &mut self,
        prefix: &str,
    ) -> Result<(Vec<(String, Vec<u8>)>, i64), EtcdError> {
        let request = pb::RangeRequest::new(prefix).with_prefix();
        let resp = bounded("range", self.client.kv.range(request))
            .await
            .map_err(|e| self.given.explain(e))?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let kvs = resp
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
            .collect();
        Ok((kvs, revision))
    }

    /// Watches every key under `prefix` from `revision` (inclusive).
    pub async fn watch_prefix(&mut self, prefix: &str, revision: i64) -> Result<Watch, EtcdError> {
        let create = pb::WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: pb::RangeRequest::new(prefix).with_prefix().range_end,
            start_revision: revision,
            ..Default::default()
        };
        // The request stream stays open (pending) for the life of the watch.
        let requests = futures_util::stream::iter([pb::WatchRequest::from(create)])
            .chain(futures_util::stream::pending());
        let mut request = tonic::Request::new(requests);
        // As etcd's own clients do: a member that loses the leader (a partition) ends the
        // watch instead of leaving it silently stale, and the source moves to another one.
        request.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let inbound = bounded("watch", self.client.watch.watch(request))
            .await
            .map_err(|e| self.given.explain(e))?;
        Ok(Watch { inbound })
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant(&mut self, ttl: i64) -> Result<i64, EtcdError> {
        let resp = bounded("lease grant", self.client.lease.grant(ttl))
            .await
            .map_err(|e| self.given.explain(e))?;
        Ok(resp.id)
    }

    /// Opens a keep-alive stream for lease `id`.
    pub async fn keep_alive(&mut self, id: i64) -> Result<KeepAlive, EtcdError> {
        let inner = bounded("lease keep-alive", self.client.lease.keep_alive(id))
            .await
            .map_err(|e| self.given.explain(e))?;
        Ok(KeepAlive { inner })
    }

    /// Revokes lease `id` (its keys go with it).
    pub async fn revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        bounded("lease revoke", self.client.lease.revoke(id))
            .await
            .map_err(|e| self.given.explain(e))
    }

    /// Sets `key` to `value`, attached to `lease` (0: no lease).
    pub async fn put(&mut self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let request = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        };
        bounded("put", self.client.kv.put(request))
            .await
            .map_err(|e| self.given.explain(e))
            .map(drop)
    }

    /// Deletes `key`.
    pub async fn delete(&mut self, key: &str) -> Result<(), EtcdError> {
        let request = pb::DeleteRangeRequest::new(key);
        bounded("delete", self.client.kv.delete_range(request))
            .await
            .map(drop)
    }
}

/// The error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// An open watch.
pub struct Watch {
    inbound: tonic::codec::Streaming<pb::WatchResponse>,
}

impl Watch {
    /// The next batch of events and the revision it brings the store to. An empty batch is
    /// a created or progress notice. A compacted start revision, a cancelled watch or a
    /// closed stream end the watch with an error. Cancel-safe (tonic's `Streaming::message`
    /// keeps a partly read message in the stream), so it can be raced against a timer.
    pub async fn next(&mut self) -> Result<(Vec<WatchEvent>, i64), EtcdError> {
        let resp = match self.inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(EtcdError::WatchEnded),
            Err(status) => {
                let e = etcdv3client::Error::from(status);
                return Err(request_error("watch", &e));
            }
        };
        if resp.compact_revision != 0 {
            return Err(EtcdError::Compacted(resp.compact_revision));
        }
        if resp.canceled {
            return Err(EtcdError::WatchCanceled(resp.cancel_reason));
        }
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let events = resp
            .events
            .into_iter()
            .filter_map(|ev| {
                let kv = ev.kv?;
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                Some(if ev.r#type == pb::event::EventType::Delete as i32 {
                    WatchEvent::Delete { key }
                } else {
                    WatchEvent::Put {
                        key,
                        value: kv.value,
                    }
                })
            })
            .collect();
        Ok((events, revision))
    }
}

/// A lease keep-alive stream.
pub struct KeepAlive {
    inner: etcdv3client::LeaseKeepAliver,
}

impl KeepAlive {
    /// Refreshes the lease once; returns its remaining TTL in seconds (0: it has expired).
    pub async fn refresh(&mut self) -> Result<i64, EtcdError> {
        let inner = &mut self.inner;
        let fut = async move {
            inner.keep_alive().await?;
            inner.message().await
        };
        match bounded("lease keep-alive", fut).await? {
            Some(resp) => Ok(resp.ttl),
            None => Err(EtcdError::Request {
                op: "lease keep-alive",
                why: "the stream closed".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls_parse() {
        let u: MembershipUrl = "etcd://127.0.0.1:2379/shardproxy/pool-a".parse().unwrap();
        assert_eq!(u.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(u.prefix, "/shardproxy/pool-a");
        assert_eq!(u.backend_key("b1"), "/shardproxy/pool-a/backends/b1");
        assert_eq!(u.to_string(), "etcd://127.0.0.1:2379/shardproxy/pool-a");
        let u: MembershipUrl = "etcd://a:1,etcd-2.local:2379,[::1]:2379/p".parse().unwrap();
        assert_eq!(u.endpoints, ["a:1", "etcd-2.local:2379", "[::1]:2379"]);
        assert_eq!(u.prefix, "/p");
        assert_eq!(u.to_string(), "etcd://a:1,etcd-2.local:2379,[::1]:2379/p");
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, why) in [
            ("http://127.0.0.1:2379/p", "scheme must be etcd://"),
            ("etcd://127.0.0.1:2379", "no /PREFIX"),
            ("etcd:///p", "no endpoint"),
            ("etcd://127.0.0.1/p", "has no :PORT"),
            ("etcd://127.0.0.1:0/p", "invalid port"),
            ("etcd://127.0.0.1:99999/p", "invalid port"),
            ("etcd://127.0.0.1:x/p", "invalid port"),
            ("etcd://a:1,,b:2/p", "endpoint \"\" has no :PORT"),
            ("etcd://a b:1/p", "invalid host"),
            ("etcd://127.0.0.1:2379/", "prefix is empty"),
            ("etcd://127.0.0.1:2379/p/", "must not end with '/'"),
            ("etcd://127.0.0.1:2379/a//b", "empty segment"),
            ("etcd://127.0.0.1:2379/a b", "must not contain spaces"),
        ] {
            let e = url.parse::<MembershipUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(e.contains("expected etcd://HOST:PORT"), "{url}: {e}");
        }
    }
}
