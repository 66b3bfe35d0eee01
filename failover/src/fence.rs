//! Fencing: make sure a host that looks dead really is, before its VMs are started elsewhere.
//!
//! The fence action is a command (an argv template: `["fence_ipmilan", "--ip", "{host}-ipmi", "-o",
//! "off"]`; every `{host}` is replaced by the host's name, also given in `$AX_FENCE_HOST`) run without a
//! shell, with a timeout and a number of attempts. Exit status 0 means the host is fenced; anything else
//! — a non-zero exit, a timeout, a command that cannot be started, no command configured — means it is
//! **not**, and the recovery engine then raises an alert instead of evacuating (two copies of a VM
//! writing one disk is worse than a VM that stays down).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

/// Errors of fencing. Each names the host and the command.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// No fence command is configured.
    #[error("cannot fence {host}: no fence command configured")]
    NotConfigured {
        /// The host.
        host: String,
    },
    /// The host name cannot be put into a command.
    #[error("cannot fence {host:?}: not a host name (letters, digits, '.', '-', '_')")]
    BadHost {
        /// The host.
        host: String,
    },
    /// The command could not be started.
    #[error("fencing {host}: cannot run {command}: {source}")]
    Spawn {
        /// The host.
        host: String,
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command failed.
    #[error("fencing {host}: {command} failed ({status}) after {attempts} attempt(s): {stderr}")]
    Failed {
        /// The host.
        host: String,
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Attempts made.
        attempts: u32,
        /// The end of its stderr.
        stderr: String,
    },
    /// The command did not finish in time (it was killed).
    #[error("fencing {host}: {command} did not finish within {after:?} ({attempts} attempt(s))")]
    Timeout {
        /// The host.
        host: String,
        /// The command line.
        command: String,
        /// The timeout.
        after: Duration,
        /// Attempts made.
        attempts: u32,
    },
}

fn default_timeout() -> u64 {
    30
}
fn default_attempts() -> u32 {
    2
}

/// The fence command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceConfig {
    /// argv template; `{host}` is replaced by the host name. Empty: fencing always fails.
    #[serde(default)]
    pub command: Vec<String>,
    /// Timeout of one attempt, seconds (default 30).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Attempts before giving up (default 2).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

impl Default for FenceConfig {
    fn default() -> Self {
        FenceConfig {
            command: Vec::new(),
            timeout_secs: default_timeout(),
            attempts: default_attempts(),
        }
    }
}

/// A successful fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// Time from the first attempt to success.
    pub took: Duration,
    /// Attempts made.
    pub attempts: u32,
}

/// Runs the fence command: the one fence runner of ax (host-failure recovery, the Nova HA engine and
/// the FT nodes before a promotion all fence through it).
#[derive(Debug, Clone)]
pub struct Fencer {
    cfg: FenceConfig,
    /// Timeout of one attempt (`cfg.timeout_secs`, or finer with [`Fencer::with_timeout`]).
    timeout: Duration,
}

