//! The daemon's [`policy::Actuator`]: what each step of a level transition does to a VM's worker and
//! to the peer agent holding its standby. Every step is idempotent (the engine runs a step again
//! after a crash, and a rollback may undo a step that never took effect).
//!
//! | step | effect |
//! |---|---|
//! | `start_monitoring` / `stop_monitoring` | the monitor restarts a crashed worker in place (or not) |
//! | `start_volume_replication` / `stop_…` | the VM's disk is (no longer) replicated to the volume target ([`super::volume`]); the first version is taken at once |
//! | `pick_secondary` | placement among the peers that answer (`GET /v1/host`), reserved in the VM record |
//! | `initial_sync` | the peer starts a standby worker (`PUT /v1/standbys/{vm}`); the local worker is told to protect to it; returns once the secondary holds the first consistent epoch |
//! | `start_epochs` | epochs follow the sync in the node; waits until the secondary acknowledges them |
//! | `stop_epochs` | the worker stops protecting: epochs stop, held output is released under a fresh generation, the VM runs solo |
//! | `release_secondary` | the peer stops its standby (`DELETE /v1/standbys/{vm}`); the reservation is dropped |

use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::{placement, Actuator, HostInfo, Limits, StepError, Transition};

use super::{LocalRole, Progress, Shared};
use crate::control::{Peer, WorkerRequest, WorkerStatus};

/// The actuator.
#[derive(Debug, Clone)]
pub struct Act(pub Arc<Shared>);

/// What a peer says about itself (`GET /v1/host`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HostView {
    /// Host name.
    pub name: String,
    /// FT VMs it holds.
    pub ft_vms: u32,
    /// Its limit.
    pub max_ft_vms: u32,
    /// VMs defined.
    pub vms: u32,
    /// Up (answered).
    pub up: bool,
    /// Agent version.
    pub version: String,
    /// The memory this host offers to VMs, MiB (`vm_memory_mib`, else the kernel's `MemAvailable`);
    /// absent when it could not be read (and from agents older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_offered_mib: Option<u64>,
    /// The memory of the VMs this host runs (or restarts), MiB.
    #[serde(default)]
    pub mem_promised_mib: u64,
    /// `mem_offered_mib` − `mem_promised_mib` (0 at least): what host-failure recovery places by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_free_mib: Option<u64>,
}

/// What the primary's agent asks a peer for (`PUT /v1/standbys/{vm}`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StandbyRequest {
    /// The primary's host.
    pub primary: String,
    /// The VM's definition.
    pub def: super::VmDef,
    /// The primary worker's link address.
    pub primary_link: std::net::SocketAddr,
    /// The primary worker's heartbeat address.
    pub primary_hb: std::net::SocketAddr,
    /// The guest ELF (base64) when the VM runs an uploaded one (`def.guest_elf_sha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_elf: Option<String>,
    /// A QEMU VM's: the primary's QEMU version (`7.2.0`); the peer refuses a COLO secondary of
    /// another version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
}

/// The ports of a standby worker.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StandbyPorts {
    /// Its link port.
    pub link_port: u16,
    /// Its heartbeat port.
    pub hb_port: u16,
}

fn failed(e: impl std::fmt::Display) -> StepError {
    StepError::failed(e.to_string())
}

impl Act {
    fn s(&self) -> &Shared {
        &self.0
    }

    fn progress(&self, vm: &str, step: &str) {
        let mut p = self.s().progress(vm).unwrap_or_default();
        p.step = Some(step.to_string());
        self.s().set_progress(vm, Some(p));
    }

    fn primary_record(&self, vm: &str) -> Result<super::VmRecordLocal, StepError> {
        let rec = self
            .s()
            .record(vm)
            .ok_or_else(|| StepError::failed(format!("no VM named {vm} on this host")))?;
        if rec.role != LocalRole::Primary {
            return Err(StepError::failed(format!(
                "{vm} is a standby on this host: its primary's agent changes its level"
            )));
        }
        Ok(rec)
    }

    async fn status(&self, vm: &str) -> Option<WorkerStatus> {
        let r = self
            .s()
            .worker_call(vm, &WorkerRequest::Status)
            .await
            .ok()?;
        r.status
    }

    /// Asks every configured peer about itself.
    pub async fn hosts(&self) -> Vec<HostView> {
        let mut out = Vec::new();
        for p in &self.s().cfg.peers {
            let view = match self.s().peer(&p.name) {
                Some(c) => c.get::<HostView>("/v1/host").await.ok(),
                None => None,
            };
            out.push(view.unwrap_or(HostView {
                name: p.name.clone(),
                ft_vms: 0,
                max_ft_vms: 0,
                vms: 0,
                up: false,
                version: String::new(),
                mem_offered_mib: None,
                mem_promised_mib: 0,
                mem_free_mib: None,
            }));
        }
        out
    }

