//! A Nova (compute API v2.1) client with explicit microversions, for host-failure recovery.
//!
//! [`Nova::connect`] reads the server's version document (`GET {endpoint}`: `version.version` /
//! `version.min_version`, or the `versions` list of `GET /`) and every call then sends the microversion
//! it was written for, checked against that range:
//!
//! | call | microversion |
//! |---|---|
//! | services (list, force-down/up, enable/disable by UUID) | 2.53 |
//! | servers (list by host, show, lock/unlock, stop/start), migrations | 2.59 (2.74 to boot on a host) |
//! | evacuate, [`EvacuateMode::Active`] | the server's maximum, capped at 2.94 (the VM comes back as it was) |
//! | evacuate, [`EvacuateMode::Stopped`] | 2.95 (the VM comes back SHUTOFF; the caller starts it) |
//!
//! Every call takes a token from a [`TokenSource`]; a 401 invalidates it and the call is sent once more.
//! Failures become [`NovaError`]s that carry the server's own message: 400 "still in use" (evacuation
//! refused because the source compute service is not down), other 400s, 403 (quota, policy), 404, 409
//! (the server's state forbids the action), timeouts of the wait loops.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info_span, Instrument};

use crate::auth::{AuthError, TokenSource};
use crate::keystone::{error_chain, error_message, Keystone, KeystoneError};

/// A compute API microversion, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Microversion(pub u16, pub u16);

impl Microversion {
    /// Parses `2.53` (also `v2.1`).
    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.trim().trim_start_matches('v').split_once('.')?;
        Some(Microversion(a.parse().ok()?, b.parse().ok()?))
    }
}

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Services by UUID, `forced_down` in the same PUT.
pub const MV_SERVICES: Microversion = Microversion(2, 53);
/// Servers and migrations (migration UUIDs, `instance_uuid` filter).
pub const MV_SERVERS: Microversion = Microversion(2, 59);
/// Boot on a named host.
pub const MV_BOOT_HOST: Microversion = Microversion(2, 74);
/// The last evacuate microversion that restores the VM's power state.
pub const MV_EVACUATE_ACTIVE: Microversion = Microversion(2, 94);
/// From here on an evacuated VM stays SHUTOFF.
pub const MV_EVACUATE_STOPPED: Microversion = Microversion(2, 95);

/// Which evacuation semantics to ask Nova for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvacuateMode {
    /// Microversion ≤ 2.94: Nova rebuilds the VM in the power state it had (ACTIVE stays ACTIVE).
    #[default]
    Active,
    /// Microversion 2.95+: Nova leaves the VM SHUTOFF; the recovery engine starts those that ran.
    Stopped,
}