/// Whether `host` is a plain host name.
pub fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && !host.starts_with('-')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl Fencer {
    /// A fencer with `cfg`.
    pub fn new(cfg: FenceConfig) -> Self {
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        Fencer { cfg, timeout }
    }

    /// The same fencer with a timeout per attempt finer than whole seconds (at least 1 ms).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// A fencer for a shell command line (`sh -c`), as the agent's `[fence] command` is written:
    /// every `{host}` in `line` becomes `"$1"`, the host name passed as the script's first argument
    /// (never pasted into the script), also in `$AX_FENCE_HOST`; one attempt of `timeout`.
    pub fn shell(line: &str, timeout: Duration) -> Self {
        Fencer::new(FenceConfig {
            command: vec![
                "sh".into(),
                "-c".into(),
                line.replace("{host}", "\"$1\""),
                "ax-fence".into(),
                "{host}".into(),
            ],
            timeout_secs: timeout.as_secs().max(1),
            attempts: 1,
        })
        .with_timeout(timeout)
    }

    /// The argv for `host`.
    pub fn argv(&self, host: &str) -> Result<Vec<String>, FenceError> {
        if !valid_host(host) {
            return Err(FenceError::BadHost { host: host.into() });
        }
        if self.cfg.command.is_empty() {
            return Err(FenceError::NotConfigured { host: host.into() });
        }
        Ok(self
            .cfg
            .command
            .iter()
            .map(|a| a.replace("{host}", host))
            .collect())
    }

    /// Fences `host`: runs the command until it exits 0, at most `attempts` times.
    pub async fn fence(&self, host: &str) -> Result<Fenced, FenceError> {
        let argv = self.argv(host)?;
        let command = argv.join(" ");
        let timeout = self.timeout;
        let attempts = self.cfg.attempts.max(1);
        let t0 = Instant::now();
        let mut last = None;
        for attempt in 1..=attempts {
            let span = info_span!("fence", host, attempt);
            let r = async {
                let mut cmd = tokio::process::Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .env("AX_FENCE_HOST", host)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true);
                let child = cmd.spawn().map_err(|source| FenceError::Spawn {
                    host: host.into(),
                    command: command.clone(),
                    source,
                })?;
                match tokio::time::timeout(timeout, child.wait_with_output()).await {
                    Err(_) => Err(FenceError::Timeout {
                        host: host.into(),
                        command: command.clone(),
                        after: timeout,
                        attempts: attempt,
                    }),
                    Ok(Err(source)) => Err(FenceError::Spawn {
                        host: host.into(),
                        command: command.clone(),
                        source,
                    }),
                    Ok(Ok(out)) if out.status.success() => Ok(()),
                    Ok(Ok(out)) => {
                        let err = String::from_utf8_lossy(&out.stderr);
                        let tail: String = err.trim().chars().rev().take(400).collect();
                        Err(FenceError::Failed {
                            host: host.into(),
                            command: command.clone(),
                            status: out.status.to_string(),
                            attempts: attempt,
                            stderr: tail.chars().rev().collect(),
                        })
                    }
                }
            }
            .instrument(span)
            .await;
            match r {
                Ok(()) => {
                    info!(
                        host,
                        attempt,
                        took_ms = t0.elapsed().as_millis() as u64,
                        "fenced"
                    );
                    return Ok(Fenced {
                        took: t0.elapsed(),
                        attempts: attempt,
                    });
                }
                Err(e @ FenceError::Spawn { .. }) => return Err(e),
                Err(e) => {
                    warn!(host, attempt, error = %e, "fence attempt failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(FenceError::NotConfigured { host: host.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_secs: u64) -> Fencer {
        Fencer::new(FenceConfig {
            command: vec![
                "sh".into(),
                "-c".into(),
                script.into(),
                "fence".into(),
                "{host}".into(),
            ],
            timeout_secs,
            attempts: 2,
        })
    }

    #[tokio::test]
    async fn success_substitutes_the_host() {
        let dir = std::env::temp_dir().join(format!("ax-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = sh(&format!("echo $1 > {}/fenced", dir.display()), 5);
        let r = f.fence("compute1").await.unwrap();
        assert_eq!(r.attempts, 1);
        assert_eq!(
            std::fs::read_to_string(dir.join("fenced")).unwrap().trim(),
            "compute1"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn failure_retries_and_reports_stderr() {
        let e = sh("echo 'BMC unreachable' >&2; exit 3", 5)
            .fence("compute1")
            .await
            .unwrap_err();
        match &e {
            FenceError::Failed {
                attempts, stderr, ..
            } => {
                assert_eq!(*attempts, 2);
                assert_eq!(stderr, "BMC unreachable");
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("compute1"));
    }

    #[tokio::test]
    async fn timeout_kills_the_command() {
        let e = sh("sleep 30", 1).fence("h").await.unwrap_err();
        assert!(matches!(e, FenceError::Timeout { attempts: 2, .. }), "{e}");
    }

    #[tokio::test]
    async fn refuses_without_command_or_with_odd_host() {
        let f = Fencer::new(FenceConfig::default());
        assert!(matches!(
            f.fence("h").await,
            Err(FenceError::NotConfigured { .. })
        ));
        let f = sh("true", 1);
        for bad in ["", "-rf", "a b", "x;y", "$(id)"] {
            assert!(
                matches!(f.fence(bad).await, Err(FenceError::BadHost { .. })),
                "{bad}"
            );
        }
        let f = Fencer::new(FenceConfig {
            command: vec!["/nonexistent/fence".into()],
            ..FenceConfig::default()
        });
        assert!(matches!(f.fence("h").await, Err(FenceError::Spawn { .. })));
    }
}
