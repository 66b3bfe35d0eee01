//! A typed QMP client: the QEMU Machine Protocol over the VM's unix socket.
//!
//! QMP is JSON, one object per line. QEMU greets (`{"QMP": …}`), the client enters command mode
//! (`qmp_capabilities`), then sends `{"execute": …, "arguments": …, "id": N}` and gets
//! `{"return": …, "id": N}` or `{"error": {"class", "desc"}, "id": N}`; events
//! (`{"event": …, "data": …, "timestamp": …}`) arrive interleaved with replies at any time.
//!
//! [`Qmp`] runs a reader task that routes replies to their callers by id and events to an [`Events`]
//! stream. Every wait is bounded ([`Qmp::timeout`]); a line longer than [`MAX_LINE`] ends the
//! connection (QEMU is local, but a wedged or hostile peer must not make ax allocate without bound).
//! Typed commands implement [`Command`]; [`Qmp::execute`] takes any command by name for the few that
//! have no type here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// The longest QMP line ax accepts (a `query-block` of many disks is a few KiB).
pub const MAX_LINE: usize = 4 << 20;

/// Events buffered for the reader of [`Events`] before the oldest are dropped.
const EVENT_BUFFER: usize = 1024;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("connecting to QMP at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, …).
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// No answer in time.
    #[error("QMP {command}: no answer within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The bound.
        timeout: Duration,
    },
    /// The connection ended (QEMU quit or died).
    #[error("QMP connection closed")]
    Closed,
}

/// A QMP command with a typed reply.
pub trait Command: Serialize {
    /// The command's name (`query-status`).
    const NAME: &'static str;
    /// What it returns.
    type Reply: DeserializeOwned;
}

/// An event from QEMU.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// Its name (`SHUTDOWN`, `RESET`, `GUEST_PANICKED`, `STOP`, `RESUME`, `BLOCK_JOB_COMPLETED`, …).
    pub event: String,
    /// Its data (`{}` when it has none).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it (its host clock), when it said.
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

/// An event's time, as QEMU writes it (`{"seconds", "microseconds"}` since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// Microseconds since the epoch.
    pub fn micros(&self) -> i64 {
        self.seconds * 1_000_000 + self.microseconds
    }
}

impl Event {
    /// The typed view of the lifecycle events ax acts on.
    pub fn lifecycle(&self) -> Option<Lifecycle> {
        let s = |k: &str| self.data.get(k).and_then(Value::as_str).map(str::to_string);
        let guest = self
            .data
            .get("guest")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Some(match self.event.as_str() {
            "SHUTDOWN" => Lifecycle::Shutdown {
                guest,
                reason: s("reason").unwrap_or_default(),
            },
            "RESET" => Lifecycle::Reset {
                guest,
                reason: s("reason").unwrap_or_default(),
            },
            "GUEST_PANICKED" => Lifecycle::Panicked {
                action: s("action").unwrap_or_default(),
                info: self.data.get("info").map(Value::to_string),
            },
            "STOP" => Lifecycle::Stopped,
            "RESUME" => Lifecycle::Resumed,
            _ => return None,
        })
    }
}

/// The lifecycle events ax acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// `SHUTDOWN`: `reason` is QEMU's (`guest-shutdown`, `guest-panic`, `host-qmp-quit`, `host-signal`…).
    Shutdown {
        /// Whether the guest asked for it.
        guest: bool,
        /// QEMU's reason.
        reason: String,
    },
    /// `RESET`.
    Reset {
        /// Whether the guest asked for it.
        guest: bool,
        /// QEMU's reason.
        reason: String,
    },
    /// `GUEST_PANICKED` (a pvpanic device reported a kernel panic).
    Panicked {
        /// What QEMU does about it (`pause`, `poweroff`, `run`).
        action: String,
        /// The guest's panic information, when it gave any (JSON).
        info: Option<String>,
    },
    /// `STOP`: the vCPUs stopped.
    Stopped,
    /// `RESUME`: the vCPUs run again.
    Resumed,
}

/// QEMU's events, in order.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
}

