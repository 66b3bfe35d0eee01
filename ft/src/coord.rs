//! Where an FT node asks *who may release* a VM's output (protocol v2, docs/DESIGN.md §3.6): the
//! embedded witness over mutual TLS, or etcd. One type for both, so the node's driver does not care.
//!
//! The node asks only when the right changes hands (boot or restart in place, a primary going solo,
//! a secondary promoting): never in steady state.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use failover::coordinator::etcd::{EtcdConfig, EtcdCoordinator};
use failover::coordinator::witness::WitnessCoordinator;
use failover::coordinator::{CasOutcome, CasRequest, CoordError, Coordinator, Record};

use crate::certs::TlsIdentity;

/// How long one witness request may take (connect, handshake, answer) before it counts as
/// unanswered (the caller retries the same request).
pub const WITNESS_TIMEOUT: Duration = Duration::from_millis(500);

/// Which coordinator a node uses.
#[derive(Debug, Clone)]
pub enum CoordTarget {
    /// The embedded witness at `addr`, whose certificate is valid for `name`.
    Witness {
        /// Its address.
        addr: SocketAddr,
        /// The name its certificate is valid for.
        name: String,
    },
    /// An etcd v3 cluster.
    Etcd(EtcdConfig),
}

impl std::str::FromStr for CoordTarget {
    type Err = String;
    /// `ADDR` or `NAME@ADDR` (the witness; `NAME` defaults to `witness`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = s.split_once('@').unwrap_or(("witness", s));
        if name.is_empty() {
            return Err(format!("witness {s:?}: empty name before '@'"));
        }
        let addr = addr
            .parse::<SocketAddr>()
            .map_err(|e| format!("witness {s:?}: expected [NAME@]ADDR:PORT: {e}"))?;
        Ok(CoordTarget::Witness {
            addr,
            name: name.to_owned(),
        })
    }
}

impl CoordTarget {
    /// How long one compare-and-set may take in all before it counts as unanswered (the caller then
    /// asks again): the witness's request timeout with room to spare, or every etcd endpoint tried in
    /// turn (a blackholed member costs its whole timeout before the next is asked).
    pub fn request_limit(&self) -> Duration {
        match self {
            CoordTarget::Witness { .. } => WITNESS_TIMEOUT * 3,
            CoordTarget::Etcd(c) => c.timeout * (c.endpoints.len().max(1) as u32) + WITNESS_TIMEOUT,
        }
    }
}

impl std::fmt::Display for CoordTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoordTarget::Witness { addr, name } => write!(f, "witness {name}@{addr}"),
            CoordTarget::Etcd(c) => write!(f, "etcd {}", c.endpoints.join(",")),
        }
    }
}

/// [`CoordTarget`] as the daemon writes it for its workers (`worker.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordSpec {
    /// The embedded witness.
    Witness {
        /// Its address.
        addr: SocketAddr,
        /// The name its certificate is valid for.
        name: String,
    },
    /// etcd (see `[coordinator]` in the agent's configuration).
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// CA certificate (PEM).
        #[serde(default)]
        ca: Option<std::path::PathBuf>,
        /// Client certificate (PEM).
        #[serde(default)]
        cert: Option<std::path::PathBuf>,
        /// Client key (PEM).
        #[serde(default)]
        key: Option<std::path::PathBuf>,
        /// Key prefix of the generations.
        prefix: String,
        /// Per-request timeout, ms.
        timeout_ms: u64,
    },
}

impl CoordSpec {
    /// The etcd spec of a client configuration.
    pub fn etcd(cfg: &EtcdConfig) -> Self {
        CoordSpec::Etcd {
            endpoints: cfg.endpoints.clone(),
            ca: cfg.ca.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            prefix: cfg.prefix.clone(),
            timeout_ms: cfg.timeout.as_millis() as u64,
        }
    }

    /// The target it names.
    pub fn target(&self) -> CoordTarget {
        match self {
            CoordSpec::Witness { addr, name } => CoordTarget::Witness {
                addr: *addr,
                name: name.clone(),
            },
            CoordSpec::Etcd {
                endpoints,
                ca,
                cert,
                key,
                prefix,
                timeout_ms,
            } => CoordTarget::Etcd(EtcdConfig {
                endpoints: endpoints.clone(),
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                prefix: prefix.clone(),
                timeout: Duration::from_millis(*timeout_ms),
            }),
        }
    }
}

/// A coordinator client: the witness or etcd.
#[derive(Debug)]
pub enum AnyCoordinator {
    /// The embedded witness.
    Witness(Box<WitnessCoordinator>),
    /// etcd.
    Etcd(EtcdCoordinator),
}

impl AnyCoordinator {
    /// A client of `target`; the witness is reached with this host's certificate (`identity`).
    pub fn connect(target: &CoordTarget, identity: &TlsIdentity) -> Result<Self, CoordError> {
        match target {
            CoordTarget::Witness { addr, name } => {
                let tls = identity
                    .rustls_client()
                    .map_err(|e| CoordError::Setup(format!("TLS for the witness: {e}")))?;
                WitnessCoordinator::new(*addr, name, tls, WITNESS_TIMEOUT)
                    .map(|c| Self::Witness(Box::new(c)))
            }
            CoordTarget::Etcd(cfg) => EtcdCoordinator::new(cfg.clone()).map(Self::Etcd),
        }
    }
}

impl Coordinator for AnyCoordinator {
    async fn cas(&self, req: &CasRequest) -> Result<CasOutcome, CoordError> {
        match self {
            AnyCoordinator::Witness(c) => c.cas(req).await,
            AnyCoordinator::Etcd(c) => c.cas(req).await,
        }
    }

    async fn read(&self, vm: &str) -> Result<Option<Record>, CoordError> {
        match self {
            AnyCoordinator::Witness(c) => c.read(vm).await,
            AnyCoordinator::Etcd(c) => c.read(vm).await,
        }
    }
}

/// The file where a node records the highest generation it won or learned for its VM
/// (`RoleMachine`'s `Action::Persist`), so that its claims to a witness that lost its state are never
/// below a generation it won.
pub fn generation_file(state_dir: &Path, vm: &str) -> std::path::PathBuf {
    state_dir.join(format!("{vm}.generation"))
}

/// The generation recorded in `path` (0 when there is none).
pub fn read_generation(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Records `generation` in `path` durably (written beside, fsynced, renamed, directory fsynced).
pub fn write_generation(path: &Path, generation: u64) -> std::io::Result<()> {
    failover::coordinator::write_durably(path, format!("{generation}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn witness_targets_parse_with_or_without_a_name() {
        let t: CoordTarget = "10.0.0.9:7400".parse().unwrap();
        assert!(
            matches!(&t, CoordTarget::Witness { addr, name } if name == "witness" && addr.port() == 7400)
        );
        let t: CoordTarget = "host-a@127.0.0.1:23701".parse().unwrap();
        assert!(matches!(&t, CoordTarget::Witness { name, .. } if name == "host-a"));
        for bad in ["@1.2.3.4:5", "host-a@nope", "1.2.3.4"] {
            let e = bad.parse::<CoordTarget>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn generations_are_recorded_durably_and_read_back() {
        let dir = std::env::temp_dir().join(format!("ax-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = generation_file(&dir, "vm1");
        assert_eq!(read_generation(&f), 0);
        write_generation(&f, 7).unwrap();
        assert_eq!(read_generation(&f), 7);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
