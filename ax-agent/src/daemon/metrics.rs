//! `GET /metrics`: the Prometheus text format (0.0.4), written by hand from what the workers report.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Daemon, LocalRole};
use crate::ft::STUN_BUCKETS_US;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One metric family with a sample per VM.
fn per_vm<'a>(
    out: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    samples: impl Iterator<Item = (&'a str, f64)>,
) {
    family(out, name, kind, help);
    for (vm, v) in samples {
        let _ = writeln!(out, "{name}{{vm=\"{}\"}} {v}", esc(vm));
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric.
/// A counter family with one sample per `outcome` label.
fn by_outcome(out: &mut String, name: &str, help: &str, counts: &[(&str, &AtomicU64)]) {
    family(out, name, "counter", help);
    for (outcome, n) in counts {
        let _ = writeln!(
            out,
            "{name}{{outcome=\"{outcome}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
}

/// What this host's ha-node says about evacuations (`ha.node_socket`), counted over the recoveries it
/// keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evacuations {
    /// Evacuations Nova accepted.
    pub accepted: u64,
    /// Of those, VMs running (or SHUTOFF as they were) on their new host.
    pub recovered: u64,
    /// VMs whose recovery failed.
    pub failed: u64,
}

impl Evacuations {
    /// Counts the VMs of `recoveries` (the ha-node's `recoveries` answer).
    pub fn count(recoveries: &[evacuate::recovery::HostRecovery]) -> Self {
        let vms = recoveries.iter().flat_map(|r| r.vms.iter());
        let mut e = Evacuations::default();
        for vm in vms {
            e.accepted += u64::from(vm.accepted_ms.is_some());
            e.recovered += u64::from(vm.recovered_ms.is_some());
            e.failed += u64::from(vm.error.is_some());
        }
        e
    }
}

/// The text of `/metrics`; `evacuations` is `None` without an ha-node, `Some(None)` when it does not
/// answer.
pub fn render(d: &Daemon, evacuations: Option<Option<Evacuations>>) -> String {
    let sh = &d.shared;
    let mut out = String::new();
    let recs = sh.records();
    let statuses: Vec<_> = recs.iter().map(|r| (r, sh.status(&r.def.name))).collect();

    family(
        &mut out,
        "ax_vm_level",
        "gauge",
        "1 for the availability level each VM has on this host.",
    );
    for r in &recs {
        let pol = sh.store.vm(&r.def.name).ok().flatten().unwrap_or_default();
        let role = match r.role {
            LocalRole::Primary => "primary",
            LocalRole::Standby { .. } => "secondary",
        };
        for l in policy::Level::ALL {
            let _ = writeln!(
                out,
                "ax_vm_level{{vm=\"{}\",role=\"{role}\",level=\"{l}\"}} {}",
                esc(&r.def.name),
                u8::from(pol.current == l)
            );
        }
    }
    family(
        &mut out,
        "ax_vm_up",
        "gauge",
        "1 when the VM's worker answers.",
    );
    for (r, st) in &statuses {
        let _ = writeln!(
            out,
            "ax_vm_up{{vm=\"{}\"}} {}",
            esc(&r.def.name),
            u8::from(st.is_some())
        );
    }
    let protected: Vec<_> = statuses
        .iter()
        .filter_map(|(r, st)| {
            st.as_ref()
                .filter(|s| s.role == "protected")
                .map(|s| (r, s))
        })
        .collect();
    per_vm(
        &mut out,
        ("ax_epochs_total", "counter"),
        "Epochs sent to the secondary (current protection session).",
        protected
            .iter()
            .map(|(r, s)| (r.def.name.as_str(), s.epoch_sent as f64)),
    );
    per_vm(
        &mut out,
        ("ax_ack_lag_epochs", "gauge"),
        "Epochs sent but not yet acknowledged by the secondary.",
        protected
            .iter()
            .map(|(r, s)| (r.def.name.as_str(), s.ack_lag() as f64)),
    );
    per_vm(
        &mut out,
        ("ax_bytes_sent_total", "counter"),
        "Checkpoint frame bytes sent to the secondary.",
        protected
            .iter()
            .map(|(r, s)| (r.def.name.as_str(), s.bytes_sent as f64)),
    );
    family(
        &mut out,
        "ax_compression_ratio",
        "gauge",
        "Dirty memory captured / memory bytes sent (XOR, zero elision, zstd).",
    );
    for (r, s) in &protected {
        if s.compressed_bytes > 0 {
            let _ = writeln!(
                out,
                "ax_compression_ratio{{vm=\"{}\"}} {:.3}",
                esc(&r.def.name),
                s.raw_bytes as f64 / s.compressed_bytes as f64
            );
        }
    }
    family(
        &mut out,
        "ax_stun_seconds",
        "histogram",
        "Guest stun per epoch (pause to resume).",
    );
    for (r, s) in &protected {
        let vm = esc(&r.def.name);
        let mut cum = 0u64;
        for (i, n) in s.stun_buckets.iter().enumerate() {
            cum += n;
            let le = STUN_BUCKETS_US
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "ax_stun_seconds_bucket{{vm=\"{vm}\",le=\"{le}\"}} {cum}"
            );
        }
        let _ = writeln!(
            out,
            "ax_stun_seconds_sum{{vm=\"{vm}\"}} {}",
            s.stun_sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "ax_stun_seconds_count{{vm=\"{vm}\"}} {cum}");
    }
    per_vm(
        &mut out,
        ("ax_heartbeat_rtt_seconds", "gauge"),
        "Heartbeat round-trip time to the pair's other host (reported once the workers measure it).",
        statuses.iter().filter_map(|(r, st)| {
            let us = st.as_ref()?.hb_rtt_us?;
            Some((r.def.name.as_str(), us as f64 / 1e6))
        }),
    );
    per_vm(
        &mut out,
        ("ax_output_bytes_total", "counter"),
        "Guest output released to clients.",
        statuses.iter().filter_map(|(r, st)| {
            let b = st.as_ref()?.output_bytes?;
            Some((r.def.name.as_str(), b as f64))
        }),
    );
    let c = &sh.counters;
    for (name, help, n) in [
        (
            "ax_failovers_total",
            "VMs this host took over from a dead primary.",
            &c.failovers,
        ),
        (
            "ax_restarts_total",
            "Crashed VMs restarted in place.",
            &c.restarts,
        ),
        (
            "ax_takeovers_total",
            "Level-ha VMs of failed (fenced) hosts taken over by this host.",
            &c.takeovers,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", n.load(Ordering::Relaxed));
    }
    family(
        &mut out,
        "ax_guest_ends_total",
        "counter",
        "Guests that ended by themselves here: exited (an exit code) or crashed (a fatal exception, a panic).",
    );
    for (kind, n) in [("exited", &c.guest_exits), ("crashed", &c.guest_crashes)] {
        let _ = writeln!(
            out,
            "ax_guest_ends_total{{kind=\"{kind}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    if let Some(answer) = evacuations {
        family(
            &mut out,
            "ax_ha_node_up",
            "gauge",
            "1 if this host's HA engine (in the daemon, or the ha-node at ha.node_socket) answered the scrape.",
        );
        let _ = writeln!(out, "ax_ha_node_up {}", u8::from(answer.is_some()));
        if let Some(e) = answer {
            family(
                &mut out,
                "ax_evacuations_total",
                "counter",
                "Nova VMs of dead hosts this host's ha-node evacuated, by outcome (over the recoveries it keeps).",
            );
            for (outcome, n) in [
                ("accepted", e.accepted),
                ("recovered", e.recovered),
                ("failed", e.failed),
            ] {
                let _ = writeln!(out, "ax_evacuations_total{{outcome=\"{outcome}\"}} {n}");
            }
        }
    }
    if let Some(v) = &sh.volumes {
        by_outcome(
            &mut out,
            "ax_volume_replications_total",
            "Volume versions this host stored at its target, and replications that failed.",
            &[("ok", &v.counters.ok), ("failed", &v.counters.failed)],
        );
        family(
            &mut out,
            "ax_volume_bytes_uploaded_total",
            "counter",
            "Bytes of changed chunks sent to the volume target.",
        );
        let _ = writeln!(
            out,
            "ax_volume_bytes_uploaded_total {}",
            v.counters.bytes_uploaded.load(Ordering::Relaxed)
        );
    }
    by_outcome(
        &mut out,
        "ax_transitions_total",
        "Level transitions driven by this agent, by outcome.",
        &[
            ("done", &c.transitions_done),
            ("rolled_back", &c.transitions_rolled_back),
            ("failed", &c.transitions_failed),
        ],
    );
    family(
        &mut out,
        "ax_transitions_in_progress",
        "gauge",
        "Level transitions running now.",
    );
    let running = sh
        .store
        .vms()
        .map(|v| v.iter().filter(|(_, r)| r.transition.is_some()).count())
        .unwrap_or(0);
    let _ = writeln!(out, "ax_transitions_in_progress {running}");
    out
}
