//! The REST API (axum, JSON). Documented by `ax-agent/openapi.json`, which `GET /openapi.json` serves
//! byte for byte; [`ROUTES`] lists what the router serves and a test checks both agree.
//!
//! Errors are JSON `{"error": "…", "field": "…"}` (`field` for bad input). Input is parsed by hand from
//! a JSON value so that every error names its field; nothing a client sends produces a 5xx.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use policy::{EventQuery, Level};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::actuator::{HostView, StandbyPorts, StandbyRequest};
use super::{Daemon, LocalRole, OpError, VmDef, VmRecordLocal};
use crate::control::{GuestEndKind, SyncInfo, WorkerRequest};

/// The OpenAPI document, as kept in the repository.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Every route the router serves: (method, path template).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/v1/vms"),
    ("POST", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("DELETE", "/v1/vms/{name}"),
    ("PUT", "/v1/vms/{name}/level"),
    ("POST", "/v1/vms/{name}/start"),
    ("POST", "/v1/vms/{name}/stop"),
    ("POST", "/v1/vms/{name}/migrate"),
    ("PUT", "/v1/incoming/{name}"),
    ("DELETE", "/v1/incoming/{name}"),
    ("POST", "/v1/incoming/{name}/finish"),
    ("GET", "/v1/vms/{name}/console"),
    ("POST", "/v1/vms/{name}/volume/replicate"),
    ("GET", "/v1/events"),
    ("GET", "/v1/hosts"),
    ("GET", "/v1/host"),
    ("PUT", "/v1/standbys/{name}"),
    ("DELETE", "/v1/standbys/{name}"),
    ("GET", "/v1/recoveries"),
    ("POST", "/v1/hosts/{host}/enable"),
    ("POST", "/v1/takeovers/{name}"),
];

/// Limits of a VM definition.
pub const MAX_MEMORY_MIB: u64 = 16384;
/// Smallest memory (the guest image is loaded at 4 MiB, stacks above).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most vCPUs.
pub const MAX_VCPUS: u64 = 16;
/// Largest disk.
pub const MAX_DISK_MIB: u64 = 65536;

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }
    fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Invalid { field, message } => ApiError::field(&field, message),
            OpError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            OpError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            OpError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
            OpError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

impl From<policy::EngineError> for ApiError {
    fn from(e: policy::EngineError) -> Self {
        OpError::from(e).into()
    }
}

impl From<policy::StoreError> for ApiError {
    fn from(e: policy::StoreError) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Clone)]
struct AppState {
    d: Daemon,
    token: std::sync::Arc<String>,
}

/// The router: public health, OpenAPI and metrics routes; everything under `/v1` needs the bearer
/// token.
pub fn router(d: Daemon, token: String) -> Router {
    let state = AppState {
        d,
        token: std::sync::Arc::new(token),
    };
    let v1 = Router::new()
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(delete_vm))
        .route("/v1/vms/{name}/level", put(set_level))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route(
            "/v1/incoming/{name}",
            put(put_incoming).delete(delete_incoming),
        )
        .route("/v1/incoming/{name}/finish", post(finish_incoming))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/volume/replicate", post(replicate_volume))
        .route("/v1/events", get(events))
        .route("/v1/hosts", get(hosts))
        .route("/v1/host", get(host))
        .route("/v1/recoveries", get(recoveries))
        .route("/v1/hosts/{host}/enable", post(enable_host))
        .route("/v1/takeovers/{name}", post(takeover))
        .route(
            "/v1/standbys/{name}",
            put(put_standby).delete(delete_standby),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such route (see /openapi.json)")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed (see /openapi.json)",
            )
        })
        .with_state(state)
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), s.token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong bearer token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <the token file's line>)",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(s): State<AppState>) -> Response {
    let sh = &s.d.shared;
    if sh.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    if !sh.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "starting"})),
        )
            .into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let sh = &s.d.shared;
    let evacuations = match (sh.ha_engine(), sh.cfg.ha.node_socket.clone()) {
        (Ok(Some(engine)), _) => Some(Some(super::metrics::Evacuations::count(
            &engine.recoveries(),
        ))),
        (Err(_), _) => Some(None),
        (Ok(None), None) => None,
        (Ok(None), Some(socket)) => Some(
            tokio::task::spawn_blocking(move || {
                let mut answer = crate::ha::control_request_within(
                    &socket,
                    "recoveries",
                    std::time::Duration::from_secs(2),
                )
                .ok()?;
                let recs: Vec<evacuate::recovery::HostRecovery> =
                    serde_json::from_value(answer["recoveries"].take()).ok()?;
                Some(super::metrics::Evacuations::count(&recs))
            })
            .await
            .ok()
            .flatten(),
        ),
    };
    let text = super::metrics::render(&s.d, evacuations);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A transition as the API shows it.
#[derive(Debug, Serialize)]
pub struct TransitionView {
    /// From level.
    pub from: Level,
    /// To level.
    pub to: Level,
    /// forward, rolling_back or failed.
    pub phase: String,
    /// Its steps (forward) or the rollback's.
    pub steps: Vec<String>,
    /// Steps done.
    pub done: usize,
    /// The step running now, if known.
    pub step: Option<String>,
    /// Initial-sync progress.
    pub progress: Option<SyncInfo>,
    /// Started (ms).
    pub started_ms: u64,
    /// Why it is rolling back or failed.
    pub reason: Option<String>,
}

