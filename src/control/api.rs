//! The admin API: the membership as JSON, and its changes (README.md, "Operating", has the curl
//! examples). Served by the admin listener (`crate::admin`) next to `/metrics`.
//!
//! - `GET /backends` → `[{"name","addr","weight","state","active_connections", ...}]`
//! - `PUT /backends/{name}` with `{"addr":"HOST:PORT","weight":N}` (optional
//!   `max_connections`, `agent`, `proxy_protocol`) adds or changes one: 201 or 200.
//! - `DELETE /backends/{name}`; `POST /backends/{name}/drain` and `/undrain`.
//! - `GET /route/{key}` (`?hex=1` for a hex-encoded binary key) →
//!   `{"key":...,"ranking":["b2","b1",...]}` from the live table, health and drains applied.
//!
//! - `GET /membership` → `{"source":"local"}`, or with `--membership`
//!   `{"source":"etcd","url":...,"connected":true,"revision":N,"backends":K}`.
//!
//! With `--membership` the membership is etcd's: the mutating routes answer 409 naming the
//! key to change there, `GET /backends` entries say `"source":"etcd"` and the answer carries
//! `x-membership-revision: N` (the etcd revision in force).
//!
//! A change is validated, then swapped in whole; a refused one answers 4xx with the reason
//! and the table stays. With a token (`--admin-token-file`) the mutating routes need
//! `Authorization: Bearer <token>` (401 otherwise, compared in constant time); reads stay
//! open, like `/metrics`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{BackendBody, BackendView, Control, ControlError};

/// Largest request body accepted (a backend's JSON is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct Api {
    control: Arc<Control>,
    token: Option<Arc<str>>,
}

/// The API routes over `control`; mutations need `token` when one is given.
pub(crate) fn routes(control: Arc<Control>, token: Option<String>) -> Router {
    let api = Api {
        control,
        token: token.map(Arc::from),
    };
    Router::new()
        .route("/backends", get(list))
        .route("/backends/{name}", put(upsert).delete(remove))
        .route("/backends/{name}/drain", post(drain))
        .route("/backends/{name}/undrain", post(undrain))
        .route("/route/{key}", get(route))
        .route("/membership", get(membership))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// A JSON error answer: `{"error": why}`.
fn error(status: StatusCode, why: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": why.to_string() }))).into_response()
}

impl Api {
    /// `Err` with the 401 answer unless the request carries the token.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "this route changes the membership: send Authorization: Bearer <token>",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Err(Box::new(r))
        }
    }

    /// `Err` with the 409 answer when the membership comes from etcd (changed there only).
    fn local_only(&self, name: &str) -> Result<(), Box<Response>> {
        let Some(m) = self.control.membership() else {
            return Ok(());
        };
        self.control.shared.metrics.admin_change(false);
        Err(Box::new(error(
            StatusCode::CONFLICT,
            format!(
                "the membership comes from etcd ({}): change {} there",
                m.url(),
                m.url().backend_key(name)
            ),
        )))
    }

    /// The answer to a change: the new generation, or the refusal (counted either way).
    fn changed(&self, result: Result<u64, ControlError>, created: bool) -> Response {
        self.control.shared.metrics.admin_change(result.is_ok());
        match result {
            Ok(generation) => (
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                Json(json!({ "generation": generation, "backends": self.view() })),
            )
                .into_response(),
            Err(e @ ControlError::NotFound(_)) => error(StatusCode::NOT_FOUND, e),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        }
    }

    fn view(&self) -> Value {
        let source = if self.control.membership().is_some() {
            "etcd"
        } else {
            "local"
        };
        Value::Array(
            self.control
                .backends()
                .iter()
                .map(|b| backend_json(b, source))
                .collect(),
        )
    }
}

