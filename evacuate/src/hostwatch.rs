//! Host deaths for the recovery engine, from the failover crate's heartbeats and detector.
//!
//! [`watch`] runs one [`failover::heartbeat::Heartbeat`] and one [`failover::detector`] per peer host
//! (UDP, one path each) and turns the detector's transitions into [`HostEvent`]s: `Dead` with the wall
//! time of the peer's last heartbeat (what the benchmark measures from), `Back` when a dead peer is heard
//! again or restarted. A peer that has **never** been heard from is reported as `NeverHeard`, not `Dead`:
//! a host whose agent was never up is no evidence that the host failed (and evacuating a healthy host's
//! VMs because its agent is not installed yet would be a disaster).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use failover::detector::{self, DetectorConfig, PeerEvent};
use failover::heartbeat::{
    new_incarnation, Heartbeat, HeartbeatConfig, HeartbeatHandle, PathConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Errors of the host watch.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A heartbeat could not be set up.
    #[error("heartbeat with {peer}: {source}")]
    Heartbeat {
        /// The peer.
        peer: String,
        /// The heartbeat error.
        source: failover::heartbeat::HeartbeatError,
    },
    /// The detector could not be set up.
    #[error("detector for {peer}: {source}")]
    Detector {
        /// The peer.
        peer: String,
        /// The detector error.
        source: failover::detector::DetectorError,
    },
}

/// One peer host to watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// Its name (= its Nova compute host name, and its heartbeat host id).
    pub name: String,
    /// Our UDP address for heartbeats with it.
    pub local: SocketAddr,
    /// Its UDP address for heartbeats with us.
    pub addr: SocketAddr,
}

/// A change in a peer host's liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// The host stopped answering.
    Dead {
        /// Its name.
        host: String,
        /// When it was last heard from.
        last_heard: SystemTime,
        /// How long it has been silent.
        silent_for: Duration,
    },
    /// A host that was dead is heard again (also after a restart).
    Back {
        /// Its name.
        host: String,
    },
    /// The host was first heard from.
    Up {
        /// Its name.
        host: String,
    },
    /// The host has not been heard from since the watch started.
    NeverHeard {
        /// Its name.
        host: String,
    },
}

/// Running heartbeats and detectors; dropping it stops them.
#[derive(Debug)]
pub struct HostWatch {
    _heartbeats: Vec<HeartbeatHandle>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HostWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Maps one detector event (with whether the peer was ever alive) to a host event.
pub fn map_event(
    host: &str,
    ev: &PeerEvent,
    ever_alive: bool,
    now: SystemTime,
) -> Option<HostEvent> {
    match ev {
        PeerEvent::Dead { silent_for } if ever_alive => Some(HostEvent::Dead {
            host: host.into(),
            last_heard: now.checked_sub(*silent_for).unwrap_or(now),
            silent_for: *silent_for,
        }),
        PeerEvent::Dead { .. } => Some(HostEvent::NeverHeard { host: host.into() }),
        PeerEvent::Alive { .. } if !ever_alive => Some(HostEvent::Up { host: host.into() }),
        PeerEvent::Alive { .. } | PeerEvent::Restarted { .. } => {
            Some(HostEvent::Back { host: host.into() })
        }
        _ => None,
    }
}

/// Starts heartbeats with every peer (inside a tokio runtime). `interval`/`timeout`: beat period and
/// the silence after which a peer is dead.
pub fn watch(
    me: &str,
    peers: &[PeerSpec],
    interval: Duration,
    timeout: Duration,
) -> Result<(HostWatch, mpsc::UnboundedReceiver<HostEvent>), WatchError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut w = HostWatch {
        _heartbeats: Vec::new(),
        tasks: Vec::new(),
    };
    let incarnation = new_incarnation();
    for p in peers {
        let mut cfg = HeartbeatConfig::new(
            me,
            incarnation,
            &p.name,
            vec![PathConfig {
                local: p.local,
                peer: p.addr,
            }],
        );
        cfg.interval = interval;
        cfg.timeout = timeout;
        let herr = |source| WatchError::Heartbeat {
            peer: p.name.clone(),
            source,
        };
        let dcfg = DetectorConfig::from_heartbeat(&cfg);
        let (hb, obs) = Heartbeat::bind(cfg).map_err(herr)?.start().map_err(herr)?;
        let mut det = detector::spawn(dcfg, obs).map_err(|source| WatchError::Detector {
            peer: p.name.clone(),
            source,
        })?;
        w._heartbeats.push(hb);
        let tx = tx.clone();
        let name = p.name.clone();
        w.tasks.push(tokio::spawn(async move {
            let mut ever_alive = false;
            while let Some(ev) = det.events.recv().await {
                let mapped = map_event(&name, &ev, ever_alive, SystemTime::now());
                if matches!(ev, PeerEvent::Alive { .. } | PeerEvent::Restarted { .. }) {
                    ever_alive = true;
                }
                if let Some(m) = mapped {
                    match &m {
                        HostEvent::Dead { silent_for, .. } => {
                            warn!(peer = %name, ?silent_for, "peer host dead")
                        }
                        other => info!(peer = %name, event = ?other, "peer host"),
                    }
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    Ok((w, rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let dead = PeerEvent::Dead {
            silent_for: Duration::from_secs(2),
        };
        assert_eq!(
            map_event("c1", &dead, true, now),
            Some(HostEvent::Dead {
                host: "c1".into(),
                last_heard: SystemTime::UNIX_EPOCH + Duration::from_secs(98),
                silent_for: Duration::from_secs(2)
            })
        );
        assert_eq!(
            map_event("c1", &dead, false, now),
            Some(HostEvent::NeverHeard { host: "c1".into() })
        );
        let alive = PeerEvent::Alive { incarnation: 1 };
        assert_eq!(
            map_event("c1", &alive, false, now),
            Some(HostEvent::Up { host: "c1".into() })
        );
        assert_eq!(
            map_event("c1", &alive, true, now),
            Some(HostEvent::Back { host: "c1".into() })
        );
        assert_eq!(
            map_event("c1", &PeerEvent::PathUp { path: 0 }, true, now),
            None
        );
    }

    #[tokio::test]
    async fn a_peer_that_stops_is_reported_dead_once_heard() {
        let a: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Two watchers on loopback; ports chosen by binding first.
        let pa = std::net::UdpSocket::bind(a).unwrap().local_addr().unwrap();
        let pb = std::net::UdpSocket::bind(a).unwrap().local_addr().unwrap();
        let iv = Duration::from_millis(10);
        let to = Duration::from_millis(80);
        let (wa, mut ra) = watch(
            "host-a",
            &[PeerSpec {
                name: "host-b".into(),
                local: pa,
                addr: pb,
            }],
            iv,
            to,
        )
        .unwrap();
        let (wb, _rb) = watch(
            "host-b",
            &[PeerSpec {
                name: "host-a".into(),
                local: pb,
                addr: pa,
            }],
            iv,
            to,
        )
        .unwrap();
        assert_eq!(
            ra.recv().await,
            Some(HostEvent::Up {
                host: "host-b".into()
            })
        );
        drop(wb);
        match ra.recv().await {
            Some(HostEvent::Dead {
                host, silent_for, ..
            }) => {
                assert_eq!(host, "host-b");
                assert!(silent_for >= to);
            }
            other => panic!("{other:?}"),
        }
        drop(wa);
    }
}