fn transition_view(t: &policy::Transition, live: Option<super::Progress>) -> TransitionView {
    let (steps, done) = match t.phase {
        policy::Phase::Forward => (&t.steps, t.cursor),
        _ => (&t.rollback, t.rollback_cursor),
    };
    let phase = serde_json::to_value(t.phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    TransitionView {
        from: t.from,
        to: t.to,
        phase,
        steps: steps.iter().map(|s| s.to_string()).collect(),
        done,
        step: live
            .as_ref()
            .and_then(|p| p.step.clone())
            .or_else(|| t.next_step().map(|s| s.to_string())),
        progress: live.and_then(|p| p.sync),
        started_ms: t.started_ms,
        reason: t.reason.clone(),
    }
}

fn vm_view(d: &Daemon, rec: &VmRecordLocal) -> Value {
    let sh = &d.shared;
    let name = &rec.def.name;
    let pol = sh.store.vm(name).ok().flatten().unwrap_or_default();
    let st = sh.status(name);
    let ended = rec.guest_end.as_ref().filter(|_| !rec.running);
    let state = if let Some(r) = &rec.down_reason {
        if r.starts_with("moved") {
            "moved"
        } else {
            "crashed"
        }
    } else if let Some(end) = ended {
        if end.crashed() {
            "crashed"
        } else {
            "exited"
        }
    } else if !rec.running {
        "stopped"
    } else {
        match st.as_ref().map(|s| s.role.as_str()) {
            None | Some("starting") => "starting",
            Some("standby") | Some("secondary") => "standby",
            Some("paused") => "paused",
            Some("incoming") => "incoming",
            Some(_) => "running",
        }
    };
    let (role, host, peer) = match &rec.role {
        LocalRole::Primary => (
            "primary",
            sh.cfg.host.clone(),
            st.as_ref()
                .and_then(|s| s.peer.clone())
                .or(rec.secondary.clone()),
        ),
        LocalRole::Standby { primary, .. } => {
            ("secondary", primary.clone(), Some(sh.cfg.host.clone()))
        }
    };
    let protected = st
        .as_ref()
        .is_some_and(|s| s.role == "protected" && s.sync.as_ref().is_none_or(|y| y.done));
    let (_, _, output) = sh.worker_addrs(rec.slot, rec.def.output_port);
    json!({
        "name": name,
        "engine": rec.def.engine(),
        "qemu": rec.def.qemu,
        "ft_capable": rec.def.qemu.as_ref().map(|q| q.colo),
        "guest": rec.def.guest,
        "memory_mib": rec.def.memory_mib,
        "vcpus": rec.def.vcpus,
        "disk_mib": rec.def.disk_mib,
        "guest_args": rec.def.guest_args,
        "nova_server": rec.def.nova_server,
        "nova_tag": sh.nova_tag(name),
        "output": output.to_string(),
        "state": state,
        "exit_code": ended.and_then(|e| match e.kind {
            GuestEndKind::Exited { code } => Some(code),
            GuestEndKind::Crashed { .. } => None,
        }),
        "crash": ended.and_then(|e| match &e.kind {
            GuestEndKind::Crashed { reason } => Some(reason.clone()),
            GuestEndKind::Exited { .. } => None,
        }),
        "last_guest_end": rec.guest_end,
        "on_exit": rec.def.on_exit,
        "guest_elf_sha256": rec.def.guest_elf_sha256,
        "down_reason": rec.down_reason,
        // A standby is the secondary of an FT VM whatever this host's store says.
        "level": if matches!(rec.role, LocalRole::Standby { .. }) { Level::Ft } else { pol.current },
        "desired_level": pol.desired,
        "role": role,
        "host": host,
        "peer": peer,
        "protected": protected,
        "epoch": st.as_ref().filter(|s| s.role == "protected").map(|s| s.epoch_sent),
        "generation": st.as_ref().and_then(|s| s.generation),
        "stun_p99_us": st.as_ref().and_then(|s| s.stun_p99_us()),
        "ack_lag": st.as_ref().filter(|s| s.role == "protected").map(|s| s.ack_lag()),
        "bytes_sent": st.as_ref().map_or(0, |s| s.bytes_sent),
        "output_bytes": st.as_ref().and_then(|s| s.output_bytes),
        "last_failover_ms": rec.last_failover_ms,
        "restarts": rec.restarts.len(),
        "transition": pol.transition.as_ref().map(|t| transition_view(t, sh.progress(name))),
        "last_error": pol.last_error,
        "migration": lock_migrations(sh).get(name).cloned(),
        "volume": sh.volumes.as_ref().and_then(|v| v.status(name)).map(|mut v| {
            // Replication runs while the record says so; the status may outlive it.
            if !rec.volume { v.running = None; }
            json!({"replicating": rec.volume, "status": v})
        }),
    })
}

fn lock_migrations(
    sh: &super::Shared,
) -> std::sync::MutexGuard<'_, BTreeMap<String, super::migrate::MigrationView>> {
    sh.migrations.lock().unwrap_or_else(|p| p.into_inner())
}

fn record(d: &Daemon, name: &str) -> ApiResult<VmRecordLocal> {
    d.shared
        .record(name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no VM named {name:?}")))
}

async fn list_vms(State(s): State<AppState>) -> Json<Value> {
    let vms: Vec<Value> =
        s.d.shared
            .records()
            .iter()
            .map(|r| vm_view(&s.d, r))
            .collect();
    Json(json!({ "vms": vms }))
}

async fn show_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let rec = record(&s.d, &name)?;
    Ok(Json(vm_view(&s.d, &rec)))
}

/// Parses a JSON object body.
fn object(body: &Bytes) -> ApiResult<Map<String, Value>> {
    if body.is_empty() {
        return Err(ApiError::field("body", "a JSON object is required"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::field("body", "must be a JSON object")),
        Err(e) => Err(ApiError::field("body", format!("not valid JSON: {e}"))),
    }
}

fn only_fields(m: &Map<String, Value>, allowed: &[&str]) -> ApiResult<()> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::field(
            k,
            format!(
                "unknown field {k:?} (expected one of {})",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn u64_field(m: &Map<String, Value>, f: &str, default: u64, min: u64, max: u64) -> ApiResult<u64> {
    let v = match m.get(f) {
        None | Some(Value::Null) => return Ok(default),
        Some(v) => v,
    };
    let n = v
        .as_u64()
        .ok_or_else(|| ApiError::field(f, format!("{f} must be a whole number, got {v}")))?;
    if !(min..=max).contains(&n) {
        return Err(ApiError::field(
            f,
            format!("{f} = {n} is out of range ({min}–{max})"),
        ));
    }
    Ok(n)
}

fn str_field<'a>(m: &'a Map<String, Value>, f: &str) -> ApiResult<Option<&'a str>> {
    match m.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ApiError::field(f, format!("{f} must be a string, got {v}"))),
    }
}

