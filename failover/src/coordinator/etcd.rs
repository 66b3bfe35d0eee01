//! The etcd v3 coordinator: a VM's register is the key `{prefix}{vm}`, its value the JSON
//! [`Record`]; a compare-and-set is one transaction comparing the key's `mod_revision` with the one
//! read (or its `create_revision` with 0 for a VM never set).
//!
//! It speaks etcd's v3 API through etcd's own JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`, served
//! on the client URLs by every etcd ≥ 3.4), over HTTPS with the cluster's client certificate. The
//! gateway is the same API as gRPC (the same request and response messages, in JSON), and it lets ax
//! use the HTTP client it already has instead of a gRPC stack and `protoc` at build time.
//!
//! Endpoints are tried in order; one that fails (connection refused, timeout, 5xx) is skipped for the
//! next request. etcd linearizes every request through its Raft leader, so any member gives the same
//! answer; a member cut off from the quorum answers errors, not stale data (reads are linearizable by
//! default).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use super::{CasOutcome, CasRequest, CoordError, Coordinator, Record};

/// etcd settings (`[coordinator]` in the agent's configuration).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) that etcd's server certificates chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) and key (PEM), when etcd requires client certificates.
    pub cert: Option<PathBuf>,
    /// The client key.
    pub key: Option<PathBuf>,
    /// Key prefix (default `/ax/generation/`).
    pub prefix: String,
    /// Per-request timeout (each endpoint).
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Plain endpoints with defaults.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            ca: None,
            cert: None,
            key: None,
            prefix: "/ax/generation/".into(),
            timeout: Duration::from_millis(1000),
        }
    }
}

/// An etcd-backed coordinator.
#[derive(Debug)]
pub struct EtcdCoordinator {
    cfg: EtcdConfig,
    http: reqwest::Client,
    /// The endpoint that answered last.
    preferred: AtomicUsize,
    /// Requests sent (every HTTP request, for the scale bench).
    pub requests: std::sync::atomic::AtomicU64,
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[derive(Debug, Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    mod_revision: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Debug, Deserialize)]
struct TxnResponse {
    #[serde(default)]
    succeeded: bool,
}

impl EtcdCoordinator {
    /// A client; reads the TLS files now.
    pub fn new(cfg: EtcdConfig) -> Result<Self, CoordError> {
        if cfg.endpoints.is_empty() {
            return Err(CoordError::Setup("[coordinator] etcd: no endpoints".into()));
        }
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| CoordError::Setup(format!("{}: {e}", p.display())))
        };
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(ca) = &cfg.ca {
            let c = reqwest::Certificate::from_pem(&read(ca)?)
                .map_err(|e| CoordError::Setup(format!("{}: {e}", ca.display())))?;
            b = b.add_root_certificate(c).tls_built_in_root_certs(false);
        }
        match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend(read(key)?);
                let id = reqwest::Identity::from_pem(&pem)
                    .map_err(|e| CoordError::Setup(format!("{}: {e}", cert.display())))?;
                b = b.identity(id);
            }
            (None, None) => {}
            _ => {
                return Err(CoordError::Setup(
                    "[coordinator] etcd: give both a client certificate and its key, or neither"
                        .into(),
                ))
            }
        }
        let http = b
            .build()
            .map_err(|e| CoordError::Setup(format!("etcd client: {e}")))?;
        Ok(EtcdCoordinator {
            cfg,
            http,
            preferred: AtomicUsize::new(0),
            requests: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn key(&self, vm: &str) -> String {
        format!("{}{vm}", self.cfg.prefix)
    }

    /// POSTs `body` to `path` on the first endpoint that answers (answers up to 1 MiB).
    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, CoordError> {
        self.post_capped(path, body, 1 << 20).await
    }

    /// POSTs `body` to `path` on the first endpoint that answers; an answer over `cap` bytes is an
    /// error.
    async fn post_capped<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &serde_json::Value,
        cap: usize,
    ) -> Result<T, CoordError> {
        let n = self.cfg.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let url = format!("{}{path}", self.cfg.endpoints[i].trim_end_matches('/'));
            self.requests.fetch_add(1, Ordering::Relaxed);
            let r = self.http.post(&url).json(body).send().await;
            match r {
                Ok(resp) if resp.status().is_success() => {
                    self.preferred.store(i, Ordering::Relaxed);
                    // Bounded: etcd's answers to these requests are small; cap what is read.
                    let bytes = resp
                        .bytes()
                        .await
                        .map_err(|e| CoordError::Unreachable(format!("{url}: {e}")))?;
                    if bytes.len() > cap {
                        return Err(CoordError::Malformed(format!(
                            "{url}: answer of {} bytes",
                            bytes.len()
                        )));
                    }
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| CoordError::Malformed(format!("{url}: {e}")));
                }
                Ok(resp) => last = format!("{url}: HTTP {}", resp.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(CoordError::Unreachable(last))
    }

    /// The record and its `mod_revision` (None: the key does not exist).
    async fn get(&self, vm: &str) -> Result<Option<(Record, i64)>, CoordError> {
        let r: RangeResponse = self
            .post(
                "/v3/kv/range",
                &json!({ "key": b64(self.key(vm).as_bytes()) }),
            )
            .await?;
        let Some(kv) = r.kvs.into_iter().next() else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(kv.value.as_bytes())
            .map_err(|e| CoordError::Malformed(format!("value of {}: {e}", self.key(vm))))?;
        let rec: Record = serde_json::from_slice(&raw)
            .map_err(|e| CoordError::Malformed(format!("value of {}: {e}", self.key(vm))))?;
        let rev = kv
            .mod_revision
            .as_deref()
            .unwrap_or("0")
            .parse::<i64>()
            .map_err(|e| CoordError::Malformed(format!("mod_revision: {e}")))?;
        Ok(Some((rec, rev)))
    }
}

/// One key of a prefix listing ([`EtcdCoordinator::kv_prefix`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The whole key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
}

