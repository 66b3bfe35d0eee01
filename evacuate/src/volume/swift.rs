//! The Swift backend: every version is a static large object (SLO).
//!
//! Layout in one container:
//! - `IMAGE/segments/SHA256` — a chunk, named by the SHA-256 of its content, so equal chunks (in one
//!   version or across versions) are stored once and versions share them;
//! - `IMAGE/versions/VVVVVVVVVVVVVVVVVVVV` — the SLO manifest of version V (20 digits, so the listing sorts
//!   numerically), with `X-Object-Meta-Ax-Image-Size`, `-Ax-Chunk-Size` and `-Ax-Created-Ms`. A plain `GET`
//!   of it returns the whole disk image; ax reads it with `?multipart-manifest=get` and rebuilds the
//!   [`Manifest`](super::Manifest) from the segment names and ETags.
//!
//! Every segment `PUT` sends its MD5 as `ETag` (Swift answers 422 when the body does not match) and checks
//! the `ETag` of the answer; a 422, a mismatch or a transient failure (5xx, 408, 429, connection) is retried
//! up to `max_attempts` times and then reported — never ignored. A 401 invalidates the token and retries
//! once. The manifest `PUT` sends the SLO ETag (MD5 of the concatenated segment ETags) and checks it too.
//!
//! Authentication is any [`TokenSource`]: [`TempAuth`] here, or the Keystone session.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::{Digest, Md5};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::{hex, is_hex, Backend, BackendError, ChunkRef, Manifest};
use crate::auth::{AuthError, Token, TokenSource};

/// Errors of the Swift backend.
#[derive(Debug, thiserror::Error)]
pub enum SwiftError {
    /// No token could be had.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The token source gave no storage URL and none is configured.
    #[error("no storage URL: the token source named none and `storage_url` is not set")]
    NoStorageUrl,
    /// A name that ax will not put in a URL.
    #[error("invalid {what} name {name:?}: use 1–{max} characters of A–Z a–z 0–9 . _ -")]
    BadName {
        /// `container` or `image`.
        what: &'static str,
        /// The name.
        name: String,
        /// Longest allowed.
        max: usize,
    },
    /// The request could not be sent or its answer not read.
    #[error("{method} {object}: {source}")]
    Http {
        /// HTTP method.
        method: Method,
        /// Container/object.
        object: String,
        /// The client's error.
        source: reqwest::Error,
    },
    /// Swift answered with an unexpected status.
    #[error("{method} {object}: HTTP {status}: {message}")]
    Status {
        /// HTTP method.
        method: Method,
        /// Container/object.
        object: String,
        /// The status.
        status: u16,
        /// The server's message (body, shortened).
        message: String,
    },
    /// The ETag Swift returned is not the MD5 ax computed.
    #[error("{method} {object}: ETag mismatch: sent/expected {expected}, server has {got:?}")]
    EtagMismatch {
        /// HTTP method.
        method: Method,
        /// Container/object.
        object: String,
        /// The MD5 ax computed.
        expected: String,
        /// What the server said (None: no ETag header).
        got: Option<String>,
    },
    /// An answer that does not parse or does not make sense.
    #[error("{object}: bad answer: {reason}")]
    BadAnswer {
        /// Container/object.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// Retries exhausted.
    #[error("{object}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        /// Container/object.
        object: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: Box<SwiftError>,
    },
}

impl SwiftError {
    fn retryable(&self) -> bool {
        match self {
            SwiftError::Http { .. } | SwiftError::EtagMismatch { .. } => true,
            SwiftError::Status { status, .. } => {
                matches!(status, 408 | 422 | 429 | 499 | 500..=599)
            }
            _ => false,
        }
    }
}

/// Swift TempAuth (`GET /auth/v1.0` with `X-Auth-User` and `X-Auth-Key`) as a [`TokenSource`].
#[derive(Debug)]
pub struct TempAuth {
    url: String,
    user: String,
    key: String,
    client: reqwest::Client,
    cached: Mutex<Option<(Token, Option<Instant>)>>,
}