fn backend_json(b: &BackendView, source: &str) -> Value {
    json!({
        "source": source,
        "name": b.spec.name,
        "addr": b.spec.addr.to_string(),
        "weight": b.spec.weight,
        "state": b.state,
        "active_connections": b.active_connections,
        "max_connections": b.spec.max_connections,
        "agent": b.spec.agent.map(|a| a.to_string()),
        "proxy_protocol": b.spec.proxy_protocol.map(|v| if v { "v2" } else { "none" }),
    })
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn list(State(api): State<Api>) -> Response {
    let mut r = Json(api.view()).into_response();
    if let Some(m) = api.control.membership() {
        r.headers_mut().insert(
            "x-membership-revision",
            header::HeaderValue::from(m.revision()),
        );
    }
    r
}

/// `GET /membership`: where the membership comes from, and (etcd) how it follows it.
async fn membership(State(api): State<Api>) -> Response {
    match api.control.membership() {
        Some(m) => Json(json!({
            "source": "etcd",
            "url": m.url().to_string(),
            "connected": m.connected(),
            "revision": m.revision(),
            "backends": api.control.backends().len(),
        })),
        None => Json(json!({ "source": "local" })),
    }
    .into_response()
}

async fn upsert(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<BackendBody>, JsonRejection>,
) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return *r;
    }
    if let Err(r) = api.local_only(&name) {
        return *r;
    }
    let spec = match body {
        Ok(Json(body)) => body.spec(name),
        Err(e) => Err(format!(
            "{} (expected {{\"addr\":\"HOST:PORT\",\"weight\":N}})",
            e.body_text()
        )),
    };
    let spec = match spec {
        Ok(s) => s,
        Err(why) => {
            api.control.shared.metrics.admin_change(false);
            return error(StatusCode::BAD_REQUEST, why);
        }
    };
    match api.control.put(spec) {
        Ok((generation, added)) => api.changed(Ok(generation), added),
        Err(e) => api.changed(Err(e), false),
    }
}

async fn remove(State(api): State<Api>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return *r;
    }
    if let Err(r) = api.local_only(&name) {
        return *r;
    }
    api.changed(api.control.delete(&name), false)
}

async fn drain(State(api): State<Api>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return *r;
    }
    if let Err(r) = api.local_only(&name) {
        return *r;
    }
    api.changed(api.control.set_draining(&name, true), false)
}

async fn undrain(State(api): State<Api>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = api.authorize(&headers) {
        return *r;
    }
    if let Err(r) = api.local_only(&name) {
        return *r;
    }
    api.changed(api.control.set_draining(&name, false), false)
}

async fn route(State(api): State<Api>, Path(key): Path<String>, RawQuery(q): RawQuery) -> Response {
    let hex = q
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .any(|kv| matches!(kv, "hex=1" | "hex=true" | "hex"));
    let bytes = match crate::cli::decode_key(&key, hex) {
        Ok(b) if !b.is_empty() => b,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the key is empty"),
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let table = api.control.table();
    Json(json!({
        "key": key,
        "hex": hex,
        "ranking": api.control.route(&bytes),
        "generation": table.generation,
        "panic": table.in_panic(),
        "max_tries": api.control.shared.config.load().effective_tries(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn put_bodies_become_specs_or_say_why() {
        let body: BackendBody =
            serde_json::from_str(r#"{"addr":"127.0.0.1:9001","weight":3}"#).unwrap();
        let spec = body.spec("b9".into()).unwrap();
        assert_eq!((spec.name.as_str(), spec.weight), ("b9", 3));
        assert_eq!(spec.addr, "127.0.0.1:9001".parse().unwrap());
        let body: BackendBody = serde_json::from_str(r#"{"addr":"127.0.0.1:9001"}"#).unwrap();
        assert_eq!(body.spec("x".into()).unwrap().weight, 1);
        assert!(serde_json::from_str::<BackendBody>(r#"{"addr":"1.2.3.4:1","wieght":2}"#).is_err());
        let body: BackendBody =
            serde_json::from_str(r#"{"addr":"127.0.0.1:9001","weight":1000001}"#).unwrap();
        assert!(body.spec("x".into()).unwrap_err().contains("out of range"));
        let body: BackendBody = serde_json::from_str(r#"{"addr":"nowhere"}"#).unwrap();
        assert!(body.spec("x".into()).is_err());
    }
}
