//! Keystone v3 password authentication: a token, its expiry and the service catalog.
//!
//! [`Keystone`] issues a project-scoped token with `POST {auth_url}/v3/auth/tokens` (the token is the
//! `X-Subject-Token` response header, the expiry and the catalog are in the body), keeps it, and issues a
//! new one when less than [`KeystoneSettings::renew_before_secs`] of its lifetime is left, or after a
//! service answered 401 ([`TokenSource::invalidate`]). The lifetime is measured as the server's
//! `expires_at − issued_at` from the moment the request was sent, on the local monotonic clock, so a
//! skewed wall clock on either side changes nothing.
//!
//! Settings come from a serde struct ([`KeystoneSettings`], to be embedded in the agent's TOML), from the
//! `OS_*` environment variables an `openrc` file sets ([`KeystoneSettings::from_env_map`]), or from a
//! `clouds.yaml` ([`KeystoneSettings::from_clouds_yaml`], searched in the usual places by
//! [`KeystoneSettings::from_clouds_file`]). [`KeystoneSettings::discover`] tries the environment, then
//! `clouds.yaml`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info, info_span, Instrument};

use crate::auth::{AuthError, Token, TokenSource};

/// Errors of the Keystone settings and client.
#[derive(Debug, thiserror::Error)]
pub enum KeystoneError {
    /// A required setting is missing.
    #[error("keystone settings from {source_name}: missing {field}")]
    Missing {
        /// Where the settings came from (`environment`, a file path, …).
        source_name: String,
        /// The missing field or variable.
        field: String,
    },
    /// A setting has an unusable value.
    #[error("keystone settings from {source_name}: {field} = {value:?}: {why}")]
    Invalid {
        /// Where the settings came from.
        source_name: String,
        /// The field.
        field: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `clouds.yaml` could not be read or parsed.
    #[error("clouds.yaml {path}: {message}")]
    CloudsYaml {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// No `clouds.yaml` names the cloud.
    #[error("cloud {cloud:?} not found in any clouds.yaml (looked at {looked})")]
    NoCloud {
        /// The cloud name.
        cloud: String,
        /// The files looked at.
        looked: String,
    },
    /// Authentication failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The catalog has no endpoint of that service type, interface and region.
    #[error("no {service_type} endpoint with interface {interface} in region {region:?} in the catalog (services: {services})")]
    NoEndpoint {
        /// The service type asked for.
        service_type: String,
        /// The interface asked for.
        interface: String,
        /// The region asked for (any if `None`).
        region: Option<String>,
        /// The service types the catalog has.
        services: String,
    },
}

fn default_domain() -> String {
    "Default".into()
}
fn default_interface() -> String {
    "public".into()
}
fn default_renew() -> u64 {
    300
}
fn default_timeout() -> u64 {
    30
}

/// How to authenticate against Keystone v3 with a password, scoped to a project.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeystoneSettings {
    /// The identity endpoint, with or without the trailing `/v3` (`http://keystone:5000/v3`).
    pub auth_url: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// The user's domain name (default `Default`).
    #[serde(default = "default_domain")]
    pub user_domain_name: String,
    /// Project to scope the token to.
    pub project_name: String,
    /// The project's domain name (default `Default`).
    #[serde(default = "default_domain")]
    pub project_domain_name: String,
    /// Region for endpoint selection (any region if unset).
    #[serde(default)]
    pub region_name: Option<String>,
    /// Endpoint interface: `public`, `internal` or `admin` (default `public`).
    #[serde(default = "default_interface")]
    pub interface: String,
    /// A PEM CA bundle to trust in addition to the built-in roots.
    #[serde(default)]
    pub cacert: Option<PathBuf>,
    /// Accept any server certificate (clouds.yaml `verify: false`; tests only).
    #[serde(default)]
    pub insecure: bool,
    /// Re-issue the token when less than this many seconds of its lifetime are left (default 300).
    #[serde(default = "default_renew")]
    pub renew_before_secs: u64,
    /// Timeout of one HTTP request, in seconds (default 30).
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
}

impl std::fmt::Debug for KeystoneSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeystoneSettings")
            .field("auth_url", &self.auth_url)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .field("user_domain_name", &self.user_domain_name)
            .field("project_name", &self.project_name)
            .field("project_domain_name", &self.project_domain_name)
            .field("region_name", &self.region_name)
            .field("interface", &self.interface)
            .field("cacert", &self.cacert)
            .field("insecure", &self.insecure)
            .finish_non_exhaustive()
    }
}