impl TempAuth {
    /// A TempAuth source for `url` (e.g. `http://127.0.0.1:8080/auth/v1.0`), `user` as `account:user`.
    pub fn new(url: &str, user: &str, key: &str) -> TempAuth {
        TempAuth {
            url: url.to_string(),
            user: user.to_string(),
            key: key.to_string(),
            client: http_client(),
            cached: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Token, Option<Instant>)>> {
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TokenSource for TempAuth {
    async fn token(&self) -> Result<Token, AuthError> {
        if let Some((token, expires)) = self.lock().as_ref() {
            if expires.is_none_or(|t| Instant::now() + Duration::from_secs(60) < t) {
                return Ok(token.clone());
            }
        }
        let unavailable = |message: String| AuthError::Unavailable {
            url: self.url.clone(),
            message,
        };
        let resp = self
            .client
            .get(&self.url)
            .header("X-Auth-User", &self.user)
            .header("X-Auth-Key", &self.key)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let message = short(&resp.text().await.unwrap_or_default());
            return Err(if matches!(status.as_u16(), 401 | 403) {
                AuthError::Refused {
                    url: self.url.clone(),
                    status: status.as_u16(),
                    message,
                }
            } else {
                unavailable(format!("HTTP {status}: {message}"))
            });
        }
        let h = resp.headers();
        let get = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let value = get("x-auth-token")
            .or_else(|| get("x-storage-token"))
            .ok_or_else(|| unavailable("no X-Auth-Token in the answer".into()))?;
        let expires = get("x-auth-token-expires")
            .and_then(|s| s.parse::<u64>().ok())
            .map(|s| Instant::now() + Duration::from_secs(s));
        let token = Token {
            value,
            endpoint: get("x-storage-url"),
        };
        *self.lock() = Some((token.clone(), expires));
        Ok(token)
    }

    fn invalidate(&self) {
        *self.lock() = None;
    }
}

/// Settings of the Swift backend.
#[derive(Clone, Debug)]
pub struct SwiftConfig {
    /// The container (created when missing).
    pub container: String,
    /// The account URL (`…/v1/AUTH_x`); `None` takes the one the token source names.
    pub storage_url: Option<String>,
    /// Attempts per request before giving up (≥ 1).
    pub max_attempts: u32,
    /// Timeout of one request.
    pub request_timeout: Duration,
}

impl SwiftConfig {
    /// Defaults for `container`: storage URL from the token, 4 attempts, 120 s per request.
    pub fn new(container: &str) -> SwiftConfig {
        SwiftConfig {
            container: container.to_string(),
            storage_url: None,
            max_attempts: 4,
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// The Swift backend.
#[derive(Debug)]
pub struct SwiftBackend<T> {
    tokens: T,
    client: reqwest::Client,
    config: SwiftConfig,
    container_ready: tokio::sync::OnceCell<()>,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(16)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

fn short(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), SwiftError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(SwiftError::BadName {
            what,
            name: name.to_string(),
            max,
        })
    }
}

fn etag_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().trim_matches('"').to_ascii_lowercase())
}

/// The SLO ETag of a manifest: MD5 of the concatenated segment MD5s (hex).
pub fn slo_etag(chunks: &[ChunkRef]) -> String {
    let mut h = Md5::new();
    for c in chunks {
        h.update(c.md5.as_bytes());
    }
    hex(&h.finalize())
}

/// One entry of a manifest read with `?multipart-manifest=get`.
#[derive(Deserialize)]
struct SloEntry {
    name: String,
    hash: String,
    bytes: u64,
}

/// The answer of a `?multipart-manifest=delete` (bulk delete).
#[derive(Deserialize)]
struct BulkAnswer {
    #[serde(rename = "Response Status")]
    status: String,
    #[serde(rename = "Errors", default)]
    errors: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Listed {
    name: String,
}

impl<T: TokenSource> SwiftBackend<T> {
    /// A backend on `config.container` authenticated by `tokens`.
    pub fn new(tokens: T, config: SwiftConfig) -> Result<SwiftBackend<T>, SwiftError> {
        check_name("container", &config.container, 256)?;
        Ok(SwiftBackend {
            tokens,
            client: http_client(),
            config,
            container_ready: tokio::sync::OnceCell::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SwiftConfig {
        &self.config
    }

    /// The object name of a chunk of `image`.
    pub fn segment_name(image: &str, sha256: &str) -> String {
        format!("{image}/segments/{sha256}")
    }

    /// The object name of version `version` of `image` (its SLO manifest).
    pub fn version_name(image: &str, version: u64) -> String {
        format!("{image}/versions/{version:020}")
    }

    fn object(&self, name: &str) -> String {
        format!("{}/{name}", self.config.container)
    }

    /// One request with one 401 retry; `rel` is relative to the account URL.
    async fn request(
        &self,
        method: Method,
        rel: &str,
        headers: &HeaderMap,
        body: Option<Bytes>,
    ) -> Result<reqwest::Response, SwiftError> {
        let mut refreshed = false;
        loop {
            let token = self.tokens.token().await?;
            let base = match (&self.config.storage_url, &token.endpoint) {
                (Some(u), _) | (None, Some(u)) => u.trim_end_matches('/').to_string(),
                (None, None) => return Err(SwiftError::NoStorageUrl),
            };
            let mut req = self
                .client
                .request(method.clone(), format!("{base}/{rel}"))
                .timeout(self.config.request_timeout)
                .headers(headers.clone())
                .header("X-Auth-Token", &token.value);
            if let Some(b) = &body {
                req = req.body(b.clone());
            } else if method == Method::PUT {
                req = req.header("Content-Length", "0");
            }
            let resp = req.send().await.map_err(|source| SwiftError::Http {
                method: method.clone(),
                object: rel.to_string(),
                source,
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && !refreshed {
                tracing::debug!(rel, "401: token invalidated, retrying once");
                self.tokens.invalidate();
                refreshed = true;
                continue;
            }
            return Ok(resp);
        }
    }

    async fn status_error(method: Method, object: &str, resp: reqwest::Response) -> SwiftError {
        let status = resp.status().as_u16();
        let message = short(&resp.text().await.unwrap_or_default());
        SwiftError::Status {
            method,
            object: object.to_string(),
            status,
            message,
        }
    }

    /// Runs `op` up to `max_attempts` times while its error is retryable, with exponential backoff.
    async fn retrying<R, F, Fut>(&self, object: &str, mut op: F) -> Result<R, SwiftError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<R, SwiftError>>,
    {
        let attempts = self.config.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(r) => return Ok(r),
                Err(e) if e.retryable() && attempt < attempts => {
                    tracing::warn!(object, attempt, error = %e, "retrying");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                }
                Err(e) if e.retryable() => {
                    return Err(SwiftError::GaveUp {
                        object: object.to_string(),
                        attempts: attempt,
                        last: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the container once (PUT is idempotent).
    async fn ensure_container(&self) -> Result<(), SwiftError> {
        self.container_ready
            .get_or_try_init(|| async {
                let c = self.config.container.clone();
                self.retrying(&c, || async {
                    let resp = self
                        .request(Method::PUT, &c, &HeaderMap::new(), None)
                        .await?;
                    if resp.status().is_success() {
                        Ok(())
                    } else {
                        Err(Self::status_error(Method::PUT, &c, resp).await)
                    }
                })
                .await
            })
            .await
            .map(|_| ())
    }

    /// PUTs an object with `ETag` = `md5` and checks the answer's ETag; retried on 422 and mismatch.
    pub async fn put_object_checked(
        &self,
        name: &str,
        data: Bytes,
        md5: &str,
    ) -> Result<(), SwiftError> {
        self.ensure_container().await?;
        let object = self.object(name);
        let mut headers = HeaderMap::new();
        headers.insert("ETag", hv(md5)?);
        headers.insert(
            "Content-Type",
            HeaderValue::from_static("application/octet-stream"),
        );
        self.put_etag_checked(&object, &headers, data, md5).await
    }

    /// PUTs `body` to `rel` (headers include the `ETag` sent) until the answer is 201 with ETag `etag`.
    async fn put_etag_checked(
        &self,
        rel: &str,
        headers: &HeaderMap,
        body: Bytes,
        etag: &str,
    ) -> Result<(), SwiftError> {
        self.retrying(rel, || async {
            let resp = self
                .request(Method::PUT, rel, headers, Some(body.clone()))
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(Self::status_error(Method::PUT, rel, resp).await);
            }
            let got = etag_of(resp.headers());
            if got.as_deref() != Some(etag) {
                return Err(SwiftError::EtagMismatch {
                    method: Method::PUT,
                    object: rel.to_string(),
                    expected: etag.into(),
                    got,
                });
            }
            Ok(())
        })
        .await
    }

    /// PUTs raw bytes without an ETag (for tests that corrupt an object on purpose, and for tools).
    pub async fn put_object_unchecked(&self, name: &str, data: Vec<u8>) -> Result<(), SwiftError> {
        self.ensure_container().await?;
        let object = self.object(name);
        let resp = self
            .request(
                Method::PUT,
                &object,
                &HeaderMap::new(),
                Some(Bytes::from(data)),
            )
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Self::status_error(Method::PUT, &object, resp).await)
        }
    }

    /// Names of the objects under `prefix` in the container, in listing order (all pages).
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<String>, SwiftError> {
        let c = self.config.container.clone();
        let mut names: Vec<String> = Vec::new();
        loop {
            let marker = names.last().cloned().unwrap_or_default();
            let rel = format!(
                "{c}?format=json&prefix={}&marker={}",
                query(prefix),
                query(&marker)
            );
            let page: Vec<Listed> = self
                .retrying(&c, || async {
                    let resp = self
                        .request(Method::GET, &rel, &HeaderMap::new(), None)
                        .await?;
                    match resp.status() {
                        StatusCode::NOT_FOUND => Ok(Vec::new()),
                        StatusCode::NO_CONTENT => Ok(Vec::new()),
                        s if s.is_success() => {
                            let body = resp.bytes().await.map_err(|source| SwiftError::Http {
                                method: Method::GET,
                                object: c.clone(),
                                source,
                            })?;
                            serde_json::from_slice(&body).map_err(|e| SwiftError::BadAnswer {
                                object: c.clone(),
                                reason: format!("container listing: {e}"),
                            })
                        }
                        _ => Err(Self::status_error(Method::GET, &c, resp).await),
                    }
                })
                .await?;
            if page.is_empty() {
                return Ok(names);
            }
            names.extend(page.into_iter().map(|l| l.name));
        }
    }

    async fn delete_object(&self, rel: &str) -> Result<(), SwiftError> {
        self.retrying(rel, || async {
            let resp = self
                .request(Method::DELETE, rel, &HeaderMap::new(), None)
                .await?;
            if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
                Ok(())
            } else {
                Err(Self::status_error(Method::DELETE, rel, resp).await)
            }
        })
        .await
    }
}

fn hv(s: &str) -> Result<HeaderValue, SwiftError> {
    HeaderValue::from_str(s).map_err(|e| SwiftError::BadAnswer {
        object: s.to_string(),
        reason: e.to_string(),
    })
}

/// Percent-encodes a query value (names are restricted to safe characters; this covers `/`).
fn query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header_u64(headers: &HeaderMap, name: &str, object: &str) -> Result<u64, SwiftError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| SwiftError::BadAnswer {
            object: object.to_string(),
            reason: format!("missing or bad {name}"),
        })
}

impl<T: TokenSource> Backend for SwiftBackend<T> {
    fn content_addressed(&self) -> bool {
        true
    }

    async fn has_chunk(&self, image: &str, chunk: &ChunkRef) -> Result<bool, BackendError> {
        check_name("image", image, 200)?;
        let object = self.object(&Self::segment_name(image, &chunk.sha256));
        let present = self
            .retrying(&object, || async {
                let resp = self
                    .request(Method::HEAD, &object, &HeaderMap::new(), None)
                    .await?;
                match resp.status() {
                    StatusCode::NOT_FOUND => Ok(false),
                    StatusCode::OK => {
                        let len = header_u64(resp.headers(), "content-length", &object).ok();
                        Ok(
                            etag_of(resp.headers()).as_deref() == Some(chunk.md5.as_str())
                                && len == Some(chunk.len),
                        )
                    }
                    _ => Err(Self::status_error(Method::HEAD, &object, resp).await),
                }
            })
            .await?;
        Ok(present)
    }

    async fn put_chunk(
        &self,
        image: &str,
        chunk: &ChunkRef,
        data: Vec<u8>,
    ) -> Result<(), BackendError> {
        check_name("image", image, 200)?;
        let name = Self::segment_name(image, &chunk.sha256);
        Ok(self
            .put_object_checked(&name, Bytes::from(data), &chunk.md5)
            .await?)
    }

    async fn get_chunk(
        &self,
        image: &str,
        _version: u64,
        chunk: &ChunkRef,
    ) -> Result<Vec<u8>, BackendError> {
        check_name("image", image, 200)?;
        let object = self.object(&Self::segment_name(image, &chunk.sha256));
        let data = self
            .retrying(&object, || async {
                let resp = self.request(Method::GET, &object, &HeaderMap::new(), None).await?;
                if resp.status() != StatusCode::OK {
                    return Err(Self::status_error(Method::GET, &object, resp).await);
                }
                let etag = etag_of(resp.headers());
                if let Some(len) = resp.content_length() {
                    if len != chunk.len {
                        return Err(SwiftError::BadAnswer {
                            object: object.clone(),
                            reason: format!("Content-Length {len}, manifest says {}", chunk.len),
                        });
                    }
                }
                let body = resp.bytes().await.map_err(|source| SwiftError::Http {
                    method: Method::GET,
                    object: object.clone(),
                    source,
                })?;
                let md5 = hex(&Md5::digest(&body));
                if etag.as_deref() != Some(chunk.md5.as_str()) || md5 != chunk.md5 {
                    // The stored object is not the chunk the manifest names (overwritten or damaged): not
                    // retryable, the caller must know.
                    return Err(SwiftError::BadAnswer {
                        object: object.clone(),
                        reason: format!(
                            "content does not match the manifest: manifest MD5 {}, server ETag {:?}, body MD5 {md5}",
                            chunk.md5, etag
                        ),
                    });
                }
                Ok(body.to_vec())
            })
            .await?;
        Ok(data)
    }

    async fn put_manifest(&self, manifest: &Manifest) -> Result<(), BackendError> {
        check_name("image", &manifest.image, 200)?;
        self.ensure_container().await?;
        let c = &self.config.container;
        let entries: Vec<serde_json::Value> = manifest
            .chunks
            .iter()
            .map(|ch| {
                serde_json::json!({
                    "path": format!("/{c}/{}", Self::segment_name(&manifest.image, &ch.sha256)),
                    "etag": ch.md5,
                    "size_bytes": ch.len,
                })
            })
            .collect();
        let body = Bytes::from(serde_json::to_vec(&entries)?);
        let etag = slo_etag(&manifest.chunks);
        let object = self.object(&Self::version_name(&manifest.image, manifest.version));
        let rel = format!("{object}?multipart-manifest=put");
        let mut headers = HeaderMap::new();
        headers.insert("ETag", hv(&etag)?);
        headers.insert(
            "Content-Type",
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(
            "X-Object-Meta-Ax-Image-Size",
            hv(&manifest.size.to_string())?,
        );
        headers.insert(
            "X-Object-Meta-Ax-Chunk-Size",
            hv(&manifest.chunk_size.to_string())?,
        );
        headers.insert(
            "X-Object-Meta-Ax-Created-Ms",
            hv(&manifest.created_unix_ms.to_string())?,
        );
        Ok(self.put_etag_checked(&rel, &headers, body, &etag).await?)
    }

    async fn get_manifest(&self, image: &str, version: u64) -> Result<Manifest, BackendError> {
        check_name("image", image, 200)?;
        let object = self.object(&Self::version_name(image, version));
        let rel = format!("{object}?multipart-manifest=get");
        let (headers, body) = self
            .retrying(&object, || async {
                let resp = self
                    .request(Method::GET, &rel, &HeaderMap::new(), None)
                    .await?;
                if resp.status() != StatusCode::OK {
                    return Err(Self::status_error(Method::GET, &rel, resp).await);
                }
                let headers = resp.headers().clone();
                let body = resp.bytes().await.map_err(|source| SwiftError::Http {
                    method: Method::GET,
                    object: object.clone(),
                    source,
                })?;
                Ok((headers, body))
            })
            .await?;
        let bad = |reason: String| SwiftError::BadAnswer {
            object: object.clone(),
            reason,
        };
        let slo = headers
            .get("x-static-large-object")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !slo.eq_ignore_ascii_case("true") {
            return Err(bad("not a static large object manifest".into()).into());
        }
        let size = header_u64(&headers, "x-object-meta-ax-image-size", &object)?;
        let chunk_size = header_u64(&headers, "x-object-meta-ax-chunk-size", &object)?;
        let created_unix_ms =
            header_u64(&headers, "x-object-meta-ax-created-ms", &object).unwrap_or(0);
        let entries: Vec<SloEntry> =
            serde_json::from_slice(&body).map_err(|e| bad(format!("manifest JSON: {e}")))?;
        let prefix = format!("/{}/{image}/segments/", self.config.container);
        let mut chunks = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let sha256 = e
                .name
                .strip_prefix(&prefix)
                .filter(|s| is_hex(s, 64))
                .ok_or_else(|| bad(format!("segment {i} is {:?}, not under {prefix}", e.name)))?;
            let md5 = e.hash.to_ascii_lowercase();
            if !is_hex(&md5, 32) {
                return Err(bad(format!("segment {i} has hash {:?}", e.hash)).into());
            }
            chunks.push(ChunkRef {
                index: i as u64,
                len: e.bytes,
                md5,
                sha256: sha256.to_string(),
            });
        }
        let m = Manifest {
            image: image.to_string(),
            version,
            size,
            chunk_size,
            created_unix_ms,
            chunks,
        };
        m.validate()?;
        Ok(m)
    }

    async fn list_versions(&self, image: &str) -> Result<Vec<u64>, BackendError> {
        check_name("image", image, 200)?;
        let prefix = format!("{image}/versions/");
        let mut versions: Vec<u64> = self
            .list_objects(&prefix)
            .await?
            .iter()
            .filter_map(|n| {
                n.strip_prefix(&prefix)
                    .filter(|s| s.len() == 20)
                    .and_then(|s| s.parse().ok())
            })
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    async fn delete_version(
        &self,
        manifest: &Manifest,
        orphans: &[ChunkRef],
    ) -> Result<(), BackendError> {
        check_name("image", &manifest.image, 200)?;
        let object = self.object(&Self::version_name(&manifest.image, manifest.version));
        let distinct: std::collections::HashSet<&str> =
            manifest.chunks.iter().map(|c| c.sha256.as_str()).collect();
        let orphan_set: std::collections::HashSet<&str> =
            orphans.iter().map(|c| c.sha256.as_str()).collect();
        if !distinct.is_empty() && distinct == orphan_set {
            // Nothing of this version is shared: Swift deletes the manifest and its segments in one call.
            let rel = format!("{object}?multipart-manifest=delete");
            let mut headers = HeaderMap::new();
            headers.insert("Accept", HeaderValue::from_static("application/json"));
            self.retrying(&object, || async {
                let resp = self.request(Method::DELETE, &rel, &headers, None).await?;
                if !resp.status().is_success() {
                    return Err(Self::status_error(Method::DELETE, &rel, resp).await);
                }
                let body = resp.bytes().await.map_err(|source| SwiftError::Http {
                    method: Method::DELETE,
                    object: object.clone(),
                    source,
                })?;
                let answer: BulkAnswer =
                    serde_json::from_slice(&body).map_err(|e| SwiftError::BadAnswer {
                        object: rel.clone(),
                        reason: format!("bulk delete answer: {e}"),
                    })?;
                if !answer.status.starts_with("200") || !answer.errors.is_empty() {
                    return Err(SwiftError::Status {
                        method: Method::DELETE,
                        object: rel.clone(),
                        status: answer
                            .status
                            .split(' ')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(500),
                        message: short(&format!("{} {:?}", answer.status, answer.errors)),
                    });
                }
                Ok(())
            })
            .await?;
            return Ok(());
        }
        // Some segments are shared with newer versions: delete the manifest alone, then the orphans.
        self.delete_object(&object).await?;
        for c in orphans {
            self.delete_object(&self.object(&Self::segment_name(&manifest.image, &c.sha256)))
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_etags() {
        assert!(check_name("image", "vm-1.disk_0", 200).is_ok());
        for bad in ["", "a/b", "a b", "..", "é"] {
            assert!(check_name("image", bad, 200).is_err(), "{bad:?}");
        }
        assert_eq!(query("vm/versions/"), "vm%2Fversions%2F");
        let mut h = HeaderMap::new();
        h.insert(
            "etag",
            HeaderValue::from_static("\"D41D8CD98F00B204E9800998ECF8427E\""),
        );
        assert_eq!(
            etag_of(&h).as_deref(),
            Some("d41d8cd98f00b204e9800998ecf8427e")
        );
        // SLO ETag = MD5 of the concatenated hex MD5s: for one empty segment, md5("d41d8c…427e").
        let c = ChunkRef::of(0, b"");
        assert_eq!(c.md5, "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            slo_etag(std::slice::from_ref(&c)),
            hex(&Md5::digest(c.md5.as_bytes()))
        );
        assert_eq!(
            SwiftBackend::<TempAuth>::version_name("vm", 7),
            "vm/versions/00000000000000000007"
        );
    }

    #[test]
    fn retry_classes() {
        let st = |status| SwiftError::Status {
            method: Method::PUT,
            object: "o".into(),
            status,
            message: String::new(),
        };
        assert!(st(422).retryable() && st(503).retryable() && st(429).retryable());
        assert!(!st(404).retryable() && !st(403).retryable() && !st(400).retryable());
        assert!(!SwiftError::NoStorageUrl.retryable());
    }
}
