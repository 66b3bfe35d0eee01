//! Where an FT VM's secondary may run: never on the primary's host, never on a host that is down or
//! already holds its limit of FT VMs (primaries and secondaries both count).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What the placement rules need to know about one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's name, as the agents call it.
    pub name: String,
    /// FT VMs on the host now: the primaries it runs plus the secondaries it holds.
    pub ft_vms: u32,
    /// Whether the host is up and accepts new secondaries.
    pub up: bool,
}

impl HostInfo {
    /// A host that is up and holds `ft_vms` FT VMs.
    pub fn up(name: impl Into<String>, ft_vms: u32) -> Self {
        HostInfo {
            name: name.into(),
            ft_vms,
            up: true,
        }
    }
}

/// Placement limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The most FT VMs (primaries plus secondaries) one host may hold.
    pub max_ft_vms_per_host: u32,
}

impl Default for Limits {
    /// Eight FT VMs per host.
    fn default() -> Self {
        Limits {
            max_ft_vms_per_host: 8,
        }
    }
}

/// Why one host cannot take a secondary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// The host is down or does not accept secondaries.
    Down {
        /// The host.
        host: String,
    },
    /// The host already holds the limit of FT VMs.
    Full {
        /// The host.
        host: String,
        /// FT VMs it holds.
        ft_vms: u32,
        /// The limit.
        limit: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Down { host } => write!(f, "{host} is down"),
            Refusal::Full {
                host,
                ft_vms,
                limit,
            } => write!(f, "{host} is full ({ft_vms}/{limit} FT VMs)"),
        }
    }
}