/// Checks a VM name: 1–40 of `[a-z0-9._-]`, starting with a letter or digit.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 40 || !ok_chars || !first_ok {
        return Err(format!(
            "name {name:?}: 1 to 40 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

fn bool_field(m: &Map<String, Value>, f: &str, default: bool) -> ApiResult<bool> {
    match m.get(f) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::field(
            f,
            format!("{f} must be true or false, got {v}"),
        )),
    }
}

/// A parsed `POST /v1/vms` body.
#[derive(Debug)]
pub struct CreateRequest {
    /// The definition (output port 0 = choose).
    pub def: VmDef,
    /// Start it now.
    pub start: bool,
    /// The uploaded guest ELF (`guest_elf`, base64), validated by the loader.
    pub elf: Option<Vec<u8>>,
}

/// Decodes and validates an uploaded guest ELF (`field`: base64 of a static ELF64 guest) for a VM of
/// `memory_mib` MiB and `vcpus` vCPUs: the loader's own error, naming the field, when it is refused.
pub fn parse_guest_elf(v: &Value, field: &str, memory_mib: u64, vcpus: u8) -> ApiResult<Vec<u8>> {
    use base64::Engine as _;
    let text = v.as_str().ok_or_else(|| {
        ApiError::field(
            field,
            format!("{field} must be the guest ELF in base64, got {v}"),
        )
    })?;
    if text.len() as u64 > crate::guest::MAX_ELF_BYTES / 3 * 4 + 4 {
        return Err(ApiError::field(
            field,
            format!(
                "{field}: more than the {} bytes accepted",
                crate::guest::MAX_ELF_BYTES
            ),
        ));
    }
    let elf = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::field(field, format!("{field} is not valid base64: {e}")))?;
    crate::guest::validate(&elf, memory_mib, vcpus)
        .map_err(|e| ApiError::field(field, format!("{field}: the loader refuses it: {e}")))?;
    Ok(elf)
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses and validates a `POST /v1/vms` body.
pub fn parse_create(body: &Bytes) -> ApiResult<CreateRequest> {
    let m = object(body)?;
    only_fields(
        &m,
        &[
            "name",
            "guest",
            "memory_mib",
            "vcpus",
            "disk_mib",
            "guest_args",
            "start",
            "restore_volume",
            "nova_server",
            "guest_elf",
            "on_exit",
            "engine",
            "qemu",
        ],
    )?;
    let name = str_field(&m, "name")?.ok_or_else(|| ApiError::field("name", "name is required"))?;
    check_vm_name(name).map_err(|e| ApiError::field("name", e))?;
    match str_field(&m, "engine")? {
        None | Some("native") => {
            if m.get("qemu").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::field(
                    "qemu",
                    "a qemu definition needs engine \"qemu\"",
                ));
            }
        }
        Some("qemu") => return parse_create_qemu(&m, name),
        Some(e) => {
            return Err(ApiError::field(
                "engine",
                format!("engine {e:?}: expected \"native\" or \"qemu\""),
            ))
        }
    }
    let memory_mib = u64_field(&m, "memory_mib", 64, MIN_MEMORY_MIB, MAX_MEMORY_MIB)?;
    let vcpus = u64_field(&m, "vcpus", 1, 1, MAX_VCPUS)? as u8;
    let elf = match m.get("guest_elf") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_guest_elf(v, "guest_elf", memory_mib, vcpus)?),
    };
    let guest = match (str_field(&m, "guest")?, &elf) {
        (None, Some(_)) | (Some("elf"), Some(_)) => "elf",
        (Some(g), Some(_)) => {
            return Err(ApiError::field(
                "guest",
                format!("guest {g:?} and guest_elf together: give one (guest_elf alone uploads your own guest)"),
            ))
        }
        (g, None) => {
            let g = g.unwrap_or("counter");
            if ax_guests::by_name(g).is_none() {
                return Err(ApiError::field(
                    "guest",
                    format!(
                        "unknown guest {g:?}: the guest kit has {}; upload your own with guest_elf",
                        ax_guests::NAMES.join(", ")
                    ),
                ));
            }
            g
        }
    };
    let on_exit = match str_field(&m, "on_exit")? {
        None => super::OnExit::Stop,
        Some(v) => v
            .parse()
            .map_err(|e: String| ApiError::field("on_exit", e))?,
    };
    let disk_mib = u64_field(&m, "disk_mib", 0, 0, MAX_DISK_MIB)?;
    let guest_args = match m.get("guest_args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            if a.len() > 8 {
                return Err(ApiError::field("guest_args", "at most 8 guest arguments"));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64().ok_or_else(|| {
                        ApiError::field(
                            "guest_args",
                            format!("guest_args[{i}] must be a whole number, got {v}"),
                        )
                    })
                })
                .collect::<ApiResult<Vec<u64>>>()?
        }
        Some(v) => {
            return Err(ApiError::field(
                "guest_args",
                format!("guest_args must be an array of whole numbers, got {v}"),
            ))
        }
    };
    let nova_server = str_field(&m, "nova_server")?
        .map(|id| {
            super::check_nova_server(id)
                .map(|()| id.to_string())
                .map_err(|e| ApiError::field("nova_server", e))
        })
        .transpose()?;
    let start = bool_field(&m, "start", true)?;
    Ok(CreateRequest {
        def: VmDef {
            name: name.to_string(),
            guest: guest.to_string(),
            memory_mib,
            vcpus,
            disk_mib,
            guest_args,
            output_port: 0,
            nova_server,
            guest_elf_sha256: elf.as_deref().map(sha256_hex),
            on_exit,
            qemu: None,
        },
        start,
        elf,
    })
}

/// The default memory of a QEMU VM, MiB (a small Linux guest).
const QEMU_DEFAULT_MEMORY_MIB: u64 = 256;