impl KeystoneSettings {
    /// Settings from the current process environment ([`Self::from_env_map`]).
    pub fn from_env() -> Result<Self, KeystoneError> {
        Self::from_env_map(&std::env::vars().collect())
    }

    /// Settings from `OS_*` variables: `OS_AUTH_URL`, `OS_USERNAME`, `OS_PASSWORD`, `OS_PROJECT_NAME`
    /// (or `OS_TENANT_NAME`), `OS_USER_DOMAIN_NAME`, `OS_PROJECT_DOMAIN_NAME` (both default to `Default`),
    /// `OS_REGION_NAME`, `OS_INTERFACE` (or `OS_ENDPOINT_TYPE`, with or without the `URL` suffix),
    /// `OS_CACERT`, `OS_INSECURE`.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<Self, KeystoneError> {
        let src = "environment";
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let need = |k: &str| {
            get(k).ok_or_else(|| KeystoneError::Missing {
                source_name: src.into(),
                field: k.into(),
            })
        };
        if let Some(v) = get("OS_IDENTITY_API_VERSION") {
            if v != "3" {
                return Err(KeystoneError::Invalid {
                    source_name: src.into(),
                    field: "OS_IDENTITY_API_VERSION".into(),
                    value: v,
                    why: "only Keystone v3 is supported".into(),
                });
            }
        }
        let interface = match get("OS_INTERFACE").or_else(|| get("OS_ENDPOINT_TYPE")) {
            Some(v) => normalize_interface(src, "OS_INTERFACE", &v)?,
            None => default_interface(),
        };
        let s = KeystoneSettings {
            auth_url: need("OS_AUTH_URL")?,
            username: need("OS_USERNAME")?,
            password: need("OS_PASSWORD")?,
            user_domain_name: get("OS_USER_DOMAIN_NAME").unwrap_or_else(default_domain),
            project_name: get("OS_PROJECT_NAME")
                .or_else(|| get("OS_TENANT_NAME"))
                .ok_or_else(|| KeystoneError::Missing {
                    source_name: src.into(),
                    field: "OS_PROJECT_NAME".into(),
                })?,
            project_domain_name: get("OS_PROJECT_DOMAIN_NAME").unwrap_or_else(default_domain),
            region_name: get("OS_REGION_NAME"),
            interface,
            cacert: get("OS_CACERT").map(PathBuf::from),
            insecure: get("OS_INSECURE").is_some_and(|v| truthy(&v)),
            renew_before_secs: default_renew(),
            request_timeout_secs: default_timeout(),
        };
        s.validate(src)?;
        Ok(s)
    }

    /// Settings for cloud `cloud` from the text of a `clouds.yaml` (`path` names it in errors).
    /// Reads `auth.{auth_url, username, password, project_name, user_domain_name, project_domain_name}`,
    /// `region_name`, `interface`, `cacert`, `verify`; `auth_type` must be `password` or absent.
    pub fn from_clouds_yaml(text: &str, cloud: &str, path: &str) -> Result<Self, KeystoneError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            clouds: HashMap<String, Cloud>,
        }
        #[derive(Deserialize)]
        struct Cloud {
            #[serde(default)]
            auth: HashMap<String, serde_norway::Value>,
            auth_type: Option<String>,
            region_name: Option<String>,
            interface: Option<String>,
            cacert: Option<String>,
            verify: Option<bool>,
            identity_api_version: Option<serde_norway::Value>,
        }
        let f: File = serde_norway::from_str(text).map_err(|e| KeystoneError::CloudsYaml {
            path: path.into(),
            message: e.to_string(),
        })?;
        let c = f.clouds.get(cloud).ok_or_else(|| KeystoneError::NoCloud {
            cloud: cloud.into(),
            looked: path.into(),
        })?;
        let src = format!("{path} (cloud {cloud})");
        if let Some(t) = &c.auth_type {
            if t != "password" && t != "v3password" {
                return Err(KeystoneError::Invalid {
                    source_name: src,
                    field: "auth_type".into(),
                    value: t.clone(),
                    why: "only password authentication is supported".into(),
                });
            }
        }
        if let Some(v) = &c.identity_api_version {
            let v = yaml_scalar(v).unwrap_or_default();
            if v != "3" && v != "3.0" {
                return Err(KeystoneError::Invalid {
                    source_name: src,
                    field: "identity_api_version".into(),
                    value: v,
                    why: "only Keystone v3 is supported".into(),
                });
            }
        }
        let get = |k: &str| {
            c.auth
                .get(k)
                .and_then(yaml_scalar)
                .filter(|v| !v.is_empty())
        };
        let need = |k: &str| {
            get(k).ok_or_else(|| KeystoneError::Missing {
                source_name: src.clone(),
                field: format!("auth.{k}"),
            })
        };
        let s = KeystoneSettings {
            auth_url: need("auth_url")?,
            username: need("username")?,
            password: need("password")?,
            user_domain_name: get("user_domain_name").unwrap_or_else(default_domain),
            project_name: get("project_name")
                .or_else(|| get("tenant_name"))
                .ok_or_else(|| KeystoneError::Missing {
                    source_name: src.clone(),
                    field: "auth.project_name".into(),
                })?,
            project_domain_name: get("project_domain_name").unwrap_or_else(default_domain),
            region_name: c.region_name.clone().filter(|r| !r.is_empty()),
            interface: match &c.interface {
                Some(i) => normalize_interface(&src, "interface", i)?,
                None => default_interface(),
            },
            cacert: c.cacert.as_ref().map(PathBuf::from),
            insecure: c.verify == Some(false),
            renew_before_secs: default_renew(),
            request_timeout_secs: default_timeout(),
        };
        s.validate(&src)?;
        Ok(s)
    }

    /// The `clouds.yaml` files looked at, in order: `$OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`,
    /// `$XDG_CONFIG_HOME/openstack/clouds.yaml` (or `~/.config/openstack/clouds.yaml`),
    /// `/etc/openstack/clouds.yaml`.
    pub fn clouds_yaml_locations(env: &HashMap<String, String>) -> Vec<PathBuf> {
        let mut v = Vec::new();
        if let Some(f) = env.get("OS_CLIENT_CONFIG_FILE").filter(|f| !f.is_empty()) {
            v.push(PathBuf::from(f));
        }
        v.push(PathBuf::from("clouds.yaml"));
        if let Some(x) = env.get("XDG_CONFIG_HOME").filter(|f| !f.is_empty()) {
            v.push(Path::new(x).join("openstack/clouds.yaml"));
        } else if let Some(h) = env.get("HOME").filter(|f| !f.is_empty()) {
            v.push(Path::new(h).join(".config/openstack/clouds.yaml"));
        }
        v.push(PathBuf::from("/etc/openstack/clouds.yaml"));
        v
    }

    /// Settings for `cloud` (or `$OS_CLOUD`) from the first `clouds.yaml` that defines it.
    pub fn from_clouds_file(
        cloud: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Self, KeystoneError> {
        let cloud = match cloud {
            Some(c) => c.to_string(),
            None => env
                .get("OS_CLOUD")
                .filter(|c| !c.is_empty())
                .cloned()
                .ok_or_else(|| KeystoneError::Missing {
                    source_name: "environment".into(),
                    field: "OS_CLOUD (or OS_AUTH_URL)".into(),
                })?,
        };
        let locations = Self::clouds_yaml_locations(env);
        for p in &locations {
            let text = match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(KeystoneError::CloudsYaml {
                        path: p.display().to_string(),
                        message: e.to_string(),
                    })
                }
            };
            match Self::from_clouds_yaml(&text, &cloud, &p.display().to_string()) {
                Err(KeystoneError::NoCloud { .. }) => continue,
                other => return other,
            }
        }
        Err(KeystoneError::NoCloud {
            cloud,
            looked: locations
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Environment first (when `OS_AUTH_URL` is set), else `clouds.yaml` for `$OS_CLOUD`.
    pub fn discover() -> Result<Self, KeystoneError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        if env.get("OS_AUTH_URL").is_some_and(|v| !v.is_empty()) {
            Self::from_env_map(&env)
        } else {
            Self::from_clouds_file(None, &env)
        }
    }

    /// Checks the URL and the interface.
    pub fn validate(&self, source_name: &str) -> Result<(), KeystoneError> {
        if !(self.auth_url.starts_with("http://") || self.auth_url.starts_with("https://")) {
            return Err(KeystoneError::Invalid {
                source_name: source_name.into(),
                field: "auth_url".into(),
                value: self.auth_url.clone(),
                why: "must be an http:// or https:// URL".into(),
            });
        }
        normalize_interface(source_name, "interface", &self.interface)?;
        Ok(())
    }

    /// The token URL: `auth_url` with `/v3` appended unless it already ends so, then `/auth/tokens`.
    pub fn tokens_url(&self) -> String {
        let base = self.auth_url.trim_end_matches('/');
        if base.ends_with("/v3") {
            format!("{base}/auth/tokens")
        } else {
            format!("{base}/v3/auth/tokens")
        }
    }

    fn auth_body(&self) -> serde_json::Value {
        serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.username,
                "domain": {"name": self.user_domain_name},
                "password": self.password,
            }}},
            "scope": {"project": {"name": self.project_name, "domain": {"name": self.project_domain_name}}},
        }})
    }
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