    /// This host's FT placement limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_ft_vms_per_host: self.s().cfg.max_ft_vms_per_host,
        }
    }

    /// This host and its peers as placement sees them (a peer that does not answer is down; a peer at
    /// its own FT limit is full whatever ours says).
    pub async fn placement_hosts(&self) -> Vec<HostInfo> {
        let limits = self.limits();
        let mut hosts = vec![HostInfo::up(self.s().cfg.host.clone(), self.s().ft_vms())];
        for h in self.hosts().await {
            hosts.push(HostInfo {
                name: h.name,
                ft_vms: if h.up && h.ft_vms >= h.max_ft_vms {
                    limits.max_ft_vms_per_host
                } else {
                    h.ft_vms
                },
                up: h.up,
            });
        }
        hosts
    }

    async fn wait_for(
        &self,
        vm: &str,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&WorkerStatus) -> Result<bool, String>,
    ) -> Result<WorkerStatus, StepError> {
        let t = Instant::now();
        let mut last = None;
        while t.elapsed() < timeout {
            if let Some(st) = self.status(vm).await {
                if let Some(sync) = &st.sync {
                    let mut p = self.s().progress(vm).unwrap_or_default();
                    p.sync = Some(sync.clone());
                    self.s().set_progress(vm, Some(p));
                }
                if done(&st).map_err(failed)? {
                    return Ok(st);
                }
                last = Some(st);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(StepError::failed(format!(
            "{what}: not done after {timeout:?} (worker: {})",
            last.map_or("no answer".into(), |s| format!("role {}", s.role))
        )))
    }
}

impl Actuator for Act {
    async fn start_monitoring(&self, vm: &str) -> Result<(), StepError> {
        self.progress(vm, "start_monitoring");
        self.s().update(vm, |r| r.monitored = true).map_err(failed)
    }

    async fn start_volume_replication(&self, vm: &str) -> Result<(), StepError> {
        self.progress(vm, "start_volume_replication");
        let rec = self.primary_record(vm)?;
        let Some(v) = &self.s().volumes else {
            if rec.def.has_disk() {
                self.s().note(
                    vm,
                    "volume replication: no target is configured ([swift] or [sheepdog]): the disk is not replicated",
                );
            }
            return Ok(());
        };
        if !rec.def.has_disk() {
            return Ok(());
        }
        if !rec.volume {
            self.s().update(vm, |r| r.volume = true).map_err(failed)?;
            self.s()
                .note(vm, format!("volume replication to {} started", v.target));
        }
        v.ask(vm);
        Ok(())
    }

    async fn pick_secondary(&self, vm: &str) -> Result<String, StepError> {
        self.progress(vm, "pick_secondary");
        let rec = self.primary_record(vm)?;
        if let Some(h) = rec.secondary {
            return Ok(h);
        }
        if !rec.running || rec.down_reason.is_some() {
            return Err(StepError::failed(format!("{vm} is not running")));
        }
        if let Some(q) = &rec.def.qemu {
            super::check_colo_capable(vm, q).map_err(StepError::failed)?;
            self.s()
                .colo_support(q)
                .await
                .map_err(|e| StepError::failed(format!("{vm}: {e}")))?;
        }
        let me = &self.s().cfg.host;
        let limits = self.limits();
        let here = [HostInfo::up(me.clone(), self.s().ft_vms())];
        placement::check_primary_host(vm, me, &here, limits)?;
        let hosts = self.placement_hosts().await;
        let host = policy::pick_secondary(vm, me, &hosts, limits)?;
        self.s()
            .update(vm, |r| r.secondary = Some(host.clone()))
            .map_err(failed)?;
        Ok(host)
    }

    async fn initial_sync(&self, vm: &str, secondary: &str) -> Result<(), StepError> {
        self.progress(vm, "initial_sync");
        let rec = self.primary_record(vm)?;
        let peer_cfg = self
            .s()
            .cfg
            .peer(secondary)
            .ok_or_else(|| StepError::failed(format!("{secondary} is not a configured peer")))?
            .clone();
        let client = self
            .s()
            .peer(secondary)
            .ok_or_else(|| StepError::failed(format!("no client for {secondary}")))?;
        let (link, hb, _) = self.s().worker_addrs(rec.slot, rec.def.output_port);
        let guest_elf = match &rec.def.guest_elf_sha256 {
            None => None,
            Some(_) => {
                use base64::Engine as _;
                let path = self.s().vm_dir(vm).join(super::GUEST_ELF);
                let elf = crate::guest::read_elf(&path).map_err(StepError::failed)?;
                Some(base64::engine::general_purpose::STANDARD.encode(elf))
            }
        };
        let qemu_version = match &rec.def.qemu {
            Some(q) => Some(self.s().colo_support(q).await.map_err(StepError::failed)?),
            None => None,
        };
        let req = StandbyRequest {
            primary: self.s().cfg.host.clone(),
            def: rec.def.clone(),
            primary_link: link,
            primary_hb: hb,
            guest_elf,
            qemu_version,
        };
        let ports: StandbyPorts = client
            .call(
                reqwest::Method::PUT,
                &format!("/v1/standbys/{vm}"),
                Some(&req),
            )
            .await
            .map_err(|e| StepError::failed(format!("{secondary}: starting the standby: {e}")))?;
        let peer = Peer {
            name: secondary.to_string(),
            link: std::net::SocketAddr::new(peer_cfg.link, ports.link_port),
            hb: std::net::SocketAddr::new(peer_cfg.hb, ports.hb_port),
            hb2: peer_cfg
                .hb2
                .map(|ip| std::net::SocketAddr::new(ip, ports.hb_port)),
        };
        // The standby needs a moment to listen; the node retries its connection every 100 ms.
        let t = Instant::now();
        loop {
            match self
                .s()
                .worker_call(vm, &WorkerRequest::Protect { peer: peer.clone() })
                .await
            {
                Ok(_) => break,
                Err(e) if t.elapsed() > Duration::from_secs(10) => return Err(failed(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let sec = secondary.to_string();
        self.wait_for(vm, "initial sync", Duration::from_secs(600), |st| {
            Ok(st.role == "protected"
                && st.peer.as_deref() == Some(&sec)
                && st.sync.as_ref().is_some_and(|s| s.done))
        })
        .await?;
        Ok(())
    }

    async fn start_epochs(&self, vm: &str, secondary: &str) -> Result<(), StepError> {
        self.progress(vm, "start_epochs");
        let sec = secondary.to_string();
        let first = self
            .wait_for(vm, "first epochs", Duration::from_secs(60), |st| {
                Ok(st.role == "protected" && st.peer.as_deref() == Some(&sec))
            })
            .await?;
        let from = first.epoch_acked_plus_one;
        self.wait_for(vm, "epochs acknowledged", Duration::from_secs(60), |st| {
            Ok(st.role == "protected" && st.epoch_acked_plus_one > from)
        })
        .await?;
        Ok(())
    }

    async fn stop_epochs(&self, vm: &str) -> Result<(), StepError> {
        self.progress(vm, "stop_epochs");
        let rec = self.primary_record(vm)?;
        if !rec.running || self.s().worker_alive(vm).is_none() {
            return Ok(());
        }
        self.s()
            .worker_call(vm, &WorkerRequest::Unprotect)
            .await
            .map_err(failed)?;
        self.wait_for(vm, "stop epochs", Duration::from_secs(30), |st| {
            Ok(st.role == "solo")
        })
        .await?;
        Ok(())
    }

    async fn release_secondary(&self, vm: &str, secondary: Option<&str>) -> Result<(), StepError> {
        self.progress(vm, "release_secondary");
        let rec = self.primary_record(vm)?;
        // Never leave the worker protecting to a host being released (a rollback during the sync).
        if rec.running && self.s().worker_alive(vm).is_some() {
            self.s()
                .worker_call(vm, &WorkerRequest::Unprotect)
                .await
                .map_err(failed)?;
        }
        let host = secondary.map(str::to_string).or(rec.secondary.clone());
        if let Some(h) = &host {
            match self.s().peer(h) {
                Some(c) => {
                    let r: Result<serde_json::Value, _> = c
                        .call(
                            reqwest::Method::DELETE,
                            &format!("/v1/standbys/{vm}"),
                            None::<&()>,
                        )
                        .await;
                    match r {
                        Ok(_) => {}
                        Err(e) if e.status() == Some(404) => {}
                        // The standby cannot be promoted over the primary: the primary moved to a
                        // fresh generation when it stopped protecting (stop_epochs), so the
                        // witness refuses the stale replica. Its agent removes it when it returns.
                        Err(e) => self.s().note(
                            vm,
                            format!("release_secondary: {h} unreachable ({e}); its stale standby can never be promoted"),
                        ),
                    }
                }
                None => self.s().note(
                    vm,
                    format!("release_secondary: {h} is no longer a configured peer"),
                ),
            }
        }
        self.s()
            .update(vm, |r| r.secondary = None)
            .map_err(failed)?;
        Ok(())
    }

    async fn stop_volume_replication(&self, vm: &str) -> Result<(), StepError> {
        self.progress(vm, "stop_volume_replication");
        if self.s().record(vm).is_some_and(|r| r.volume) {
            self.s().update(vm, |r| r.volume = false).map_err(failed)?;
            self.s()
                .note(vm, "volume replication stopped (stored versions are kept)");
        }
        Ok(())
    }

    async fn stop_monitoring(&self, vm: &str) -> Result<(), StepError> {
        self.progress(vm, "stop_monitoring");
        self.s().update(vm, |r| r.monitored = false).map_err(failed)
    }

    async fn check_resume(&self, vm: &str, t: &Transition) -> Result<(), StepError> {
        self.s().set_progress(vm, Some(Progress::default()));
        let rec = self.primary_record(vm)?;
        if t.to == policy::Level::Ft && (!rec.running || rec.down_reason.is_some()) {
            return Err(StepError::failed(format!("{vm} is not running")));
        }
        if let Some(h) = &t.secondary {
            let up = match self.s().peer(h) {
                Some(c) => c.get::<HostView>("/v1/host").await.is_ok(),
                None => false,
            };
            if !up && t.to == policy::Level::Ft {
                return Err(StepError::failed(format!(
                    "the secondary's host {h} does not answer"
                )));
            }
        }
        Ok(())
    }
}