/// `POST /v1/vms` with `engine` `qemu`: the VM's QEMU definition in `qemu`.
fn parse_create_qemu(m: &Map<String, Value>, name: &str) -> ApiResult<CreateRequest> {
    for f in ["guest", "guest_elf", "guest_args", "disk_mib"] {
        if m.get(f).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::field(
                f,
                format!("{f} is for native VMs; a QEMU VM's boot source and disks are in \"qemu\""),
            ));
        }
    }
    let q = match m.get("qemu") {
        None | Some(Value::Null) => {
            return Err(ApiError::field(
                "qemu",
                "engine \"qemu\" needs a qemu definition: {\"kernel\": …} or {\"image\": …}",
            ))
        }
        Some(v) => v,
    };
    if q.get("extra_args").is_some() {
        return Err(ApiError::field(
            "qemu.extra_args",
            "free-form QEMU arguments are not taken through the API (the agent's [qemu] extra_args is the escape hatch)",
        ));
    }
    // `ft_capable` is the API's name for the definition's `colo` (what COLO needs from the start).
    let mut q = q.clone();
    let ft_capable = match q.as_object_mut().and_then(|o| o.remove("ft_capable")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(v) => {
            return Err(ApiError::field(
                "qemu.ft_capable",
                format!("qemu.ft_capable must be true or false, got {v}"),
            ))
        }
    };
    let mut def: ax_qemu::def::QemuDef =
        serde_json::from_value(q).map_err(|e| ApiError::field("qemu", format!("qemu: {e}")))?;
    def.colo |= ft_capable;
    let restore = bool_field(m, "restore_volume", false)?;
    if restore {
        // Every disk is written by the restore: none may exist yet (ax never overwrites an
        // operator's file); the rest is checked now.
        let disks = def.all_disks();
        if disks.is_empty() {
            return Err(ApiError::field(
                "restore_volume",
                "restore_volume restores a QEMU VM's disks: name where they go as qemu.image and/or qemu.disks (files that do not exist yet)",
            ));
        }
        for (i, (_, path)) in disks.iter().enumerate() {
            if !path.is_absolute() || path.exists() || disks[..i].iter().any(|(_, p)| p == path) {
                return Err(ApiError::field(
                    "restore_volume",
                    format!(
                        "restore_volume writes disk{i} of the restored volume to {}: it must be an absolute path that does not exist yet (and is named once)",
                        path.display()
                    ),
                ));
            }
        }
        let mut rest = def.clone();
        rest.image = None;
        rest.disks.clear();
        if rest.image.is_none() && rest.kernel.is_none() {
            // Booting from the restored image: only the shape of what remains can be checked.
            rest.check_shape().or_else(|e| match e {
                ax_qemu::def::DefError::NoBootSource => Ok(()),
                e => Err(e),
            })
        } else {
            rest.check_host()
        }
        .map_err(|e| ApiError::field("qemu", format!("qemu: {e}")))?;
    } else {
        def.check_host()
            .map_err(|e| ApiError::field("qemu", format!("qemu: {e}")))?;
    }
    let memory_mib = u64_field(
        m,
        "memory_mib",
        QEMU_DEFAULT_MEMORY_MIB,
        MIN_MEMORY_MIB,
        MAX_MEMORY_MIB,
    )?;
    let vcpus = u64_field(m, "vcpus", 1, 1, MAX_VCPUS)? as u8;
    let on_exit = match str_field(m, "on_exit")? {
        None => super::OnExit::Stop,
        Some(v) => v
            .parse()
            .map_err(|e: String| ApiError::field("on_exit", e))?,
    };
    let nova_server = str_field(m, "nova_server")?
        .map(|id| {
            super::check_nova_server(id)
                .map(|()| id.to_string())
                .map_err(|e| ApiError::field("nova_server", e))
        })
        .transpose()?;
    Ok(CreateRequest {
        def: VmDef {
            name: name.to_string(),
            guest: "qemu".to_string(),
            memory_mib,
            vcpus,
            disk_mib: 0,
            guest_args: Vec::new(),
            output_port: 0,
            nova_server,
            guest_elf_sha256: None,
            on_exit,
            qemu: Some(def),
        },
        start: bool_field(m, "start", true)?,
        elf: None,
    })
}

fn refuse_draining(d: &Daemon) -> ApiResult<()> {
    if d.shared.draining.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        ));
    }
    Ok(())
}

async fn create_vm(State(s): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let CreateRequest {
        mut def,
        start,
        elf,
    } = parse_create(&body)?;
    let restore = bool_field(&object(&body)?, "restore_volume", false)?;
    refuse_draining(&s.d)?;
    let sh = &s.d.shared;
    let _g = sh.create.lock().await;
    if sh.record(&def.name).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("a VM named {:?} exists", def.name),
        ));
    }
    if let Some(id) = &def.nova_server {
        if let Some(other) = sh
            .records()
            .iter()
            .find(|r| r.def.nova_server.as_ref() == Some(id))
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{} already stands for Nova server {id} (one VM per server)",
                    other.def.name
                ),
            ));
        }
    }
    def.output_port = sh.free_output_port()?;
    let restored = match (restore, &def.qemu) {
        (true, Some(q)) => Some(super::volume::restore_qemu_disks(sh, &def.name, q).await?),
        (true, None) => Some(super::volume::restore_disk(sh, &mut def).await?),
        (false, _) => None,
    };
    let rec = VmRecordLocal::new(
        def.clone(),
        LocalRole::Primary,
        start,
        sh.free_slot()?,
        false,
    );
    if let Some(elf) = &elf {
        store_guest_elf(sh, &def.name, elf)?;
    }
    sh.insert(rec.clone())?;
    sh.note(
        &def.name,
        match &def.qemu {
            Some(q) => format!(
                "defined: QEMU VM, {} MiB, {} vCPU(s), {} disk(s), {} NIC(s), accel {:?}",
                def.memory_mib,
                def.vcpus,
                q.all_disks().len(),
                q.nics.len(),
                q.accel
            ),
            None => format!(
                "defined: guest {}, {} MiB, {} vCPU(s), disk {} MiB, output port {}",
                def.guest, def.memory_mib, def.vcpus, def.disk_mib, def.output_port
            ),
        },
    );
    if let (Some(version), Some(v)) = (restored, &sh.volumes) {
        sh.note(
            &def.name,
            format!("disk restored from version {version} at {}", v.target),
        );
    }
    if let Some(id) = &def.nova_server {
        let reads = sh.cfg.openstack.as_ref().is_some_and(|o| o.nova_tagging);
        sh.note(
            &def.name,
            if reads {
                format!("stands for Nova server {id}: its ax:level metadata sets the level")
            } else {
                format!(
                    "stands for Nova server {id} (its ax:level is not read: [openstack] nova_tagging is off)"
                )
            },
        );
    }
    if start {
        sh.spawn_worker(&def.name)?;
        sh.note(&def.name, "started");
    }
    Ok((StatusCode::CREATED, Json(vm_view(&s.d, &rec))).into_response())
}