/// The first key after every key starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Plain keys beside the registers, for data that needs no compare-and-set (e.g. the HA catalog of
/// VM definitions): the register of each VM stays the only thing that decides who runs it.
impl EtcdCoordinator {
    /// Sets `key` to `value`.
    pub async fn kv_put(&self, key: &str, value: &[u8]) -> Result<(), CoordError> {
        let _: serde_json::Value = self
            .post(
                "/v3/kv/put",
                &json!({ "key": b64(key.as_bytes()), "value": b64(value) }),
            )
            .await?;
        Ok(())
    }

    /// Deletes `key` (no error if it does not exist).
    pub async fn kv_delete(&self, key: &str) -> Result<(), CoordError> {
        let _: serde_json::Value = self
            .post("/v3/kv/deleterange", &json!({ "key": b64(key.as_bytes()) }))
            .await?;
        Ok(())
    }

    /// Every key starting with `prefix`, sorted, at most `limit` of them, their values at most
    /// `cap` bytes in all (more is an error: nothing is allocated beyond what the cap allows).
    pub async fn kv_prefix(
        &self,
        prefix: &str,
        limit: usize,
        cap: usize,
    ) -> Result<Vec<KeyValue>, CoordError> {
        let r: RangeResponse = self
            .post_capped(
                "/v3/kv/range",
                &json!({
                    "key": b64(prefix.as_bytes()),
                    "range_end": b64(&prefix_end(prefix.as_bytes())),
                    "limit": limit.to_string(),
                }),
                cap,
            )
            .await?;
        let dec = |what: &str, s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|e| CoordError::Malformed(format!("{what} under {prefix}: {e}")))
        };
        r.kvs
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8(dec("key", &kv.key)?)
                    .map_err(|e| CoordError::Malformed(format!("key under {prefix}: {e}")))?;
                Ok(KeyValue {
                    key,
                    value: dec("value", &kv.value)?,
                })
            })
            .collect()
    }
}

impl Coordinator for EtcdCoordinator {
    async fn cas(&self, req: &CasRequest) -> Result<CasOutcome, CoordError> {
        req.validate()?;
        let key = b64(self.key(&req.vm).as_bytes());
        // Read, decide, and write only if nothing changed in between; a lost race reads again.
        for _ in 0..16 {
            let cur = self.get(&req.vm).await?;
            let (generation, holder) = cur.as_ref().map_or((0, String::new()), |(r, _)| {
                (r.generation, r.holder.clone())
            });
            if generation == req.expected + 1 && holder == req.claimant {
                return Ok(CasOutcome::Won { generation });
            }
            if generation != req.expected {
                return Ok(CasOutcome::Lost {
                    current: generation,
                    holder,
                });
            }
            let new = Record {
                generation: req.expected + 1,
                holder: req.claimant.clone(),
            };
            let value = serde_json::to_vec(&new).map_err(|e| CoordError::Invalid(e.to_string()))?;
            let compare = match &cur {
                Some((_, rev)) => json!({
                    "target": "MOD", "key": key, "result": "EQUAL", "mod_revision": rev.to_string()
                }),
                None => json!({
                    "target": "CREATE", "key": key, "result": "EQUAL", "create_revision": "0"
                }),
            };
            let body = json!({
                "compare": [compare],
                "success": [{ "request_put": { "key": key, "value": b64(&value) } }],
            });
            let t: TxnResponse = self.post("/v3/kv/txn", &body).await?;
            if t.succeeded {
                return Ok(CasOutcome::Won {
                    generation: new.generation,
                });
            }
        }
        Err(CoordError::Failed(format!(
            "VM {:?}: the key kept changing under 16 transactions",
            req.vm
        )))
    }

    async fn read(&self, vm: &str) -> Result<Option<Record>, CoordError> {
        Ok(self.get(vm).await?.map(|(r, _)| r))
    }
}

/// Members of an etcd cluster on loopback, in a temporary directory: for tests and benchmarks
/// (`etcd` must be on `PATH`). Killed and removed on drop.
#[derive(Debug)]
pub struct LocalEtcd {
    children: Vec<Option<std::process::Child>>,
    /// Each member's `etcd` arguments (to restart it).
    args: Vec<Vec<String>>,
    /// Client URLs, one per member.
    pub endpoints: Vec<String>,
    dir: PathBuf,
}

