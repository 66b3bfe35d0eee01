//! A small client of the agent's REST API, used by `axctl` and by agents calling their peers.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A client error: transport, or the API's JSON error with its status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or did not answer in time.
    #[error("{url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The server answered with an error status.
    #[error("{status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error text (`error` of the JSON body).
        message: String,
        /// The field the error names, if any.
        field: Option<String>,
    },
    /// The token file is unusable.
    #[error("{0}")]
    Token(String),
    /// A command-line input is unusable (a file, a flag combination), named in the message.
    #[error("{0}")]
    Input(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A transport error with its whole cause chain ("error sending request" alone says nothing: the
/// cause is "connection refused", a DNS failure, a certificate problem).
fn transport(url: &str, e: &(dyn std::error::Error + 'static)) -> ClientError {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    ClientError::Transport {
        url: url.to_string(),
        message,
    }
}

/// Reads a bearer token file: one line, not empty.
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    if path.is_dir() {
        return Err(ClientError::Token(format!(
            "token file {} is a directory",
            path.display()
        )));
    }
    let t = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Token(format!("token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(ClientError::Token(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(t)
}

/// An HTTP client whose requests time out after `timeout` (connecting: at most 2 s).
fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(2)))
}

/// An API client for one agent.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the agent at `base` (`http://127.0.0.1:7600`) with `token`; requests time out
    /// after `timeout`.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Self {
        let http = builder(timeout).build().unwrap_or_default();
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        }
    }

    /// A client of the agent whose HTTPS API listens at `addr` and whose certificate names `server_name`
    /// (its host name), verified with `tls` (e.g. [`crate::certs::https_client_from_ca`]). The base
    /// URL is `https://<server_name>:<port>`, resolved to `addr` without DNS.
    pub fn https(
        addr: std::net::SocketAddr,
        server_name: &str,
        tls: rustls::ClientConfig,
        token: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let base = format!("https://{server_name}:{}", addr.port());
        let http = builder(timeout)
            .resolve(server_name, addr)
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| ClientError::Transport {
                url: base.clone(),
                message: format!("HTTPS client: {e}"),
            })?;
        Ok(ApiClient {
            base,
            token: token.to_string(),
            http,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `method path` with an optional JSON body; decodes a JSON answer (`()`-like types may use
    /// `serde_json::Value`). A 204 decodes from `null`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        self.call_within(method, path, body, None).await
    }

    /// [`ApiClient::call`] with this request's own timeout instead of the client's (e.g. a peer
    /// call that restores a disk before it answers).
    pub async fn call_within<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let (_, bytes) = self.send(method, path, body, timeout).await?;
        let bytes = if bytes.is_empty() {
            b"null".as_slice().into()
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Transport {
            url: format!("{}{path}", self.base),
            message: format!("undecodable answer: {e}"),
        })
    }

    /// `GET path`, the answer's headers and raw body (for non-JSON answers such as the console).
    pub async fn get_raw(
        &self,
        path: &str,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), ClientError> {
        self.send(reqwest::Method::GET, path, None::<&()>, None)
            .await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| transport(&url, &e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(|e| transport(&url, &e))?;
        if status >= 400 {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(ClientError::Api {
                status,
                message: v["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string()),
                field: v["field"].as_str().map(str::to_string),
            });
        }
        Ok((headers, bytes))
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(reqwest::Method::GET, path, None::<&()>).await
    }
}
