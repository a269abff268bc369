//! How a client secures its connections to etcd ([`EtcdSecurity`]): TLS (the CA that signed
//! the members' certificates, and optionally a client certificate for an etcd started with
//! `--client-cert-auth`) and user/password authentication (etcd's `auth enable`).
//!
//! The files are read again on every connect (`EtcdSecurity::load` from
//! [`super::etcd::Etcd::connect`]), so certificates and passwords rotated on disk are picked
//! up at the next reconnect without a restart; [`EtcdSecurity::check`] reads them once at
//! start, so a bad file is an exit-2 message naming its flag. `Given` turns a failure the
//! settings explain (plain text against TLS, no client certificate) into one with a hint.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::etcd::EtcdError;

/// How a client secures its connections to etcd: TLS and user/password, both optional.
/// Without a CA the endpoints are spoken to in plain HTTP/2 (`http://`); with one, in TLS
/// (`https://`), each member's certificate checked against that CA and the endpoint's host
/// name or IP address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// PEM file with the CA certificate(s) that signed the etcd members' server certificates
    /// (`--etcd-ca`); setting it turns TLS on.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for an etcd started with `--client-cert-auth` (`--etcd-cert`;
    /// needs `key_file` and `ca_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (`--etcd-key`).
    pub key_file: Option<PathBuf>,
    /// etcd user name, for an etcd with authentication enabled (`--etcd-user`; needs
    /// `password_file`).
    pub user: Option<String>,
    /// File whose first line is the user's password (`--etcd-password-file`); a file, not a
    /// flag, so the password shows up in no process listing.
    pub password_file: Option<PathBuf>,
}

/// What [`EtcdSecurity`] resolves to on one connect: the files read.
pub(super) struct Credentials {
    /// TLS settings (`None`: plain text).
    pub(super) tls: Option<ClientTlsConfig>,
    /// User name and password.
    pub(super) login: Option<(String, String)>,
}

impl EtcdSecurity {
    /// Whether connections use TLS.
    pub fn tls(&self) -> bool {
        self.ca_file.is_some()
    }

    /// Checks the settings and reads every file once: the start-up check, so a mistake is a
    /// message naming the flag and the file before anything runs.
    pub fn check(&self) -> Result<(), EtcdError> {
        self.load().map(drop)
    }

    /// A warning worth logging about these settings (a password sent in clear text; etcd
    /// allows it).
    pub fn warning(&self) -> Option<&'static str> {
        (self.user.is_some() && !self.tls()).then_some(
            "the etcd password and token travel in clear text: give --etcd-ca to use TLS",
        )
    }

    /// Checks the settings and reads the files: what one connect uses.
    pub(super) fn load(&self) -> Result<Credentials, EtcdError> {
        let bad = |field, why: String| EtcdError::Security { field, why };
        let tls = match (&self.ca_file, &self.cert_file, &self.key_file) {
            (None, None, None) => None,
            (None, _, _) => {
                return Err(bad(
                    "--etcd-cert",
                    "a client certificate needs TLS: give --etcd-ca too (the CA of the etcd \
                     members' certificates)"
                        .into(),
                ))
            }
            (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {
                return Err(bad(
                    "--etcd-key",
                    "--etcd-cert and --etcd-key go together (the client certificate and its \
                     private key)"
                        .into(),
                ))
            }
            (Some(ca), cert, key) => {
                let ca_pem = read_pem(ca, "--etcd-ca", PemKind::Certificates)?;
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
                if let (Some(cert), Some(key)) = (cert, key) {
                    let cert_pem = read_pem(cert, "--etcd-cert", PemKind::Certificates)?;
                    let key_pem = read_pem(key, "--etcd-key", PemKind::PrivateKey)?;
                    tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
                }
                Some(tls)
            }
        };
        let login = match (&self.user, &self.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                if user.is_empty() || user.chars().any(char::is_control) {
                    return Err(bad("--etcd-user", format!("{user:?} is not a user name")));
                }
                Some((user.clone(), read_password(file)?))
            }
            (Some(_), None) => {
                return Err(bad(
                    "--etcd-password-file",
                    "--etcd-user needs --etcd-password-file (a file whose first line is the \
                     password)"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "--etcd-user",
                    "--etcd-password-file needs --etcd-user (whose password it holds)".into(),
                ))
            }
        };
        Ok(Credentials { tls, login })
    }
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum PemKind {
    Certificates,
    PrivateKey,
}