/// Stores an uploaded guest ELF in `vm`'s directory (before its record exists).
fn store_guest_elf(sh: &super::Shared, vm: &str, elf: &[u8]) -> ApiResult<()> {
    let dir = sh.vm_dir(vm);
    std::fs::create_dir_all(&dir)
        .and_then(|()| crate::worker::write_atomic(&dir.join(super::GUEST_ELF), elf))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storing the guest ELF of {vm}: {e}"),
            )
        })
}

/// Replicates the VM's disk now (`202`): the status shows the progress and the new version.
async fn replicate_volume(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let rec = record(&s.d, &name)?;
    let sh = &s.d.shared;
    let Some(v) = &sh.volumes else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no volume replication target is configured ([swift] or [sheepdog])",
        ));
    };
    if !rec.volume || !rec.def.has_disk() || !rec.running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{name}'s disk is not replicated here (it needs a disk, level ha or ft, and to run on this host)"
            ),
        ));
    }
    v.ask(&name);
    Ok((StatusCode::ACCEPTED, Json(vm_view(&s.d, &rec))))
}

/// 409 unless `rec` is a primary here, below level ft and not changing level (`lower` says to which
/// level the operator should set it first).
fn primary_at_rest(d: &Daemon, rec: &VmRecordLocal, lower: &str) -> ApiResult<()> {
    let name = &rec.def.name;
    if let LocalRole::Standby { primary, .. } = &rec.role {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name} is a standby for {primary}: its primary's agent manages it"),
        ));
    }
    let pol = d.shared.store.vm(name)?.unwrap_or_default();
    if pol.transition.is_some() || pol.current == Level::Ft {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{name} is at level {} or changing level: set it to {lower} first",
                pol.current
            ),
        ));
    }
    Ok(())
}

async fn delete_vm(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult<StatusCode> {
    if let Some(k) = q.keys().find(|k| k.as_str() != "force") {
        return Err(ApiError::field(
            k,
            format!("unknown query parameter {k:?} (force)"),
        ));
    }
    let force = match q.get("force").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::field(
                "force",
                format!("force must be true or false, got {v:?}"),
            ))
        }
    };
    let rec = record(&s.d, &name)?;
    let sh = &s.d.shared;
    // An FT VM whose guest ended is over: deleting it releases its (ended) standby too.
    let ended_ft = !rec.running && rec.guest_end.is_some() && rec.secondary.is_some();
    if !ended_ft {
        primary_at_rest(&s.d, &rec, "none")?;
    }
    let monitored = sh.store.vm(&name)?.unwrap_or_default().current != Level::None;
    if rec.running && sh.worker_alive(&name).is_some() && monitored && !force {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{name} runs at level ha: stop it first (axctl vm stop {name}), or delete it with force \
                 (axctl vm delete {name} --force)"
            ),
        ));
    }
    if let (true, Some(host)) = (ended_ft, &rec.secondary) {
        if let Some(c) = sh.peer(host) {
            let r: Result<Value, _> = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/standbys/{name}"),
                    None::<&()>,
                )
                .await;
            if let Err(e) = r {
                if e.status() != Some(404) {
                    sh.warn_note(&name, format!("{host}: releasing the ended standby: {e}"));
                }
            }
        }
    }
    if rec.running {
        sh.stop_worker(&name).await;
    }
    s.d.engine.forget(&name)?;
    sh.remove(&name);
    sh.note(&name, "deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/vms/{name}/migrate`: live migration of a QEMU VM to another host (see [`super::migrate`]).
async fn migrate_vm(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let m = object(&body)?;
    only_fields(&m, &["to", "downtime_limit_ms", "max_bandwidth"])?;
    let to =
        str_field(&m, "to")?.ok_or_else(|| ApiError::field("to", "to (a host) is required"))?;
    let downtime = match m.get("downtime_limit_ms") {
        None | Some(Value::Null) => None,
        Some(_) => Some(u64_field(&m, "downtime_limit_ms", 300, 1, 60_000)?),
    };
    // Bytes per second of the migration stream: at least 64 KiB/s, at most 100 GiB/s.
    let bandwidth = match m.get("max_bandwidth") {
        None | Some(Value::Null) => None,
        Some(_) => Some(u64_field(&m, "max_bandwidth", 0, 64 << 10, 100 << 30)?),
    };
    record(&s.d, &name)?;
    refuse_draining(&s.d)?;
    super::migrate::start(
        &s.d,
        &name,
        to,
        super::migrate::Tuning {
            downtime_limit_ms: downtime,
            max_bandwidth: bandwidth,
        },
    )?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"vm": name, "to": to, "migration": "started"})),
    )
        .into_response())
}

/// `PUT /v1/incoming/{name}` (from the source's agent): prepares this host as a live migration's
/// destination and answers where it listens.
async fn put_incoming(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    check_vm_name(&name).map_err(|e| ApiError::field("name", e))?;
    let m = object(&body)?;
    only_fields(&m, &["source", "def", "level", "disks"])?;
    let req: super::migrate::IncomingRequest = serde_json::from_value(Value::Object(m))
        .map_err(|e| ApiError::field("body", format!("not an incoming migration: {e}")))?;
    if req.def.name != name {
        return Err(ApiError::field(
            "def",
            format!("def.name {:?} is not {name:?}", req.def.name),
        ));
    }
    refuse_draining(&s.d)?;
    let inc = super::migrate::prepare(&s.d, req).await?;
    Ok(Json(serde_json::to_value(inc).unwrap_or_default()))
}

/// `POST /v1/incoming/{name}/finish` (from the source's agent, after the switch): the guest runs here.
async fn finish_incoming(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    super::migrate::finish(&s.d, &name).await?;
    Ok(Json(json!({"vm": name, "state": "running"})))
}

