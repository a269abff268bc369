//! Test certificates, made with `rcgen` at run time (no openssl needed): a CA, a server
//! certificate for `127.0.0.1`/`localhost` and a client certificate both signed by it, and a
//! second CA that signed nothing here (a client trusting only it must refuse the server).
//! Written as PEM files into a directory the caller owns.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of a test PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// The server's certificate (SANs 127.0.0.1, localhost) and key.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate (CN `shardproxy-test-client`) and key.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
    /// A CA unrelated to the certificates above.
    pub other_ca: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A self-signed CA certificate and its key.
fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("generate a CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (cert, key)
}

/// A leaf certificate for `names` with `usage`, signed by `issuer`.
fn leaf(
    cn: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, KeyPair),
) -> (String, String) {
    let key = KeyPair::generate().expect("generate a key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params
        .signed_by(&key, &issuer.0, &issuer.1)
        .expect("sign the certificate");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Generates the PKI into `dir` (which must exist).
    pub fn generate(dir: &Path) -> Pki {
        let root = ca("shardproxy test CA");
        let (server_cert, server_key) = leaf(
            "etcd",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &root,
        );
        let (client_cert, client_key) = leaf(
            "shardproxy-test-client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            &root,
        );
        let other = ca("an unrelated CA");
        Pki {
            ca: write(dir, "ca.pem", &root.0.pem()),
            server_cert: write(dir, "server.pem", &server_cert),
            server_key: write(dir, "server-key.pem", &server_key),
            client_cert: write(dir, "client.pem", &client_cert),
            client_key: write(dir, "client-key.pem", &client_key),
            other_ca: write(dir, "other-ca.pem", &other.0.pem()),
        }
    }
}
