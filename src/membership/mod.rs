//! Membership from etcd (issue 10): the backend set read from and watched in an etcd
//! prefix instead of flags, the config file or the admin API.
//!
//! - [`etcd`]: a small client wrapper (range, watch, leases) and the
//!   `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` URL.
//!
//! Layout in etcd: one key per backend, `PREFIX/backends/NAME`, whose value is the admin
//! API's PUT body, `{"addr":"HOST:PORT","weight":N}` (weight 0 drains it).

pub mod etcd;

pub use etcd::{EtcdError, MembershipUrl};