/// `DELETE /v1/incoming/{name}` (from the source's agent): an incoming copy that will not run goes.
async fn delete_incoming(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    super::migrate::abandon(&s.d, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let rec = record(&s.d, &name)?;
    refuse_draining(&s.d)?;
    let sh = &s.d.shared;
    if let LocalRole::Standby { primary, .. } = &rec.role {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name} is a standby for {primary}"),
        ));
    }
    if sh.worker_alive(&name).is_some() {
        if !rec.running || rec.down_reason.is_some() {
            sh.update(&name, |r| {
                r.running = true;
                r.down_reason = None;
            })?;
        }
        return Ok(Json(vm_view(&s.d, &record(&s.d, &name)?)));
    }
    if rec
        .down_reason
        .as_deref()
        .is_some_and(|r| r.starts_with("moved"))
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{name} runs on another host now ({}); delete it here",
                rec.down_reason.unwrap_or_default()
            ),
        ));
    }
    // An FT VM whose guest ended: its standby ended with it. The VM boots again alone and is protected
    // again automatically (like a VM that failed over), to a fresh standby.
    if let (Some(host), Some(_)) = (rec.secondary.clone(), &rec.guest_end) {
        if let Some(c) = sh.peer(&host) {
            let r: Result<Value, _> = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/standbys/{name}"),
                    None::<&()>,
                )
                .await;
            if let Err(e) = r.as_ref().map(|_| ()).or_else(|e| match e.status() {
                Some(404) => Ok(()),
                _ => Err(e),
            }) {
                sh.warn_note(&name, format!("{host}: releasing the ended standby: {e}"));
            }
        }
        let mut pol = sh.store.vm(&name)?.unwrap_or_default();
        if pol.current == Level::Ft {
            pol.current = Level::Ha;
            pol.desired = Level::Ft;
            pol.secondary = None;
            pol.transition = None;
            sh.store.update(&name, Some(&pol), &[])?;
        }
        sh.update(&name, |r| r.secondary = None)?;
    }
    sh.update(&name, |r| {
        r.running = true;
        r.down_reason = None;
        r.restarts.clear();
    })?;
    sh.spawn_worker(&name)?;
    sh.note(&name, "started");
    Ok(Json(vm_view(&s.d, &record(&s.d, &name)?)))
}

async fn stop_vm(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let rec = record(&s.d, &name)?;
    let sh = &s.d.shared;
    primary_at_rest(&s.d, &rec, "ha or none")?;
    if !rec.running {
        return Ok(Json(vm_view(&s.d, &rec)));
    }
    sh.update(&name, |r| r.running = false)?;
    sh.stop_worker(&name).await;
    sh.note(&name, "stopped");
    Ok(Json(vm_view(&s.d, &record(&s.d, &name)?)))
}

async fn set_level(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    record(&s.d, &name)?;
    let m = object(&body)?;
    only_fields(&m, &["level"])?;
    let level: Level = str_field(&m, "level")?
        .ok_or_else(|| ApiError::field("level", "level is required (none, ha or ft)"))?
        .parse()
        .map_err(|e: policy::LevelError| ApiError::field("level", e.to_string()))?;
    refuse_draining(&s.d)?;
    // The two sources never fight: while the VM's Nova server carries a valid ax:level (as last read),
    // only that tag changes the level.
    if let Some(tag) = s.d.shared.nova_tag(&name) {
        if let Some(tagged) = tag.level().filter(|l| *l != level) {
            let id = &tag.server;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{name}'s level is set by ax:level={tagged} on Nova server {id}: change the tag \
                     (openstack server set --property ax:level={level} {id}) or remove it \
                     (openstack server unset --property ax:level {id})"
                ),
            ));
        }
    }
    if level == Level::Ft {
        s.d.check_qemu_ft(&name).await?;
    }
    let (r, current) = s.d.set_level(&name, level)?;
    let (status, transition) = match r {
        policy::Request::Unchanged { level } => {
            return Ok(
                Json(json!({"vm": name, "level": level, "transition": null})).into_response(),
            )
        }
        policy::Request::Started(t) => (StatusCode::ACCEPTED, transition_view(&t, None)),
        policy::Request::AlreadyRunning(t) => (
            StatusCode::ACCEPTED,
            transition_view(&t, s.d.shared.progress(&name)),
        ),
    };
    Ok((
        status,
        Json(json!({"vm": name, "level": current, "transition": transition})),
    )
        .into_response())
}

/// At most this many console bytes per answer.
const CONSOLE_CHUNK: u64 = 1 << 20;

/// `GET /v1/vms/{name}/console?offset=N`: the VM's console output (its released output stream) from
/// stream offset `N` (default: the first byte this host holds), at most 1 MiB, as raw bytes. Headers:
/// `X-Ax-Console-Base` (first offset held), `X-Ax-Console-End` (offset after the last byte so far),
/// `X-Ax-Console-Ended` (`true` once the VM has ended or stopped: no more bytes will come). Read on
/// from `offset + body length`. Also served once the VM has ended (from its console log).
async fn console(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult<Response> {
    if let Some(k) = q.keys().find(|k| k.as_str() != "offset") {
        return Err(ApiError::field(
            k,
            format!("unknown query parameter {k:?} (offset)"),
        ));
    }
    let offset = q
        .get("offset")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::field(
                    "offset",
                    format!("offset must be a whole number, got {v:?}"),
                )
            })
        })
        .transpose()?;
    let rec = record(&s.d, &name)?;
    let sh = &s.d.shared;
    let running = sh.worker_alive(&name).is_some();
    let path = sh.vm_dir(&name).join("console.log");
    let chunk = crate::output::read_console(&path, offset, CONSOLE_CHUNK).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the console log of {name}: {e}"),
        )
    })?;
    let Some(chunk) = chunk else {
        if let LocalRole::Standby { primary, .. } = &rec.role {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{name} is a standby here: its console is on its primary, {primary}"),
            ));
        }
        if let Some(at) = offset.filter(|&o| o > 0) {
            return Err(ApiError::field(
                "offset",
                format!("offset {at}: {name} has no console output yet"),
            ));
        }
        return Ok((
            [
                ("x-ax-console-base", "0".to_string()),
                ("x-ax-console-end", "0".to_string()),
                ("x-ax-console-ended", (!running).to_string()),
            ],
            Vec::<u8>::new(),
        )
            .into_response());
    };
    if let Some(at) = offset.filter(|&o| o < chunk.base || o > chunk.end) {
        return Err(ApiError::field(
            "offset",
            format!(
                "offset {at} is outside the console output held here ({}..{})",
                chunk.base, chunk.end
            ),
        ));
    }
    // Ended: nothing more will be written (the worker is gone), and this answer reaches the end.
    let ended = !running && chunk.offset + chunk.bytes.len() as u64 >= chunk.end;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-ax-console-base"),
                chunk.base.to_string(),
            ),
            (
                header::HeaderName::from_static("x-ax-console-end"),
                chunk.end.to_string(),
            ),
            (
                header::HeaderName::from_static("x-ax-console-ended"),
                ended.to_string(),
            ),
        ],
        chunk.bytes,
    )
        .into_response())
}