/// Reads `path` and checks it holds at least one certificate, or a private key.
fn read_pem(path: &Path, field: &'static str, kind: PemKind) -> Result<Vec<u8>, EtcdError> {
    let bad = |why: String| EtcdError::Security { field, why };
    let pem =
        std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let ok = match kind {
        PemKind::Certificates => {
            let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
            certs.map(|c| !c.is_empty())
        }
        PemKind::PrivateKey => {
            rustls_pemfile::private_key(&mut pem.as_slice()).map(|k| k.is_some())
        }
    };
    match ok {
        Ok(true) => Ok(pem),
        Ok(false) => Err(bad(format!(
            "{} holds no PEM {}",
            path.display(),
            match kind {
                PemKind::Certificates => "certificate (-----BEGIN CERTIFICATE-----)",
                PemKind::PrivateKey => "private key (-----BEGIN PRIVATE KEY-----, RSA or EC)",
            }
        ))),
        Err(e) => Err(bad(format!("{}: malformed PEM: {e}", path.display()))),
    }
}

/// The password: the file's first line without its line ending (spaces are kept: they may
/// be part of it).
fn read_password(path: &Path) -> Result<String, EtcdError> {
    let bad = |why: String| EtcdError::Security {
        field: "--etcd-password-file",
        why,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(bad(format!(
            "{}: the first line (the password) is empty",
            path.display()
        )));
    }
    Ok(password.to_string())
}

/// What a client was given, to explain a failure the server causes (copied out of [`Etcd`]
/// so a request can borrow the client mutably).
#[derive(Debug, Clone, Copy)]
pub(super) struct Given {
    /// TLS is on.
    pub(super) tls: bool,
    /// A client certificate is given.
    pub(super) client_certificate: bool,
}

