//! The cluster PKI: a development CA, host certificates signed by it, and the mutual-TLS configurations
//! of the replication link.
//!
//! Every ax host has one certificate, valid for both TLS server and client authentication, whose
//! subject alternative name is the host name. A link endpoint trusts exactly one CA (the cluster CA) and
//! requires the peer to present a certificate chained to it: a peer without one is refused during the
//! handshake. `ax-agent certs` writes a development CA and host certificates; production clusters bring
//! their own CA and point the agent at its files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol id of the replication link.
pub const ALPN: &[u8] = b"ax-replication/1";

/// PKI errors; each names the file or the step.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Generating a key or certificate failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    /// quinn refused the crypto configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
    /// A host name is unusable.
    #[error("host name {0:?}: use letters, digits, '-' and '.' only (1-63 characters)")]
    HostName(String),
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Generate {
        what: what.to_owned(),
        source,
    }
}

/// Checks a host name is usable as a certificate name and a file name.
pub fn check_host_name(name: &str) -> Result<(), CertError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(CertError::HostName(name.to_owned()))
    }
}

/// A CA in PEM form.
#[derive(Debug, Clone)]
pub struct CaPem {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// A host certificate and key in PEM form.
#[derive(Debug, Clone)]
pub struct HostPem {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

/// Makes a new development CA.
pub fn make_ca(name: &str) -> Result<CaPem, CertError> {
    let key = KeyPair::generate().map_err(gen_err("the CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA params"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(gen_err("the CA certificate"))?;
    Ok(CaPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues a certificate for `host`, signed by `ca`, good for TLS server and client authentication.
pub fn issue_host(ca: &CaPem, host: &str) -> Result<HostPem, CertError> {
    check_host_name(host)?;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(gen_err("the CA key (parse)"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(gen_err("the CA certificate (parse)"))?;
    let key = KeyPair::generate().map_err(gen_err("a host key"))?;
    let mut params =
        CertificateParams::new(vec![host.to_owned()]).map_err(gen_err("host params"))?;
    params.distinguished_name.push(DnType::CommonName, host);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(gen_err("the host certificate"))?;
    Ok(HostPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn write_file(path: &Path, data: &str, secret: bool) -> Result<(), CertError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Paths of one host's files in a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The host certificate.
    pub cert: PathBuf,
    /// The host key.
    pub key: PathBuf,
}

impl PkiPaths {
    /// The files of `host` in `dir` (as `ax-agent certs` writes them).
    pub fn in_dir(dir: &Path, host: &str) -> Self {
        PkiPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{host}.pem")),
            key: dir.join(format!("{host}-key.pem")),
        }
    }
}

/// Writes a development PKI into `dir`: `ca.pem`, `ca-key.pem`, and `<host>.pem` + `<host>-key.pem` for
/// every host (keys mode 0600). An existing CA in `dir` is reused, so hosts can be added later.
pub fn write_dev_pki(dir: &Path, hosts: &[String]) -> Result<CaPem, CertError> {
    for h in hosts {
        check_host_name(h)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let (ca_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca = if ca_path.exists() && ca_key_path.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CertError::Io {
                path: p.to_owned(),
                source,
            })
        };
        CaPem {
            cert: read(&ca_path)?,
            key: read(&ca_key_path)?,
        }
    } else {
        let ca = make_ca("ax development CA")?;
        write_file(&ca_path, &ca.cert, false)?;
        write_file(&ca_key_path, &ca.key, true)?;
        ca
    };
    for h in hosts {
        let host = issue_host(&ca, h)?;
        let p = PkiPaths::in_dir(dir, h);
        write_file(&p.cert, &host.cert, false)?;
        write_file(&p.key, &host.key, true)?;
    }
    Ok(ca)
}

/// A host's TLS identity and the CA it trusts.
#[derive(Debug)]
pub struct TlsIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn certs_from_pem(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_owned(),
            what: format!("bad certificate PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_owned(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

impl TlsIdentity {
    /// From PEM strings (`what` names them in errors).
    pub fn from_pem(ca: &str, cert: &str, key: &str, what: &Path) -> Result<Self, CertError> {
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| CertError::Pem {
            path: what.to_owned(),
            what: format!("bad private key PEM: {e}"),
        })?;
        Ok(TlsIdentity {
            ca: certs_from_pem(ca, what)?,
            chain: certs_from_pem(cert, what)?,
            key,
        })
    }

    /// From the files of a PKI directory.
    pub fn load(paths: &PkiPaths) -> Result<Self, CertError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CertError::Io {
                path: p.to_owned(),
                source,
            })
        };
        let key = read(&paths.key)?;
        let key_der =
            PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| CertError::Pem {
                path: paths.key.clone(),
                what: format!("bad private key PEM: {e}"),
            })?;
        Ok(TlsIdentity {
            ca: certs_from_pem(&read(&paths.ca)?, &paths.ca)?,
            chain: certs_from_pem(&read(&paths.cert)?, &paths.cert)?,
            key: key_der,
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, CertError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// ring's provider with AES-128-GCM preferred: rustls lists AES-256-GCM first, and on the
    /// replication link (QUIC: every datagram sealed and opened in user space) the 10 AES rounds of
    /// AES-128 instead of 14 cut the crypto share of its CPU (see docs/DESIGN.md, "Replication
    /// link"). Both ends are ax nodes using this provider, so AES-128-GCM is what they negotiate; the
    /// other TLS 1.3 suites stay available after it.
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        Arc::new(p)
    }

    /// rustls server configuration: TLS 1.3, our certificate, client certificates required and chained to
    /// the cluster CA.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, CertError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .build()
        .map_err(|e| CertError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// rustls server configuration of the agent's HTTPS API: TLS 1.3, our certificate, HTTP/1.1; no
    /// client certificate (clients authenticate with the bearer token).
    pub fn https_server(&self) -> Result<rustls::ServerConfig, CertError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![HTTPS_ALPN.to_vec()];
        Ok(cfg)
    }

    /// rustls client configuration for peers' HTTPS APIs: servers chained to the cluster CA.
    pub fn https_client(&self) -> Result<rustls::ClientConfig, CertError> {
        https_client_with(self.roots()?)
    }

    /// rustls client configuration: TLS 1.3, server chained to the cluster CA, our certificate presented.
    pub fn rustls_client(&self) -> Result<rustls::ClientConfig, CertError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// ALPN of the HTTPS API.
pub const HTTPS_ALPN: &[u8] = b"http/1.1";

fn https_client_with(roots: Arc<rustls::RootCertStore>) -> Result<rustls::ClientConfig, CertError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![HTTPS_ALPN.to_vec()];
    Ok(cfg)
}

/// rustls client configuration for an agent's HTTPS API, trusting the CA certificates in the PEM file
/// `ca` (the cluster CA, `ca.pem` of `ax-agent certs`).
pub fn https_client_from_ca(ca: &Path) -> Result<rustls::ClientConfig, CertError> {
    let pem = std::fs::read_to_string(ca).map_err(|source| CertError::Io {
        path: ca.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_from_pem(&pem, ca)? {
        roots.add(c)?;
    }
    https_client_with(Arc::new(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        for ok in ["host-a", "a", "node1.example"] {
            check_host_name(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a b", "a/b", &"x".repeat(64)] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
        }
    }

    /// Two cluster hosts, each with this module's configurations, settle on AES-128-GCM (a real
    /// TLS 1.3 handshake, in memory).
    #[test]
    fn mutual_tls_negotiates_aes_128_gcm() {
        let ca = make_ca("test-ca").unwrap();
        let id = |host: &str| {
            let h = issue_host(&ca, host).unwrap();
            TlsIdentity::from_pem(&ca.cert, &h.cert, &h.key, Path::new(host)).unwrap()
        };
        let mut server = rustls::Connection::Server(
            rustls::ServerConnection::new(Arc::new(id("host-b").rustls_server().unwrap())).unwrap(),
        );
        let name = rustls::pki_types::ServerName::try_from("host-b").unwrap();
        let mut client = rustls::Connection::Client(
            rustls::ClientConnection::new(Arc::new(id("host-a").rustls_client().unwrap()), name)
                .unwrap(),
        );
        // Moves what `from` has to send into `to`.
        fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
            let mut wire = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                to.read_tls(&mut rd).unwrap();
            }
            to.process_new_packets().unwrap();
        }
        for _ in 0..8 {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[test]
    fn dev_pki_round_trips_through_files() {
        let dir = std::env::temp_dir().join(format!("ax-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hosts = vec!["host-a".to_owned(), "host-b".to_owned()];
        write_dev_pki(&dir, &hosts).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("host-a-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let id = TlsIdentity::load(&PkiPaths::in_dir(&dir, "host-a")).unwrap();
        id.rustls_server().unwrap();
        id.rustls_client().unwrap();
        // Adding a host later keeps the CA.
        let ca_before = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        write_dev_pki(&dir, &["host-c".to_owned()]).unwrap();
        assert_eq!(
            ca_before,
            std::fs::read_to_string(dir.join("ca.pem")).unwrap()
        );
        let err = TlsIdentity::load(&PkiPaths::in_dir(&dir, "nope")).unwrap_err();
        assert!(err.to_string().contains("nope-key.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