/// Errors of the Nova client.
#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    /// No token.
    #[error("nova: {0}")]
    Auth(#[from] AuthError),
    /// No compute endpoint.
    #[error("nova: {0}")]
    Catalog(#[from] KeystoneError),
    /// The request did not get an answer.
    #[error("nova {what}: {url}: {message}")]
    Transport {
        /// The operation.
        what: String,
        /// The URL.
        url: String,
        /// The transport error.
        message: String,
    },
    /// 400 "still in use": the source host's compute service is not down (force it down first).
    #[error("nova {what}: host still in use: {message}")]
    HostInUse {
        /// The operation.
        what: String,
        /// The server's message.
        message: String,
    },
    /// Other 400.
    #[error("nova {what}: bad request: {message}")]
    BadRequest {
        /// The operation.
        what: String,
        /// The server's message.
        message: String,
    },
    /// 403: quota exceeded or not allowed by policy.
    #[error("nova {what}: forbidden: {message}")]
    Forbidden {
        /// The operation.
        what: String,
        /// The server's message.
        message: String,
    },
    /// 404.
    #[error("nova {what}: not found: {message}")]
    NotFound {
        /// The operation.
        what: String,
        /// The server's message.
        message: String,
    },
    /// 409: the VM's or service's state forbids the action now.
    #[error("nova {what}: conflict: {message}")]
    Conflict {
        /// The operation.
        what: String,
        /// The server's message.
        message: String,
    },
    /// Any other non-success status.
    #[error("nova {what}: HTTP {status}: {message}")]
    Status {
        /// The operation.
        what: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("nova {what}: unexpected answer: {message}")]
    BadResponse {
        /// The operation.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The server does not offer a microversion this call needs.
    #[error("nova {what} needs microversion {need}, the server offers {min}..={max}")]
    Unsupported {
        /// The operation.
        what: String,
        /// Needed.
        need: Microversion,
        /// Server minimum.
        min: Microversion,
        /// Server maximum.
        max: Microversion,
    },
    /// A wait loop gave up.
    #[error("nova {what}: timed out after {waited:?}: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// The last state seen.
        last: String,
    },
    /// The server went to ERROR.
    #[error("nova server {id} went to ERROR: {fault}")]
    ServerError {
        /// Server id.
        id: String,
        /// The fault message Nova recorded.
        fault: String,
    },
    /// No compute service of that host.
    #[error("nova: no nova-compute service on host {host}")]
    NoService {
        /// The host.
        host: String,
    },
}

impl NovaError {
    /// Whether the same request may succeed a moment later (409, 5xx, transport errors).
    pub fn is_transient(&self) -> bool {
        match self {
            NovaError::Conflict { .. } | NovaError::Transport { .. } => true,
            NovaError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A compute service (`GET /os-services`, 2.53).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// UUID.
    pub id: String,
    /// `nova-compute`, `nova-scheduler`, …
    pub binary: String,
    /// Host name.
    pub host: String,
    /// `enabled` / `disabled`.
    pub status: String,
    /// `up` / `down`.
    pub state: String,
    /// Forced down by an operator (or ax).
    #[serde(default)]
    pub forced_down: bool,
    /// Why it was disabled.
    #[serde(default)]
    pub disabled_reason: Option<String>,
    /// Availability zone.
    #[serde(default)]
    pub zone: Option<String>,
}

/// A server as far as recovery cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// UUID.
    pub id: String,
    /// Name.
    pub name: String,
    /// `ACTIVE`, `SHUTOFF`, `ERROR`, `REBUILD`, …
    pub status: String,
    /// The compute host (`OS-EXT-SRV-ATTR:host`; admin only).
    #[serde(rename = "OS-EXT-SRV-ATTR:host", default)]
    pub host: Option<String>,
    /// The running task, if any.
    #[serde(rename = "OS-EXT-STS:task_state", default)]
    pub task_state: Option<String>,
    /// `active`, `stopped`, `error`, …
    #[serde(rename = "OS-EXT-STS:vm_state", default)]
    pub vm_state: Option<String>,
    /// Locked against non-admin actions.
    #[serde(default)]
    pub locked: bool,
    /// User metadata (`ax:level` says the availability level).
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    /// The fault Nova recorded, if any.
    #[serde(default)]
    pub fault: Option<Fault>,
}

/// A server's recorded fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The message.
    #[serde(default)]
    pub message: String,
}

/// A migration record (`GET /os-migrations`, 2.59).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Numeric id.
    pub id: u64,
    /// The server.
    pub instance_uuid: String,
    /// Source host.
    #[serde(default)]
    pub source_compute: Option<String>,
    /// Destination host.
    #[serde(default)]
    pub dest_compute: Option<String>,
    /// `accepted`, `pre-migrating`, `done`, `completed`, `failed`, `error`, …
    pub status: String,
    /// `evacuation`, `live-migration`, …
    #[serde(default)]
    pub migration_type: Option<String>,
    /// Creation time.
    #[serde(default)]
    pub created_at: Option<String>,
}

/// Where an evacuated server ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evacuated {
    /// The server's host now.
    pub host: String,
    /// Its status (`ACTIVE` or `SHUTOFF`).
    pub status: String,
    /// The evacuation migration record's status (`done`, or `completed` once the source came back).
    pub migration_status: Option<String>,
}

/// Options of the Nova client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NovaSettings {
    /// Use this compute endpoint instead of the catalog's.
    pub endpoint: Option<String>,
    /// Evacuation semantics (`active`: ≤ 2.94; `stopped`: 2.95+ then start).
    pub evacuate_mode: EvacuateMode,
    /// Timeout of one HTTP request, seconds.
    pub request_timeout_secs: u64,
    /// Poll interval of the wait loops, milliseconds (default 500).
    pub poll_interval_ms: u64,
}

