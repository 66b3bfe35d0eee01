//! Where OpenStack clients get their tokens.
//!
//! Swift can authenticate by TempAuth or by Keystone; Nova always by Keystone. Each client takes a
//! [`TokenSource`] so that one Keystone session can serve them all and re-issue its token before it
//! expires or when a service answers 401.

/// A token and, when the auth service tells it, the storage URL (TempAuth) or endpoint to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The value for the `X-Auth-Token` header.
    pub value: String,
    /// The URL the auth service named for the service (TempAuth's `X-Storage-Url`), if any.
    pub endpoint: Option<String>,
}

/// Errors of a token source.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The auth service refused the credentials.
    #[error("authentication refused by {url}: {status} {message}")]
    Refused {
        /// The auth URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The auth service could not be reached or answered nonsense.
    #[error("auth service {url}: {message}")]
    Unavailable {
        /// The auth URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// Something that hands out valid tokens.
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// A token valid now (cached, or freshly issued when the cached one is near expiry).
    fn token(&self) -> impl std::future::Future<Output = Result<Token, AuthError>> + Send;
    /// Forget the cached token (a service answered 401); the next [`TokenSource::token`] issues a new one.
    fn invalidate(&self);
}