async fn events(
    State(s): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
) -> ApiResult<Json<Value>> {
    if let Some(k) = q
        .keys()
        .find(|k| !["since", "vm", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::field(
            k,
            format!("unknown query parameter {k:?} (since, vm, limit)"),
        ));
    }
    let num = |f: &str| -> ApiResult<Option<u64>> {
        q.get(f)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::field(f, format!("{f} must be a whole number, got {v:?}"))
                })
            })
            .transpose()
    };
    let since = num("since")?.unwrap_or(0);
    let limit = num("limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("limit = {limit} is out of range (1–1000)"),
        ));
    }
    let vm = q.get("vm").cloned();
    let evs = s.d.shared.store.events(&EventQuery {
        since,
        vm: vm.clone(),
        limit: Some(limit as usize),
    })?;
    // A VM that is not here and never had an event here: a typo, not an empty history.
    if let Some(name) = &vm {
        if evs.is_empty() && s.d.shared.record(name).is_none() {
            let any = s.d.shared.store.events(&EventQuery {
                since: 0,
                vm: vm.clone(),
                limit: Some(1),
            })?;
            if any.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no VM named {name:?} here, and no events of one"),
                ));
            }
        }
    }
    let last = s.d.shared.store.last_event_id()?;
    Ok(Json(json!({ "events": evs, "last_id": last })))
}

fn this_host(d: &Daemon) -> HostView {
    let mem = super::hostfail::HostMemory::of(&d.shared);
    HostView {
        mem_offered_mib: mem.offered_mib,
        mem_promised_mib: mem.promised_mib,
        mem_free_mib: mem.free_mib(),
        name: d.shared.cfg.host.clone(),
        ft_vms: d.shared.ft_vms(),
        max_ft_vms: d.shared.cfg.max_ft_vms_per_host,
        vms: d.shared.records().len() as u32,
        up: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

async fn host(State(s): State<AppState>) -> Json<HostView> {
    Json(this_host(&s.d))
}

/// One command to this host's HA engine — in this daemon (`ha.node_config`) or an `ax-agent ha-node`
/// (`ha.node_socket`); its answer when it says `ok`.
async fn ha_node(s: &AppState, line: String) -> ApiResult<Value> {
    let answer = ha_answer(s, line).await?;
    if answer["ok"] != Value::Bool(true) {
        let error = answer["error"].as_str().unwrap_or("failed").to_string();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("ha-node: {error}"),
        ));
    }
    Ok(answer)
}

/// The HA engine's answer to one control line, whatever it says.
async fn ha_answer(s: &AppState, line: String) -> ApiResult<Value> {
    let unavailable = |why: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why);
    if let Some(engine) = s.d.shared.ha_engine().map_err(unavailable)? {
        return Ok(crate::ha::answer(&engine, &line).await);
    }
    let Some(socket) = s.d.shared.cfg.ha.node_socket.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no HA engine on this host (neither ha.node_config nor ha.node_socket is set)",
        ));
    };
    let answer = tokio::task::spawn_blocking(move || crate::ha::control_request(&socket, &line))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("ha-node: {e}")))?;
    Ok(answer)
}

/// The HA host recoveries of this host's ha-node, each with its steps' times.
/// The Nova path's recoveries (`recoveries`, from the HA engine) and the host failures of VMs not
/// under Nova (`host_failures`, [`super::hostfail`]), whichever this host runs.
async fn recoveries(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let failures = s.d.shared.hostfail.as_ref().map(|h| h.failures());
    let nova = match ha_node(&s, "recoveries".into()).await {
        Ok(mut answer) => answer["recoveries"].take(),
        Err(e) if failures.is_none() => return Err(e),
        Err(_) => json!([]),
    };
    Ok(Json(json!({
        "recoveries": nova,
        "host_failures": failures.unwrap_or_default(),
    })))
}

/// Takes a VM of a failed, fenced host over (a peer's call, [`super::hostfail::adopt`]).
async fn takeover(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_vm_name(&name).map_err(|e| ApiError::field("name", e))?;
    refuse_draining(&s.d)?;
    let req: super::hostfail::TakeoverRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("takeover request: {e}")))?;
    if crate::certs::check_host_name(&req.from).is_err() {
        return Err(ApiError::field(
            "from",
            format!(
                "{:?} is not a host name (letters, digits, '-' and '.')",
                req.from
            ),
        ));
    }
    let rec = super::hostfail::adopt(&s.d, &name, &req.from).await?;
    Ok((StatusCode::CREATED, Json(vm_view(&s.d, &rec))))
}

/// Re-enables a recovered compute host in Nova (through the ha-node).
async fn enable_host(
    State(s): State<AppState>,
    Path(host): Path<String>,
) -> ApiResult<Json<Value>> {
    if crate::certs::check_host_name(&host).is_err() {
        return Err(ApiError::field(
            "host",
            format!("{host:?} is not a host name (letters, digits, '-' and '.')"),
        ));
    }
    let mut answer = ha_node(&s, format!("reenable {host}")).await?;
    Ok(Json(
        json!({ "host": host, "service": answer["service"].take() }),
    ))
}

async fn hosts(State(s): State<AppState>) -> Json<Value> {
    let mut all = vec![this_host(&s.d)];
    all.extend(s.d.engine.actuator().hosts().await);
    Json(json!({ "hosts": all }))
}