fn yaml_scalar(v: &serde_norway::Value) -> Option<String> {
    match v {
        serde_norway::Value::String(s) => Some(s.clone()),
        serde_norway::Value::Number(n) => Some(n.to_string()),
        serde_norway::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn normalize_interface(src: &str, field: &str, v: &str) -> Result<String, KeystoneError> {
    let i = v.trim_end_matches("URL").to_ascii_lowercase();
    match i.as_str() {
        "public" | "internal" | "admin" => Ok(i),
        _ => Err(KeystoneError::Invalid {
            source_name: src.into(),
            field: field.into(),
            value: v.into(),
            why: "must be public, internal or admin".into(),
        }),
    }
}

/// One endpoint of a catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CatalogEndpoint {
    /// `public`, `internal` or `admin`.
    pub interface: String,
    /// Region name (older Keystone releases).
    #[serde(default)]
    pub region: Option<String>,
    /// Region id.
    #[serde(default)]
    pub region_id: Option<String>,
    /// The URL.
    pub url: String,
}

/// One service of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CatalogEntry {
    /// Service type (`compute`, `object-store`, …).
    #[serde(rename = "type")]
    pub service_type: String,
    /// Service name.
    #[serde(default)]
    pub name: String,
    /// Its endpoints.
    #[serde(default)]
    pub endpoints: Vec<CatalogEndpoint>,
}