fn list(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(Refusal::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Errors of this module: every refusal names the VM and the hosts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No host other than the primary's is known.
    #[error("no secondary host for VM {vm}: no host other than its primary host {primary_host} is known")]
    NoOtherHost {
        /// The VM.
        vm: String,
        /// Its primary's host.
        primary_host: String,
    },
    /// Every other host is down or full.
    #[error("no secondary host for VM {vm} (primary on {primary_host}): {}", list(.refused))]
    NoneEligible {
        /// The VM.
        vm: String,
        /// Its primary's host.
        primary_host: String,
        /// Every other host and why it was refused, sorted by host name.
        refused: Vec<Refusal>,
    },
    /// The primary's host already holds its limit of FT VMs.
    #[error("VM {vm} cannot become FT on {host}: the host is full ({ft_vms}/{limit} FT VMs)")]
    PrimaryHostFull {
        /// The VM.
        vm: String,
        /// The primary's host.
        host: String,
        /// FT VMs it holds.
        ft_vms: u32,
        /// The limit.
        limit: u32,
    },
}

/// Picks the host for `vm`'s secondary: among the hosts that are up, are not `primary_host` and hold
/// fewer than `limits.max_ft_vms_per_host` FT VMs, the least loaded; ties go to the smallest name.
pub fn pick_secondary(
    vm: &str,
    primary_host: &str,
    hosts: &[HostInfo],
    limits: Limits,
) -> Result<String, PlacementError> {
    let mut others: Vec<&HostInfo> = hosts.iter().filter(|h| h.name != primary_host).collect();
    if others.is_empty() {
        return Err(PlacementError::NoOtherHost {
            vm: vm.to_string(),
            primary_host: primary_host.to_string(),
        });
    }
    others.sort_by(|a, b| (a.ft_vms, &a.name).cmp(&(b.ft_vms, &b.name)));
    let limit = limits.max_ft_vms_per_host;
    if let Some(h) = others.iter().find(|h| h.up && h.ft_vms < limit) {
        return Ok(h.name.clone());
    }
    let mut refused: Vec<Refusal> = others
        .iter()
        .map(|h| {
            if h.up {
                Refusal::Full {
                    host: h.name.clone(),
                    ft_vms: h.ft_vms,
                    limit,
                }
            } else {
                Refusal::Down {
                    host: h.name.clone(),
                }
            }
        })
        .collect();
    refused.sort_by(|a, b| refusal_host(a).cmp(refusal_host(b)));
    Err(PlacementError::NoneEligible {
        vm: vm.to_string(),
        primary_host: primary_host.to_string(),
        refused,
    })
}

fn refusal_host(r: &Refusal) -> &str {
    match r {
        Refusal::Down { host } | Refusal::Full { host, .. } => host,
    }
}

/// Checks that the primary's host may take one more FT VM. `hosts` should include `primary_host`; a
/// host missing from the list counts as empty.
pub fn check_primary_host(
    vm: &str,
    primary_host: &str,
    hosts: &[HostInfo],
    limits: Limits,
) -> Result<(), PlacementError> {
    let ft_vms = hosts
        .iter()
        .find(|h| h.name == primary_host)
        .map_or(0, |h| h.ft_vms);
    if ft_vms >= limits.max_ft_vms_per_host {
        return Err(PlacementError::PrimaryHostFull {
            vm: vm.to_string(),
            host: primary_host.to_string(),
            ft_vms,
            limit: limits.max_ft_vms_per_host,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u32) -> Limits {
        Limits {
            max_ft_vms_per_host: n,
        }
    }

    #[test]
    fn never_the_primary_host() {
        let hosts = [HostInfo::up("a", 0), HostInfo::up("b", 3)];
        assert_eq!(pick_secondary("vm1", "a", &hosts, limit(8)).unwrap(), "b");
    }

    #[test]
    fn least_loaded_then_name() {
        let hosts = [
            HostInfo::up("d", 2),
            HostInfo::up("c", 1),
            HostInfo::up("b", 1),
            HostInfo::up("a", 0),
        ];
        assert_eq!(pick_secondary("vm1", "a", &hosts, limit(8)).unwrap(), "b");
        assert_eq!(pick_secondary("vm1", "b", &hosts, limit(8)).unwrap(), "a");
    }

    #[test]
    fn skips_down_and_full_hosts() {
        let hosts = [
            HostInfo::up("a", 0),
            HostInfo {
                name: "b".into(),
                ft_vms: 0,
                up: false,
            },
            HostInfo::up("c", 2),
            HostInfo::up("d", 1),
        ];
        assert_eq!(pick_secondary("vm1", "a", &hosts, limit(2)).unwrap(), "d");
    }

    #[test]
    fn alone_is_refused_with_names() {
        let e = pick_secondary("vm1", "a", &[HostInfo::up("a", 0)], limit(8)).unwrap_err();
        assert!(matches!(e, PlacementError::NoOtherHost { .. }));
        let msg = e.to_string();
        assert!(msg.contains("vm1") && msg.contains(" a"), "{msg}");
        assert!(pick_secondary("vm1", "a", &[], limit(8)).is_err());
    }

    #[test]
    fn all_full_or_down_is_refused_with_each_reason() {
        let hosts = [
            HostInfo::up("a", 0),
            HostInfo::up("c", 4),
            HostInfo {
                name: "b".into(),
                ft_vms: 0,
                up: false,
            },
        ];
        let e = pick_secondary("vm1", "a", &hosts, limit(4)).unwrap_err();
        assert_eq!(
            e,
            PlacementError::NoneEligible {
                vm: "vm1".into(),
                primary_host: "a".into(),
                refused: vec![
                    Refusal::Down { host: "b".into() },
                    Refusal::Full {
                        host: "c".into(),
                        ft_vms: 4,
                        limit: 4
                    },
                ],
            }
        );
        assert_eq!(
            e.to_string(),
            "no secondary host for VM vm1 (primary on a): b is down, c is full (4/4 FT VMs)"
        );
    }

    #[test]
    fn primary_host_limit() {
        let hosts = [HostInfo::up("a", 2), HostInfo::up("b", 0)];
        check_primary_host("vm1", "a", &hosts, limit(3)).unwrap();
        check_primary_host("vm1", "z", &hosts, limit(1)).unwrap();
        let e = check_primary_host("vm1", "a", &hosts, limit(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM vm1 cannot become FT on a: the host is full (2/2 FT VMs)"
        );
    }

    #[test]
    fn zero_limit_refuses_everything() {
        let hosts = [HostInfo::up("a", 0), HostInfo::up("b", 0)];
        assert!(pick_secondary("vm1", "a", &hosts, limit(0)).is_err());
    }
}