impl Events {
    /// The next event; `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Events dropped because nobody read them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<std::sync::atomic::AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
    /// The bound on every command's answer.
    pub timeout: Duration,
    /// QEMU's version, from the greeting (`major.minor.micro`).
    pub version: (u64, u64, u64),
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path`, reads its greeting and enters command mode; every
    /// step, and later every command, is bounded by `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<(Qmp, Events), QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "connect".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut reader = BufReader::new(r);
        let greeting = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                timeout,
            })??
            .ok_or(QmpError::Closed)?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("greeting: {e}")))?;
        let v = greeting
            .pointer("/QMP/version/qemu")
            .ok_or_else(|| QmpError::Protocol(format!("not a QMP greeting: {greeting}")))?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let version = (n("major"), n("minor"), n("micro"));
        let pending: Pending = Arc::default();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(route(
            reader,
            Arc::clone(&pending),
            tx,
            Arc::clone(&dropped),
            Arc::clone(&closed),
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(w),
            pending,
            next_id: AtomicU64::new(1),
            closed,
            reader: task,
            timeout,
            version,
        };
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok((qmp, Events { rx, dropped }))
    }

    /// Runs a typed command.
    pub async fn run<C: Command>(&self, cmd: &C) -> Result<C::Reply, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|e| QmpError::Protocol(e.to_string()))?;
        let reply = self.execute(C::NAME, args).await?;
        // Commands without a reply return `{}`: a unit reply type reads it as null.
        let reply = match reply {
            Value::Object(m) if m.is_empty() => Value::Null,
            v => v,
        };
        serde_json::from_value(reply.clone())
            .map_err(|e| QmpError::Protocol(format!("{}: unexpected reply {reply}: {e}", C::NAME)))
    }

    /// Runs `command` with `arguments` (`Value::Null`: none) and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let timeout = self.timeout;
        let sent = tokio::time::timeout(timeout, async {
            let mut w = self.writer.lock().await;
            w.write_all(&line).await
        })
        .await;
        let to = || QmpError::Timeout {
            command: command.to_string(),
            timeout,
        };
        match sent {
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(to());
            }
            Ok(Err(e)) => {
                lock(&self.pending).remove(&id);
                return Err(e.into());
            }
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(to())
            }
            Ok(Err(_)) => Err(QmpError::Closed),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
        }
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at the end of the stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<String>, QmpError> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(QmpError::Protocol("connection ended inside a line".into()))
            };
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if done {
            return String::from_utf8(buf)
                .map(Some)
                .map_err(|_| QmpError::Protocol("a line that is not UTF-8".into()));
        }
    }
}

async fn route(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    events: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
    closed: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP: ending the connection");
                break;
            }
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = %line.trim_end(), "QMP: not JSON, ignored");
            continue;
        };
        if v.get("event").is_some() {
            match serde_json::from_value::<Event>(v) {
                Ok(ev) => {
                    if events.try_send(ev).is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "QMP: malformed event"),
            }
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let Some(tx) = lock(&pending).remove(&id) else {
            continue;
        };
        let result = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else {
            let e = v.get("error").cloned().unwrap_or_default();
            let s = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            Err((s("class"), s("desc")))
        };
        let _ = tx.send(result);
    }
    closed.store(true, Ordering::Release);
    // Callers waiting on a reply learn that the connection ended.
    lock(&pending).clear();
}

/// `query-status`.
#[derive(Debug, Clone, Serialize)]
pub struct QueryStatus;

/// `query-status`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `shutdown`, `guest-panicked`, `inmigrate`, …).
    pub status: String,
}

impl Command for QueryStatus {
    const NAME: &'static str = "query-status";
    type Reply = StatusInfo;
}

macro_rules! unit_command {
    ($ty:ident, $name:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Serialize)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = ();
        }
    };
}

unit_command!(Quit, "quit", "`quit`: QEMU exits at once.");
unit_command!(
    SystemPowerdown,
    "system_powerdown",
    "`system_powerdown`: an ACPI power button press."
);
unit_command!(Stop, "stop", "`stop`: pause the vCPUs.");
unit_command!(Cont, "cont", "`cont`: resume the vCPUs.");
unit_command!(
    SystemReset,
    "system_reset",
    "`system_reset`: reset the machine."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_events_decode() {
        let ev: Event = serde_json::from_str(
            r#"{"event":"SHUTDOWN","data":{"guest":true,"reason":"guest-shutdown"},"timestamp":{"seconds":1,"microseconds":2}}"#,
        )
        .unwrap();
        assert_eq!(
            ev.lifecycle(),
            Some(Lifecycle::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        let ev: Event =
            serde_json::from_str(r#"{"event":"GUEST_PANICKED","data":{"action":"pause"}}"#)
                .unwrap();
        assert!(matches!(ev.lifecycle(), Some(Lifecycle::Panicked { .. })));
        let ev: Event = serde_json::from_str(r#"{"event":"STOP"}"#).unwrap();
        assert_eq!(ev.lifecycle(), Some(Lifecycle::Stopped));
        let ev: Event = serde_json::from_str(r#"{"event":"BLOCK_JOB_READY","data":{}}"#).unwrap();
        assert_eq!(ev.lifecycle(), None);
    }

    #[tokio::test]
    async fn replies_route_by_id_and_events_interleave() {
        let dir = std::env::temp_dir().join(format!("ax-qmp-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":7,\"minor\":2,\"micro\":22}},\"capabilities\":[]}}\n").await.unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap() > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].clone();
                let reply = match v["execute"].as_str().unwrap() {
                    "query-status" => {
                        w.write_all(b"{\"event\":\"RESUME\",\"data\":{}}\n")
                            .await
                            .unwrap();
                        serde_json::json!({"return": {"running": true, "status": "running"}, "id": id})
                    }
                    "nope" => {
                        serde_json::json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": id})
                    }
                    _ => serde_json::json!({"return": {}, "id": id}),
                };
                let mut out = serde_json::to_vec(&reply).unwrap();
                out.push(b'\n');
                w.write_all(&out).await.unwrap();
                line.clear();
            }
        });
        let (qmp, mut events) = Qmp::connect(&sock, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.version, (7, 2, 22));
        let st = qmp.run(&QueryStatus).await.unwrap();
        assert!(st.running);
        assert_eq!(events.next().await.unwrap().event, "RESUME");
        qmp.run(&Stop).await.unwrap();
        let err = qmp.execute("nope", Value::Null).await.unwrap_err();
        assert!(err.to_string().contains("CommandNotFound"), "{err}");
        drop(qmp);
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