/// TLS files of a [`LocalEtcd`]: client connections require a certificate chained to `ca`.
#[derive(Debug, Clone)]
pub struct LocalEtcdTls {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate (valid for 127.0.0.1).
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
}

impl LocalEtcd {
    /// Whether an `etcd` binary runs.
    pub fn available() -> bool {
        std::process::Command::new("etcd")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn free_port() -> Result<u16, CoordError> {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| CoordError::Setup(format!("a free port: {e}")))
    }

    /// Starts `n` members named `m0…` under `dir` (created; removed on drop), with Raft timings for
    /// loopback (50 ms heartbeats, 500 ms elections).
    pub fn start(dir: PathBuf, n: usize, tls: Option<&LocalEtcdTls>) -> Result<Self, CoordError> {
        let peers = (0..n)
            .map(|_| Self::free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let clients = (0..n)
            .map(|_| Self::free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let ports: Vec<(u16, u16)> = clients.into_iter().zip(peers).collect();
        Self::start_on(
            dir,
            tls,
            std::net::Ipv4Addr::LOCALHOST.into(),
            &ports,
            &mut |args, log| {
                std::process::Command::new("etcd")
                    .args(args)
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()
            },
        )
    }

    /// Starts one member per `(client port, peer port)` of `ports`, all listening on `ip`, each
    /// process started by `spawn` (e.g. inside a network namespace) from `etcd`'s arguments and the
    /// file for its stderr.
    pub fn start_on(
        dir: PathBuf,
        tls: Option<&LocalEtcdTls>,
        ip: std::net::IpAddr,
        ports: &[(u16, u16)],
        spawn: &mut dyn FnMut(&[String], std::fs::File) -> std::io::Result<std::process::Child>,
    ) -> Result<Self, CoordError> {
        let setup =
            |e: std::io::Error| CoordError::Setup(format!("etcd in {}: {e}", dir.display()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(setup)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{host}:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut me = LocalEtcd {
            children: Vec::new(),
            args: Vec::new(),
            endpoints: ports
                .iter()
                .map(|(client, _)| format!("{scheme}://{host}:{client}"))
                .collect(),
            dir: dir.clone(),
        };
        for (i, (_, port)) in ports.iter().enumerate() {
            let url = &me.endpoints[i];
            let peer = format!("http://{host}:{port}");
            let log = std::fs::File::create(dir.join(format!("m{i}.log"))).map_err(setup)?;
            let mut args: Vec<String> = vec![
                "--name".into(),
                format!("m{i}"),
                "--data-dir".into(),
                dir.join(format!("m{i}")).display().to_string(),
                "--listen-client-urls".into(),
                url.clone(),
                "--advertise-client-urls".into(),
                url.clone(),
                "--listen-peer-urls".into(),
                peer.clone(),
                "--initial-advertise-peer-urls".into(),
                peer,
                "--initial-cluster".into(),
                cluster.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                format!("ax-{}", std::process::id()),
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
            ];
            if let Some(t) = tls {
                for (flag, path) in [
                    ("--cert-file", &t.cert),
                    ("--key-file", &t.key),
                    ("--trusted-ca-file", &t.ca),
                ] {
                    args.push(flag.into());
                    args.push(path.display().to_string());
                }
                args.push("--client-cert-auth".into());
            }
            me.children.push(Some(spawn(&args, log).map_err(setup)?));
            me.args.push(args);
        }
        Ok(me)
    }

    /// Starts member `i` again (after [`LocalEtcd::kill`]) on its data directory, through `spawn` as
    /// in [`LocalEtcd::start_on`]; its log is appended to. A member that runs is left alone.
    pub fn restart(
        &mut self,
        i: usize,
        spawn: &mut dyn FnMut(&[String], std::fs::File) -> std::io::Result<std::process::Child>,
    ) -> Result<(), CoordError> {
        let args = self
            .args
            .get(i)
            .ok_or_else(|| CoordError::Setup(format!("no etcd member {i}")))?;
        if self.children[i].is_some() {
            return Ok(());
        }
        let setup = |e: std::io::Error| CoordError::Setup(format!("etcd member {i} restart: {e}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{i}.log")))
            .map_err(setup)?;
        self.children[i] = Some(spawn(args, log).map_err(setup)?);
        Ok(())
    }

    /// The process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children
            .get(i)
            .and_then(Option::as_ref)
            .map(std::process::Child::id)
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `c` can read (at most `limit`).
    pub async fn wait_ready(c: &EtcdCoordinator, limit: Duration) -> Result<(), CoordError> {
        let t = std::time::Instant::now();
        loop {
            match c.read("probe").await {
                Ok(_) => return Ok(()),
                Err(e) if t.elapsed() > limit => {
                    return Err(CoordError::Setup(format!(
                        "etcd not ready after {limit:?}: {e}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