/// The endpoint URL for a service type, interface and (optional) region; trailing `/` removed.
pub fn find_endpoint(
    catalog: &[CatalogEntry],
    service_type: &str,
    interface: &str,
    region: Option<&str>,
) -> Result<String, KeystoneError> {
    catalog
        .iter()
        .filter(|s| s.service_type == service_type)
        .flat_map(|s| &s.endpoints)
        .find(|e| {
            e.interface == interface
                && region.is_none_or(|r| {
                    e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r)
                })
        })
        .map(|e| e.url.trim_end_matches('/').to_string())
        .ok_or_else(|| KeystoneError::NoEndpoint {
            service_type: service_type.into(),
            interface: interface.into(),
            region: region.map(str::to_string),
            services: catalog
                .iter()
                .map(|s| s.service_type.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Seconds since the Unix epoch of an RFC 3339 / ISO 8601 UTC time as Keystone writes it
/// (`2026-11-22T07:33:12.000000Z`, also `+00:00` or no zone). `None` if it is not such a time.
pub fn parse_utc_time(s: &str) -> Option<f64> {
    let s = s.trim();
    let (date, rest) = s.split_once('T').or_else(|| s.split_once(' '))?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: i64 = d.next()?.parse().ok()?;
    let da: i64 = d.next()?.parse().ok()?;
    let (time, offset_s) = if let Some(t) = rest.strip_suffix('Z') {
        (t, 0i64)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (t, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (zh, zm) = z[1..].split_once(':').unwrap_or((&z[1..], "0"));
        (
            t,
            sign * (zh.parse::<i64>().ok()? * 3600 + zm.parse::<i64>().ok()? * 60),
        )
    } else {
        (rest, 0)
    };
    let mut t = time.splitn(3, ':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || sec >= 61.0 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 - offset_s) as f64 + sec)
}

#[derive(Debug, Clone)]
struct Session {
    token: String,
    renew_at: Instant,
    catalog: Vec<CatalogEntry>,
}

/// A Keystone v3 session: issues, caches and renews a project-scoped token; resolves endpoints.
#[derive(Debug)]
pub struct Keystone {
    settings: KeystoneSettings,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
    issuing: tokio::sync::Mutex<()>,
}

impl Keystone {
    /// A client for `settings` (no request is made yet).
    pub fn new(settings: KeystoneSettings) -> Result<Self, KeystoneError> {
        settings.validate("settings")?;
        let http = http_client(
            settings.cacert.as_deref(),
            settings.insecure,
            Duration::from_secs(settings.request_timeout_secs.max(1)),
        )
        .map_err(|message| KeystoneError::Invalid {
            source_name: "settings".into(),
            field: "cacert".into(),
            value: settings
                .cacert
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            why: message,
        })?;
        Ok(Keystone {
            settings,
            http,
            session: Mutex::new(None),
            issuing: tokio::sync::Mutex::new(()),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &KeystoneSettings {
        &self.settings
    }

    fn cached(&self) -> Option<Session> {
        let g = self.session.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().filter(|s| Instant::now() < s.renew_at).cloned()
    }

    async fn session(&self) -> Result<Session, AuthError> {
        if let Some(s) = self.cached() {
            return Ok(s);
        }
        let _one = self.issuing.lock().await;
        if let Some(s) = self.cached() {
            return Ok(s);
        }
        let s = self.issue().await?;
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
        Ok(s)
    }

    async fn issue(&self) -> Result<Session, AuthError> {
        let url = self.settings.tokens_url();
        let span = info_span!("keystone.issue", url = %url, user = %self.settings.username);
        async {
            let sent = Instant::now();
            let unavailable = |message: String| AuthError::Unavailable {
                url: url.clone(),
                message,
            };
            let resp = self
                .http
                .post(&url)
                .json(&self.settings.auth_body())
                .send()
                .await
                .map_err(|e| unavailable(error_chain(&e)))?;
            let status = resp.status();
            let token = resp
                .headers()
                .get("x-subject-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp
                .text()
                .await
                .map_err(|e| unavailable(error_chain(&e)))?;
            if !status.is_success() {
                return Err(AuthError::Refused {
                    url: url.clone(),
                    status: status.as_u16(),
                    message: error_message(&body),
                });
            }
            let token = token
                .ok_or_else(|| unavailable("no X-Subject-Token header in the answer".into()))?;
            let parsed = parse_token_body(&body).map_err(unavailable)?;
            let lifetime = Duration::from_secs_f64(parsed.lifetime_secs.max(0.0));
            let renew_before =
                Duration::from_secs(self.settings.renew_before_secs).min(lifetime / 2);
            info!(
                lifetime_s = lifetime.as_secs(),
                services = parsed.catalog.len(),
                "token issued"
            );
            Ok(Session {
                token,
                renew_at: sent + lifetime - renew_before,
                catalog: parsed.catalog,
            })
        }
        .instrument(span)
        .await
    }

    /// The endpoint of `service_type` for the configured interface and region.
    pub async fn endpoint(&self, service_type: &str) -> Result<String, KeystoneError> {
        let s = self.session().await?;
        find_endpoint(
            &s.catalog,
            service_type,
            &self.settings.interface,
            self.settings.region_name.as_deref(),
        )
    }

    /// The service catalog of the current token.
    pub async fn catalog(&self) -> Result<Vec<CatalogEntry>, KeystoneError> {
        Ok(self.session().await?.catalog)
    }
}

impl TokenSource for Keystone {
    async fn token(&self) -> Result<Token, AuthError> {
        Ok(Token {
            value: self.session().await?.token,
            endpoint: None,
        })
    }

    fn invalidate(&self) {
        debug!("keystone: token invalidated");
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// What a token answer tells besides the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBody {
    /// `expires_at − issued_at`, seconds.
    pub lifetime_secs: f64,
    /// The service catalog (empty for an unscoped token).
    pub catalog: Vec<CatalogEntry>,
}

/// Parses the body of `POST /v3/auth/tokens`.
pub fn parse_token_body(body: &str) -> Result<TokenBody, String> {
    #[derive(Deserialize)]
    struct Outer {
        token: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        expires_at: String,
        issued_at: Option<String>,
        #[serde(default)]
        catalog: Vec<CatalogEntry>,
    }
    let o: Outer =
        serde_json::from_str(body).map_err(|e| format!("token body is not understood: {e}"))?;
    let exp = parse_utc_time(&o.token.expires_at)
        .ok_or_else(|| format!("expires_at {:?} is not a time", o.token.expires_at))?;
    let issued = match &o.token.issued_at {
        Some(i) => parse_utc_time(i).ok_or_else(|| format!("issued_at {i:?} is not a time"))?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    };
    Ok(TokenBody {
        lifetime_secs: exp - issued,
        catalog: o.token.catalog,
    })
}

/// The human message of an OpenStack error body (`{"error": {"message": …}}`,
/// `{"badRequest": {"message": …}}`, …), else the body itself (shortened).
pub fn error_message(body: &str) -> String {
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(body) {
        for v in m.values() {
            if let Some(msg) = v.get("message").and_then(|m| m.as_str()) {
                return msg.to_string();
            }
        }
        if let Some(msg) = m.get("message").and_then(|m| m.as_str()) {
            return msg.to_string();
        }
    }
    let t = body.trim();
    if t.chars().count() > 300 {
        format!("{}…", t.chars().take(300).collect::<String>())
    } else {
        t.to_string()
    }
}

/// A reqwest error with its causes, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// An HTTP client with the given extra CA and timeout.
pub(crate) fn http_client(
    cacert: Option<&Path>,
    insecure: bool,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .danger_accept_invalid_certs(insecure);
    if let Some(p) = cacert {
        let pem = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_openrc() {
        let s = KeystoneSettings::from_env_map(&env(&[
            ("OS_AUTH_URL", "http://127.0.0.1:35000/v3"),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "secret"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_NAME", "Users"),
            ("OS_IDENTITY_API_VERSION", "3"),
            ("OS_REGION_NAME", "RegionOne"),
            ("OS_INTERFACE", "internalURL"),
            ("OS_INSECURE", "true"),
        ]))
        .unwrap();
        assert_eq!(s.user_domain_name, "Users");
        assert_eq!(s.project_domain_name, "Default");
        assert_eq!(s.region_name.as_deref(), Some("RegionOne"));
        assert_eq!(s.interface, "internal");
        assert!(s.insecure);
        assert_eq!(s.tokens_url(), "http://127.0.0.1:35000/v3/auth/tokens");
        assert!(!format!("{s:?}").contains("secret"));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = KeystoneSettings::from_env_map(&env(&[("OS_AUTH_URL", "http://x")])).unwrap_err();
        assert!(e.to_string().contains("OS_USERNAME"), "{e}");
        let e = KeystoneSettings::from_env_map(&env(&[
            ("OS_AUTH_URL", "keystone:5000"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_TENANT_NAME", "t"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("keystone:5000"), "{e}");
        let e = KeystoneSettings::from_env_map(&env(&[
            ("OS_AUTH_URL", "http://k"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_PROJECT_NAME", "t"),
            ("OS_IDENTITY_API_VERSION", "2"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("OS_IDENTITY_API_VERSION"), "{e}");
    }

    const CLOUDS: &str = r#"
clouds:
  devstack:
    auth:
      auth_url: https://keystone.example:5000
      username: ax
      password: "s3cret"
      project_name: service
      project_domain_name: Service
    region_name: RegionTwo
    interface: internal
    identity_api_version: 3
    verify: false
  other:
    auth_type: token
    auth:
      auth_url: http://x
"#;

    #[test]
    fn clouds_yaml() {
        let s = KeystoneSettings::from_clouds_yaml(CLOUDS, "devstack", "c.yaml").unwrap();
        assert_eq!(s.auth_url, "https://keystone.example:5000");
        assert_eq!(
            s.tokens_url(),
            "https://keystone.example:5000/v3/auth/tokens"
        );
        assert_eq!(s.project_domain_name, "Service");
        assert_eq!(s.user_domain_name, "Default");
        assert_eq!(s.region_name.as_deref(), Some("RegionTwo"));
        assert_eq!(s.interface, "internal");
        assert!(s.insecure);
        let e = KeystoneSettings::from_clouds_yaml(CLOUDS, "other", "c.yaml").unwrap_err();
        assert!(e.to_string().contains("auth_type"), "{e}");
        let e = KeystoneSettings::from_clouds_yaml(CLOUDS, "nope", "c.yaml").unwrap_err();
        assert!(matches!(e, KeystoneError::NoCloud { .. }), "{e}");
        let e = KeystoneSettings::from_clouds_yaml("clouds: [", "x", "bad.yaml").unwrap_err();
        assert!(e.to_string().contains("bad.yaml"), "{e}");
    }

    #[test]
    fn clouds_file_search_order() {
        let dir = std::env::temp_dir().join(format!("ax-clouds-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("openstack")).unwrap();
        std::fs::write(dir.join("openstack/clouds.yaml"), CLOUDS).unwrap();
        let e = env(&[
            ("XDG_CONFIG_HOME", dir.to_str().unwrap()),
            ("OS_CLOUD", "devstack"),
        ]);
        let locs = KeystoneSettings::clouds_yaml_locations(&e);
        assert_eq!(locs[1], dir.join("openstack/clouds.yaml"));
        let s = KeystoneSettings::from_clouds_file(None, &e).unwrap();
        assert_eq!(s.username, "ax");
        let err = KeystoneSettings::from_clouds_file(Some("missing"), &e).unwrap_err();
        assert!(
            err.to_string().contains("/etc/openstack/clouds.yaml"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn toml_embedding_with_defaults() {
        let s: KeystoneSettings = toml::from_str(
            r#"auth_url = "http://127.0.0.1:35000"
username = "ax"
password = "pw"
project_name = "service"
"#,
        )
        .unwrap();
        assert_eq!(s.interface, "public");
        assert_eq!(s.renew_before_secs, 300);
        assert!(toml::from_str::<KeystoneSettings>("auth_url = \"x\"\nbogus = 1").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_utc_time("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_utc_time("2000-03-01T00:00:00.000000Z"),
            Some(951_868_800.0)
        );
        assert_eq!(
            parse_utc_time("2026-11-22T07:33:12.500000Z"),
            Some(1_795_332_792.5)
        );
        assert_eq!(
            parse_utc_time("2026-11-22T08:33:12+01:00"),
            Some(1_795_332_792.0)
        );
        assert_eq!(parse_utc_time("2026-13-22T08:33:12Z"), None);
        assert_eq!(parse_utc_time("yesterday"), None);
    }

    #[test]
    fn token_body_and_catalog() {
        let body = r#"{"token": {"methods": ["password"], "expires_at": "2026-11-22T08:00:00.000000Z",
          "issued_at": "2026-11-22T07:00:00.000000Z", "catalog": [
            {"type": "compute", "name": "nova", "id": "1", "endpoints": [
              {"interface": "admin", "region": "RegionOne", "region_id": "RegionOne", "url": "http://a/v2.1"},
              {"interface": "public", "region": "RegionTwo", "region_id": "RegionTwo", "url": "http://two/v2.1/"},
              {"interface": "public", "region": "RegionOne", "region_id": "RegionOne", "url": "http://one/v2.1"}]},
            {"type": "image", "name": "glance", "id": "2", "endpoints": []}]}}"#;
        let t = parse_token_body(body).unwrap();
        assert_eq!(t.lifetime_secs, 3600.0);
        let c = &t.catalog;
        assert_eq!(
            find_endpoint(c, "compute", "public", Some("RegionOne")).unwrap(),
            "http://one/v2.1"
        );
        assert_eq!(
            find_endpoint(c, "compute", "public", None).unwrap(),
            "http://two/v2.1"
        );
        let e = find_endpoint(c, "network", "public", None).unwrap_err();
        assert!(e.to_string().contains("compute, image"), "{e}");
        assert!(parse_token_body("{}").is_err());
        assert!(parse_token_body(r#"{"token": {"expires_at": "soon"}}"#).is_err());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(
                r#"{"error": {"code": 401, "message": "The request you have made requires authentication.", "title": "Unauthorized"}}"#
            ),
            "The request you have made requires authentication."
        );
        assert_eq!(
            error_message(
                r#"{"badRequest": {"code": 400, "message": "Compute service of compute1 is still in use."}}"#
            ),
            "Compute service of compute1 is still in use."
        );
        assert_eq!(error_message("  plain  "), "plain");
    }
}