impl Default for NovaSettings {
    fn default() -> Self {
        NovaSettings {
            endpoint: None,
            evacuate_mode: EvacuateMode::Active,
            request_timeout_secs: 30,
            poll_interval_ms: 500,
        }
    }
}

/// Parses a version document: `{"version": {...}}` of `GET /v2.1` or `{"versions": [...]}` of `GET /`
/// (the `v2.1` entry). Returns (min, max).
pub fn parse_versions(body: &str) -> Result<(Microversion, Microversion), String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let doc = match (v.get("version"), v.get("versions")) {
        (Some(d), _) => d.clone(),
        (None, Some(Value::Array(list))) => list
            .iter()
            .find(|d| d.get("id").and_then(Value::as_str) == Some("v2.1"))
            .cloned()
            .ok_or("no v2.1 in the versions list")?,
        _ => return Err("neither `version` nor `versions` in the answer".into()),
    };
    let get = |k: &str| {
        doc.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .and_then(Microversion::parse)
            .ok_or_else(|| format!("no usable `{k}` (microversions unsupported?)"))
    };
    Ok((get("min_version")?, get("version")?))
}

/// Maps a non-success answer to a [`NovaError`].
pub fn classify(what: &str, status: u16, body: &str) -> NovaError {
    let message = error_message(body);
    let what = what.to_string();
    match status {
        400 if message.contains("still in use") => NovaError::HostInUse { what, message },
        400 => NovaError::BadRequest { what, message },
        403 => NovaError::Forbidden { what, message },
        404 => NovaError::NotFound { what, message },
        409 => NovaError::Conflict { what, message },
        _ => NovaError::Status {
            what,
            status,
            message,
        },
    }
}

/// The Nova client.
#[derive(Debug)]
pub struct Nova<A: TokenSource> {
    auth: Arc<A>,
    endpoint: String,
    http: reqwest::Client,
    settings: NovaSettings,
    min: Microversion,
    max: Microversion,
}

impl Nova<Keystone> {
    /// Resolves the compute endpoint from the Keystone catalog (unless `settings.endpoint` is set) and
    /// connects.
    pub async fn from_keystone(
        ks: Arc<Keystone>,
        settings: NovaSettings,
    ) -> Result<Self, NovaError> {
        let endpoint = match &settings.endpoint {
            Some(e) => e.clone(),
            None => ks.endpoint("compute").await?,
        };
        let http = crate::keystone::http_client(
            ks.settings().cacert.as_deref(),
            ks.settings().insecure,
            Duration::from_secs(settings.request_timeout_secs.max(1)),
        )
        .map_err(|message| NovaError::Transport {
            what: "client".into(),
            url: endpoint.clone(),
            message,
        })?;
        Nova::connect(ks, endpoint, http, settings).await
    }
}