impl Given {
    /// A hint for a failure that reached the server (the TCP connect worked: a refused or
    /// timed-out connect is an outage, not a setting) and that the settings may explain.
    /// A server asking for a client certificate can show up as its TLS alert or, when the
    /// close overtakes the alert, as a reset: any such failure gets the hint, worded as a
    /// condition.
    pub(super) fn hint(self, why: &str) -> &'static str {
        let reached = why.contains("transport error") && !why.contains("tcp connect error");
        let refused_certificate = why.contains("BadCertificate")
            || why.contains("CertificateRequired")
            || why.contains("certificate required");
        if !self.tls && reached {
            " (if etcd serves its clients over TLS, give --etcd-ca)"
        } else if self.tls && !self.client_certificate && (reached || refused_certificate) {
            " (if etcd asks for a client certificate, give --etcd-cert and --etcd-key)"
        } else {
            ""
        }
    }

    /// `e` with [`Self::hint`] added to a request's failure.
    pub(super) fn explain(self, e: EtcdError) -> EtcdError {
        match e {
            EtcdError::Request { op, why } => {
                let hint = self.hint(&why);
                EtcdError::Request {
                    op,
                    why: why + hint,
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_settings_are_checked_and_errors_name_the_flag() {
        let dir =
            std::env::temp_dir().join(format!("shardproxy-etcd-security-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            Some(p)
        };
        // PEM framing is what is checked here; the TLS tests against etcd use real ones.
        let cert = write(
            "c.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let key = write(
            "k.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let not_pem = write("n.pem", "hello\n");
        let pw = write("pw", "s3cret with a space\nsecond line\n");
        let blank = write("blank", "\n");
        let missing = Some(dir.join("missing.pem"));
        let s = |ca: &Option<PathBuf>,
                 c: &Option<PathBuf>,
                 k: &Option<PathBuf>,
                 u: Option<&str>,
                 p: &Option<PathBuf>| {
            EtcdSecurity {
                ca_file: ca.clone(),
                cert_file: c.clone(),
                key_file: k.clone(),
                user: u.map(str::to_string),
                password_file: p.clone(),
            }
        };
        let none = None;
        for ok in [
            EtcdSecurity::default(),
            s(&cert, &none, &none, None, &none),
            s(&cert, &cert, &key, None, &none),
            s(&cert, &cert, &key, Some("proxy"), &pw),
            s(&none, &none, &none, Some("proxy"), &pw),
        ] {
            ok.check().unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        assert!(
            s(&none, &none, &none, Some("u"), &pw).warning().is_some(),
            "password in clear text"
        );
        assert!(s(&cert, &none, &none, Some("u"), &pw).warning().is_none());
        let login = s(&none, &none, &none, Some("proxy"), &pw)
            .load()
            .unwrap()
            .login;
        assert_eq!(login, Some(("proxy".into(), "s3cret with a space".into())));
        for (bad, field, says) in [
            (
                s(&missing, &none, &none, None, &none),
                "--etcd-ca",
                "cannot read",
            ),
            (
                s(&not_pem, &none, &none, None, &none),
                "--etcd-ca",
                "holds no PEM certificate",
            ),
            (
                s(&none, &cert, &key, None, &none),
                "--etcd-cert",
                "give --etcd-ca",
            ),
            (
                s(&cert, &cert, &none, None, &none),
                "--etcd-key",
                "go together",
            ),
            (
                s(&cert, &none, &key, None, &none),
                "--etcd-key",
                "go together",
            ),
            (
                s(&cert, &key, &key, None, &none),
                "--etcd-cert",
                "holds no PEM certificate",
            ),
            (
                s(&cert, &cert, &cert, None, &none),
                "--etcd-key",
                "holds no PEM private key",
            ),
            (
                s(&none, &none, &none, Some("u"), &none),
                "--etcd-password-file",
                "needs --etcd-password-file",
            ),
            (
                s(&none, &none, &none, None, &pw),
                "--etcd-user",
                "needs --etcd-user",
            ),
            (
                s(&none, &none, &none, Some(""), &pw),
                "--etcd-user",
                "not a user name",
            ),
            (
                s(&none, &none, &none, Some("u"), &blank),
                "--etcd-password-file",
                "is empty",
            ),
            (
                s(&none, &none, &none, Some("u"), &missing),
                "--etcd-password-file",
                "cannot read",
            ),
        ] {
            match bad.check() {
                Err(EtcdError::Security { field: f, why }) => {
                    assert_eq!(f, field, "{bad:?}: {why}");
                    assert!(why.contains(says), "{bad:?}: {why}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failures_the_settings_explain_get_a_hint() {
        let request = |why: &str| EtcdError::Request {
            op: "range",
            why: why.into(),
        };
        let reset = "[Grpc] transport error: Connection reset by peer";
        let alert = "transport error: received fatal alert: BadCertificate";
        let refused = "transport error: tcp connect error: Connection refused";
        let given = |tls, client_certificate| Given {
            tls,
            client_certificate,
        };
        let (plain, tls, mutual) = (given(false, false), given(true, false), given(true, true));
        let text = |g: Given, why: &str| g.explain(request(why)).to_string();
        assert!(text(plain, reset).ends_with("give --etcd-ca)"));
        for why in [reset, alert] {
            assert!(
                text(tls, why).contains("give --etcd-cert and --etcd-key"),
                "{why}"
            );
            assert!(!text(mutual, why).contains("give"), "{why}");
        }
        // An outage (the TCP connect failed) is not a setting.
        for g in [plain, tls, mutual] {
            assert_eq!(g.hint(refused), "");
        }
        assert!(matches!(
            plain.explain(EtcdError::WatchEnded),
            EtcdError::WatchEnded
        ));
    }
}