async fn put_standby(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<StandbyPorts>> {
    let _ = headers;
    check_vm_name(&name).map_err(|e| ApiError::field("name", e))?;
    let m = object(&body)?;
    only_fields(
        &m,
        &[
            "primary",
            "def",
            "primary_link",
            "primary_hb",
            "guest_elf",
            "qemu_version",
        ],
    )?;
    for f in ["primary", "def", "primary_link", "primary_hb"] {
        if !m.contains_key(f) {
            return Err(ApiError::field(f, format!("{f} is required")));
        }
    }
    for f in ["primary_link", "primary_hb"] {
        let ok = m[f]
            .as_str()
            .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok());
        if !ok {
            return Err(ApiError::field(
                f,
                format!("{f} must be an \"ip:port\" string, got {}", m[f]),
            ));
        }
    }
    if !m["primary"].is_string() {
        return Err(ApiError::field(
            "primary",
            format!("primary must be a host name, got {}", m["primary"]),
        ));
    }
    let mut req: StandbyRequest = serde_json::from_value(Value::Object(m.clone()))
        .map_err(|e| ApiError::field("def", format!("def: {e}")))?;
    if let Some(id) = &req.def.nova_server {
        super::check_nova_server(id).map_err(|e| ApiError::field("def", format!("def.{e}")))?;
    }
    if req.def.name != name {
        return Err(ApiError::field(
            "def",
            format!(
                "def.name {:?} differs from the path's {name:?}",
                req.def.name
            ),
        ));
    }
    let elf = match (&req.def.guest_elf_sha256, &req.guest_elf) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::field(
                "guest_elf",
                "guest_elf without def.guest_elf_sha256",
            ))
        }
        (Some(_), None) => {
            return Err(ApiError::field(
                "guest_elf",
                "def.guest_elf_sha256 is set: the guest ELF is required",
            ))
        }
        (Some(sum), Some(b64)) => {
            let elf = parse_guest_elf(
                &Value::String(b64.clone()),
                "guest_elf",
                req.def.memory_mib,
                req.def.vcpus,
            )?;
            if sha256_hex(&elf) != *sum {
                return Err(ApiError::field(
                    "guest_elf",
                    "guest_elf does not match def.guest_elf_sha256",
                ));
            }
            Some(elf)
        }
    };
    let sh = &s.d.shared;
    if sh.cfg.peer(&req.primary).is_none() {
        return Err(ApiError::field(
            "primary",
            format!(
                "{} is not a configured peer of {}",
                req.primary, sh.cfg.host
            ),
        ));
    }
    refuse_draining(&s.d)?;
    if let Some(q) = &req.def.qemu {
        // A COLO secondary: this host's QEMU must run COLO, at the primary's version; its disks are
        // this host's copies, in the VM's directory (as a migration's destination places them).
        let here = s.d.shared.colo_support(q).await.map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("{} cannot hold a COLO secondary: {e}", sh.cfg.host),
            )
        })?;
        if let Some(there) = req.qemu_version.as_deref().filter(|v| *v != here) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{} runs QEMU {here}, the primary {} QEMU {there}: COLO needs the same version on both hosts",
                    sh.cfg.host, req.primary
                ),
            ));
        }
        req.def.qemu = Some(super::colo_standby_disks(q, &sh.vm_dir(&name)));
    }
    let _g = sh.create.lock().await;
    let role = LocalRole::Standby {
        primary: req.primary.clone(),
        primary_link: req.primary_link,
        primary_hb: req.primary_hb,
    };
    let ports = |rec: &VmRecordLocal| StandbyPorts {
        link_port: sh.cfg.ports.link + rec.slot,
        hb_port: sh.cfg.ports.heartbeat + rec.slot,
    };
    if let Some(rec) = sh.record(&name).filter(|r| moved_away(sh, r)) {
        // This host ran the VM until it failed over to another host (this host died or was
        // fenced); its copy is stale. The new primary re-protects the VM here: the old record
        // makes way for the standby.
        s.d.engine.forget(&name)?;
        sh.remove(&name);
        sh.note(
            &name,
            format!(
                "was {} here; it runs on {} now, which makes this host its standby",
                rec.down_reason.unwrap_or_default(),
                req.primary
            ),
        );
    }
    if let Some(rec) = sh.record(&name) {
        match &rec.role {
            LocalRole::Standby { primary, .. } if *primary == req.primary && rec.def == req.def => {
                if sh.worker_alive(&name).is_none() {
                    sh.update(&name, |r| {
                        r.running = true;
                        r.down_reason = None;
                        r.role = role;
                    })?;
                    sh.spawn_worker(&name)?;
                }
                return Ok(Json(ports(&rec)));
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("{} already has a VM named {name}", sh.cfg.host),
                ))
            }
        }
    }
    if sh
        .records()
        .iter()
        .any(|r| r.def.output_port == req.def.output_port)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "output port {} is taken on {}",
                req.def.output_port, sh.cfg.host
            ),
        ));
    }
    let rec = VmRecordLocal::new(req.def.clone(), role, true, sh.free_slot()?, true);
    if let Some(elf) = &elf {
        store_guest_elf(sh, &name, elf)?;
    }
    sh.insert(rec.clone())?;
    sh.spawn_worker(&name)?;
    sh.note(&name, format!("standby for {} started", req.primary));
    Ok(Json(ports(&rec)))
}

/// A primary record of a VM that runs on another host now (marked `moved`, no worker): what a host
/// that died or was fenced finds when it comes back.
fn moved_away(sh: &crate::daemon::Shared, rec: &VmRecordLocal) -> bool {
    matches!(rec.role, LocalRole::Primary)
        && rec
            .down_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("moved"))
        && sh.worker_alive(&rec.def.name).is_none()
}

async fn delete_standby(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let rec = record(&s.d, &name)?;
    let sh = &s.d.shared;
    let LocalRole::Standby { primary, .. } = &rec.role else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{name} is not a standby on {} (it is a primary here)",
                sh.cfg.host
            ),
        ));
    };
    let primary = primary.clone();
    sh.update(&name, |r| r.running = false)?;
    let _ = sh.worker_call(&name, &WorkerRequest::Stop).await;
    sh.stop_worker(&name).await;
    sh.remove(&name);
    sh.note(&name, format!("standby for {primary} released"));
    Ok(StatusCode::NO_CONTENT)
}