impl<A: TokenSource> Nova<A> {
    /// Reads the version range of the compute API at `endpoint` (e.g. `http://nova:8774/v2.1`).
    pub async fn connect(
        auth: Arc<A>,
        endpoint: String,
        http: reqwest::Client,
        settings: NovaSettings,
    ) -> Result<Self, NovaError> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let mut nova = Nova {
            auth,
            endpoint,
            http,
            settings,
            min: Microversion(2, 1),
            max: Microversion(2, 1),
        };
        let body = nova
            .send_raw("version discovery", reqwest::Method::GET, "", None, None)
            .await?;
        let (min, max) = parse_versions(&body).map_err(|message| NovaError::BadResponse {
            what: "version discovery".into(),
            message,
        })?;
        nova.min = min;
        nova.max = max;
        tracing::info!(endpoint = %nova.endpoint, %min, %max, "nova: connected");
        Ok(nova)
    }

    /// The server's microversion range.
    pub fn versions(&self) -> (Microversion, Microversion) {
        (self.min, self.max)
    }

    /// The settings.
    pub fn settings(&self) -> &NovaSettings {
        &self.settings
    }

    /// The microversion an evacuation is sent with in the configured mode.
    pub fn evacuate_microversion(&self) -> Result<Microversion, NovaError> {
        let need = match self.settings.evacuate_mode {
            EvacuateMode::Active => self.max.min(MV_EVACUATE_ACTIVE).max(MV_SERVICES),
            EvacuateMode::Stopped => MV_EVACUATE_STOPPED,
        };
        self.check("evacuate", need)?;
        Ok(need)
    }

    fn check(&self, what: &str, need: Microversion) -> Result<(), NovaError> {
        if need < self.min || need > self.max {
            return Err(NovaError::Unsupported {
                what: what.into(),
                need,
                min: self.min,
                max: self.max,
            });
        }
        Ok(())
    }

    async fn send_raw(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        mv: Option<Microversion>,
        body: Option<&Value>,
    ) -> Result<String, NovaError> {
        let url = format!("{}{}", self.endpoint, path);
        let mut retried = false;
        loop {
            let token = self.auth.token().await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("X-Auth-Token", &token.value)
                .header("Accept", "application/json");
            if let Some(mv) = mv {
                req = req
                    .header("OpenStack-API-Version", format!("compute {mv}"))
                    .header("X-OpenStack-Nova-API-Version", mv.to_string());
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let transport = |e: reqwest::Error| NovaError::Transport {
                what: what.into(),
                url: url.clone(),
                message: error_chain(&e),
            };
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status().as_u16();
            let text = resp.text().await.map_err(transport)?;
            debug!(%method, %url, status, "nova");
            if status == 401 && !retried {
                self.auth.invalidate();
                retried = true;
                continue;
            }
            if !(200..300).contains(&status) {
                return Err(classify(what, status, &text));
            }
            return Ok(text);
        }
    }

    async fn call(
        &self,
        what: &str,
        method: reqwest::Method,
        path: &str,
        mv: Microversion,
        body: Option<Value>,
    ) -> Result<Value, NovaError> {
        self.check(what, mv)?;
        let span = info_span!("nova", op = what, mv = %mv);
        let text = self
            .send_raw(what, method, path, Some(mv), body.as_ref())
            .instrument(span)
            .await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| NovaError::BadResponse {
            what: what.into(),
            message: format!("not JSON: {e}"),
        })
    }

    fn field<T: serde::de::DeserializeOwned>(
        what: &str,
        v: Value,
        key: &str,
    ) -> Result<T, NovaError> {
        let inner = match v {
            Value::Object(mut m) => m.remove(key),
            _ => None,
        }
        .ok_or_else(|| NovaError::BadResponse {
            what: what.into(),
            message: format!("no `{key}` in the answer"),
        })?;
        serde_json::from_value(inner).map_err(|e| NovaError::BadResponse {
            what: what.into(),
            message: format!("`{key}`: {e}"),
        })
    }

    /// Compute services, optionally of one host and/or binary.
    pub async fn services(
        &self,
        host: Option<&str>,
        binary: Option<&str>,
    ) -> Result<Vec<Service>, NovaError> {
        let mut q = Vec::new();
        if let Some(h) = host {
            q.push(format!("host={}", enc(h)));
        }
        if let Some(b) = binary {
            q.push(format!("binary={}", enc(b)));
        }
        let path = if q.is_empty() {
            "/os-services".to_string()
        } else {
            format!("/os-services?{}", q.join("&"))
        };
        let v = self
            .call(
                "list services",
                reqwest::Method::GET,
                &path,
                MV_SERVICES,
                None,
            )
            .await?;
        Self::field("list services", v, "services")
    }

    /// The `nova-compute` service of `host`.
    pub async fn compute_service(&self, host: &str) -> Result<Service, NovaError> {
        self.services(Some(host), Some("nova-compute"))
            .await?
            .into_iter()
            .find(|s| s.host == host)
            .ok_or_else(|| NovaError::NoService { host: host.into() })
    }

    async fn update_service(
        &self,
        what: &str,
        id: &str,
        body: Value,
    ) -> Result<Service, NovaError> {
        let v = self
            .call(
                what,
                reqwest::Method::PUT,
                &format!("/os-services/{}", enc(id)),
                MV_SERVICES,
                Some(body),
            )
            .await?;
        Self::field(what, v, "service")
    }

    /// Sets or clears `forced_down` (2.53). Forcing down is what lets Nova evacuate at once.
    pub async fn set_forced_down(&self, id: &str, down: bool) -> Result<Service, NovaError> {
        let what = if down { "force down" } else { "force up" };
        self.update_service(what, id, json!({"forced_down": down}))
            .await
    }

    /// Disables the service (the scheduler places nothing there) with a reason.
    pub async fn disable(&self, id: &str, reason: &str) -> Result<Service, NovaError> {
        self.update_service(
            "disable service",
            id,
            json!({"status": "disabled", "disabled_reason": reason}),
        )
        .await
    }

    /// Enables the service.
    pub async fn enable(&self, id: &str) -> Result<Service, NovaError> {
        self.update_service("enable service", id, json!({"status": "enabled"}))
            .await
    }

    /// Every server on `host`, all projects (admin).
    pub async fn servers_on_host(&self, host: &str) -> Result<Vec<Server>, NovaError> {
        let v = self
            .call(
                "list servers",
                reqwest::Method::GET,
                &format!("/servers/detail?all_tenants=1&host={}", enc(host)),
                MV_SERVERS,
                None,
            )
            .await?;
        let list: Vec<Server> = Self::field("list servers", v, "servers")?;
        // The filter is exact in Nova; keep the check in case a proxy ignores it.
        Ok(list
            .into_iter()
            .filter(|s| s.host.as_deref() == Some(host))
            .collect())
    }

    /// One server.
    pub async fn server(&self, id: &str) -> Result<Server, NovaError> {
        let v = self
            .call(
                "show server",
                reqwest::Method::GET,
                &format!("/servers/{}", enc(id)),
                MV_SERVERS,
                None,
            )
            .await?;
        Self::field("show server", v, "server")
    }

    async fn action(
        &self,
        what: &str,
        id: &str,
        mv: Microversion,
        body: Value,
    ) -> Result<(), NovaError> {
        self.call(
            what,
            reqwest::Method::POST,
            &format!("/servers/{}/action", enc(id)),
            mv,
            Some(body),
        )
        .await?;
        Ok(())
    }

    /// Evacuates a server off its (forced-down) host; `target` names the host, else the scheduler picks.
    /// Returns the microversion used.
    pub async fn evacuate(
        &self,
        id: &str,
        target: Option<&str>,
    ) -> Result<Microversion, NovaError> {
        let mv = self.evacuate_microversion()?;
        let body = match target {
            Some(h) => json!({"evacuate": {"host": h}}),
            None => json!({"evacuate": {}}),
        };
        self.action("evacuate", id, mv, body).await?;
        Ok(mv)
    }

    /// Locks a server (non-admins cannot act on it).
    pub async fn lock(&self, id: &str) -> Result<(), NovaError> {
        self.action("lock", id, MV_SERVERS, json!({"lock": null}))
            .await
    }

    /// Unlocks a server.
    pub async fn unlock(&self, id: &str) -> Result<(), NovaError> {
        self.action("unlock", id, MV_SERVERS, json!({"unlock": null}))
            .await
    }

    /// Stops a server.
    pub async fn stop(&self, id: &str) -> Result<(), NovaError> {
        self.action("stop", id, MV_SERVERS, json!({"os-stop": null}))
            .await
    }

    /// Starts a server.
    pub async fn start(&self, id: &str) -> Result<(), NovaError> {
        self.action("start", id, MV_SERVERS, json!({"os-start": null}))
            .await
    }

    /// Cold-migrates a server off its (live) host; the scheduler picks the target.
    pub async fn migrate(&self, id: &str) -> Result<(), NovaError> {
        self.action("migrate", id, MV_SERVERS, json!({"migrate": null}))
            .await
    }

    /// Confirms a finished cold migration (`VERIFY_RESIZE`).
    pub async fn confirm_migration(&self, id: &str) -> Result<(), NovaError> {
        self.action(
            "confirm migration",
            id,
            MV_SERVERS,
            json!({"confirmResize": null}),
        )
        .await
    }

    /// Boots a server (tests and benchmarks): `networks: none`, optionally on `host` (2.74).
    pub async fn boot(
        &self,
        name: &str,
        image: &str,
        flavor: &str,
        host: Option<&str>,
        metadata: &HashMap<String, String>,
    ) -> Result<String, NovaError> {
        let mut server = json!({"name": name, "imageRef": image, "flavorRef": flavor,
            "networks": "none", "metadata": metadata});
        if let Some(h) = host {
            server["host"] = json!(h);
        }
        let v = self
            .call(
                "boot",
                reqwest::Method::POST,
                "/servers",
                MV_BOOT_HOST,
                Some(json!({ "server": server })),
            )
            .await?;
        let s: Value = Self::field("boot", v, "server")?;
        s.get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| NovaError::BadResponse {
                what: "boot".into(),
                message: "no server id".into(),
            })
    }

    /// Deletes a server.
    pub async fn delete(&self, id: &str) -> Result<(), NovaError> {
        self.call(
            "delete server",
            reqwest::Method::DELETE,
            &format!("/servers/{}", enc(id)),
            MV_SERVERS,
            None,
        )
        .await?;
        Ok(())
    }

    /// Evacuation migration records, optionally of one server.
    pub async fn evacuations(&self, instance: Option<&str>) -> Result<Vec<Migration>, NovaError> {
        let mut path = "/os-migrations?migration_type=evacuation".to_string();
        if let Some(i) = instance {
            path.push_str(&format!("&instance_uuid={}", enc(i)));
        }
        let v = self
            .call(
                "list migrations",
                reqwest::Method::GET,
                &path,
                MV_SERVERS,
                None,
            )
            .await?;
        Self::field("list migrations", v, "migrations")
    }

    /// Polls until the server has no task and is in `want` status (`ACTIVE`, `SHUTOFF`), or `timeout`.
    /// ERROR ends the wait with the server's fault.
    pub async fn wait_status(
        &self,
        id: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<Server, NovaError> {
        let t0 = Instant::now();
        let mut last: String;
        loop {
            match self.server(id).await {
                Ok(s) => {
                    if s.status == "ERROR" {
                        return Err(server_error(&s));
                    }
                    if s.status == want && s.task_state.is_none() {
                        return Ok(s);
                    }
                    last = format!(
                        "status {} task {:?} host {:?}",
                        s.status, s.task_state, s.host
                    );
                }
                Err(e) if e.is_transient() => last = e.to_string(),
                Err(e) => return Err(e),
            }
            if t0.elapsed() >= timeout {
                return Err(NovaError::Timeout {
                    what: format!("server {id} to become {want}"),
                    waited: t0.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.settings.poll_interval_ms.max(10))
    }

    /// Polls the server and its evacuation record until it runs in `want` status on a host other than
    /// `source` with no task, and the newest evacuation record from `source` is `done`/`completed`.
    pub async fn wait_evacuated(
        &self,
        id: &str,
        source: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<Evacuated, NovaError> {
        let t0 = Instant::now();
        let mut last: String;
        loop {
            let step = async {
                let s = self.server(id).await?;
                if s.status == "ERROR" {
                    return Err(server_error(&s));
                }
                let host = s.host.clone().unwrap_or_default();
                let settled = s.status == want
                    && s.task_state.is_none()
                    && !host.is_empty()
                    && host != source;
                if !settled {
                    // The migration record is read only once the server looks done: one request per
                    // poll and VM keeps nova-api free for the evacuations themselves.
                    return Ok((false, s, host, None));
                }
                let migs = self.evacuations(Some(id)).await?;
                let mig = migs
                    .iter()
                    .filter(|m| m.source_compute.as_deref() == Some(source))
                    .max_by_key(|m| m.id);
                if let Some(m) = mig {
                    if matches!(m.status.as_str(), "failed" | "error") {
                        return Err(NovaError::ServerError {
                            id: id.into(),
                            fault: format!(
                                "evacuation record {} is {}{}",
                                m.id,
                                m.status,
                                s.fault
                                    .as_ref()
                                    .map(|f| format!(": {}", f.message))
                                    .unwrap_or_default()
                            ),
                        });
                    }
                }
                let mstat = mig.map(|m| m.status.clone());
                let done = matches!(mstat.as_deref(), Some("done" | "completed"));
                Ok((done, s, host, mstat))
            };
            match step.await {
                Ok((true, s, host, migration_status)) => {
                    return Ok(Evacuated {
                        host,
                        status: s.status,
                        migration_status,
                    })
                }
                Ok((false, s, host, m)) => {
                    last = format!(
                        "status {} task {:?} host {host} migration {m:?}",
                        s.status, s.task_state
                    )
                }
                Err(e) if e.is_transient() => last = e.to_string(),
                Err(e) => return Err(e),
            }
            if t0.elapsed() >= timeout {
                return Err(NovaError::Timeout {
                    what: format!("server {id} to be {want} off {source}"),
                    waited: t0.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(self.poll()).await;
        }
    }
}

fn server_error(s: &Server) -> NovaError {
    NovaError::ServerError {
        id: s.id.clone(),
        fault: s
            .fault
            .as_ref()
            .map(|f| f.message.clone())
            .unwrap_or_else(|| "no fault recorded".into()),
    }
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let one = r#"{"version": {"id": "v2.1", "status": "CURRENT", "version": "2.96", "min_version": "2.1"}}"#;
        assert_eq!(
            parse_versions(one).unwrap(),
            (Microversion(2, 1), Microversion(2, 96))
        );
        let root = r#"{"versions": [{"id": "v2.0", "version": "", "min_version": ""},
            {"id": "v2.1", "version": "2.90", "min_version": "2.1"}]}"#;
        assert_eq!(parse_versions(root).unwrap().1, Microversion(2, 90));
        let legacy = r#"{"version": {"id": "v2.0", "version": "", "min_version": ""}}"#;
        assert!(parse_versions(legacy).unwrap_err().contains("min_version"));
        assert!(parse_versions("[]").is_err());
        assert!(Microversion(2, 9) < Microversion(2, 10));
        assert_eq!(Microversion::parse("v2.1"), Some(Microversion(2, 1)));
        assert_eq!(Microversion::parse("2"), None);
    }

    #[test]
    fn errors_carry_the_server_message() {
        let e = classify(
            "evacuate",
            400,
            r#"{"badRequest": {"code": 400, "message": "Compute service of compute1 is still in use."}}"#,
        );
        assert!(matches!(e, NovaError::HostInUse { .. }));
        assert!(e.to_string().contains("compute1 is still in use"), "{e}");
        let e = classify(
            "evacuate",
            409,
            r#"{"conflictingRequest": {"code": 409, "message": "Cannot 'evacuate' instance x while it is in task_state rebuilding"}}"#,
        );
        assert!(matches!(e, NovaError::Conflict { .. }) && e.is_transient());
        let e = classify(
            "boot",
            403,
            r#"{"forbidden": {"code": 403, "message": "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances"}}"#,
        );
        assert!(matches!(e, NovaError::Forbidden { .. }) && !e.is_transient());
        assert!(e.to_string().contains("Quota exceeded"));
        let e = classify("x", 503, "<html>down</html>");
        assert!(e.is_transient() && e.to_string().contains("503"));
        assert!(matches!(
            classify("x", 404, "{}"),
            NovaError::NotFound { .. }
        ));
    }

    #[test]
    fn server_and_migration_json() {
        let s: Server = serde_json::from_str(
            r#"{"id": "u1", "name": "vm1", "status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "compute1",
              "OS-EXT-STS:task_state": null, "OS-EXT-STS:vm_state": "active", "locked": false,
              "metadata": {"ax:level": "ha"}, "flavor": {"vcpus": 1}}"#,
        )
        .unwrap();
        assert_eq!(s.host.as_deref(), Some("compute1"));
        assert_eq!(s.metadata["ax:level"], "ha");
        let m: Migration = serde_json::from_str(
            r#"{"id": 3, "uuid": "x", "instance_uuid": "u1", "source_compute": "compute1",
               "dest_compute": "compute2", "status": "done", "migration_type": "evacuation",
               "created_at": "2026-11-22T07:00:00.000000"}"#,
        )
        .unwrap();
        assert_eq!(m.status, "done");
    }

    #[test]
    fn encoding() {
        assert_eq!(enc("compute-1.example"), "compute-1.example");
        assert_eq!(enc("a b&c"), "a%20b%26c");
    }

    #[test]
    fn settings_in_toml() {
        let s: NovaSettings = toml::from_str("evacuate_mode = \"stopped\"").unwrap();
        assert_eq!(s.evacuate_mode, EvacuateMode::Stopped);
        assert_eq!(s.poll_interval_ms, 500);
        assert!(toml::from_str::<NovaSettings>("evacuate_mode = \"maybe\"").is_err());
    }
}
