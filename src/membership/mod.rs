//! Membership from etcd (issue 10): the backend set read from and watched in an etcd
//! prefix instead of flags, the config file or the admin API.
//!
//! - [`etcd`]: a small client wrapper (range, watch, leases) and the
//!   `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` URL.
//! - [`source`]: the proxy's membership task (start-up read or cache, watch, debounce,
//!   reconnect and resync, cache file, metrics) feeding the control plane.
//! - [`security`]: TLS, client certificates and user/password login towards etcd.
//! - [`register`]: the `shardproxy register` sidecar that keeps one backend's key on a
//!   lease while a local TCP check passes.
//!
//! Layout in etcd: one key per backend, `PREFIX/backends/NAME`, whose value is the admin
//! API's PUT body, `{"addr":"HOST:PORT","weight":N}` (weight 0 drains it).

pub mod etcd;
pub mod register;
pub mod security;
pub mod source;

pub use etcd::{EtcdError, MembershipUrl};
pub use security::EtcdSecurity;
pub use source::MembershipStatus;
