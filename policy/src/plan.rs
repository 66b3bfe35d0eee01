//! The steps of each transition and of its rollback.
//!
//! | transition | steps |
//! |---|---|
//! | none → ha | `start_monitoring`, `start_volume_replication` |
//! | ha → ft | `pick_secondary`, `initial_sync`, `start_epochs` |
//! | ft → ha | `stop_epochs`, `release_secondary` |
//! | ha → none | `stop_volume_replication`, `stop_monitoring` |
//! | none → ft | none → ha, then ha → ft |
//! | ft → none | ft → ha, then ha → none |
//!
//! A rollback undoes the steps started so far (the one that failed or was interrupted included: steps
//! are idempotent, so undoing one that had no effect is harmless), latest first; see [`rollback`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::level::Level;

/// One idempotent step of a transition; each is one method of [`crate::Actuator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Start watching the VM and its host (HA).
    StartMonitoring,
    /// Start replicating the VM's volumes (HA).
    StartVolumeReplication,
    /// Choose and reserve the host of the secondary (FT).
    PickSecondary,
    /// Copy the VM's memory, state and disks to the secondary while the VM runs (FT).
    InitialSync,
    /// Start statepointing: epochs shipped to the secondary, output released on ack (FT).
    StartEpochs,
    /// Stop statepointing cleanly after the last committed epoch (FT).
    StopEpochs,
    /// Tear down the secondary and free its reservation (FT).
    ReleaseSecondary,
    /// Stop replicating the VM's volumes (HA).
    StopVolumeReplication,
    /// Stop watching the VM (HA).
    StopMonitoring,
}

impl Step {
    /// The name used in events and the API, e.g. `initial_sync`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::StartMonitoring => "start_monitoring",
            Step::StartVolumeReplication => "start_volume_replication",
            Step::PickSecondary => "pick_secondary",
            Step::InitialSync => "initial_sync",
            Step::StartEpochs => "start_epochs",
            Step::StopEpochs => "stop_epochs",
            Step::ReleaseSecondary => "release_secondary",
            Step::StopVolumeReplication => "stop_volume_replication",
            Step::StopMonitoring => "stop_monitoring",
        }
    }

    /// The steps that undo this one. `initial_sync` has none of its own: releasing the secondary
    /// (the undo of `pick_secondary`, which always precedes it) discards what was copied.
    pub fn undo(self) -> &'static [Step] {
        match self {
            Step::StartMonitoring => &[Step::StopMonitoring],
            Step::StartVolumeReplication => &[Step::StopVolumeReplication],
            Step::PickSecondary => &[Step::ReleaseSecondary],
            Step::InitialSync => &[],
            Step::StartEpochs => &[Step::StopEpochs],
            Step::StopEpochs => &[Step::StartEpochs],
            Step::ReleaseSecondary => &[Step::PickSecondary, Step::InitialSync],
            Step::StopVolumeReplication => &[Step::StartVolumeReplication],
            Step::StopMonitoring => &[Step::StartMonitoring],
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const UP_TO_HA: [Step; 2] = [Step::StartMonitoring, Step::StartVolumeReplication];
const UP_TO_FT: [Step; 3] = [Step::PickSecondary, Step::InitialSync, Step::StartEpochs];
const DOWN_TO_HA: [Step; 2] = [Step::StopEpochs, Step::ReleaseSecondary];
const DOWN_TO_NONE: [Step; 2] = [Step::StopVolumeReplication, Step::StopMonitoring];

/// The steps that take a VM from `from` to `to`, in order; empty when the levels are equal.
pub fn steps(from: Level, to: Level) -> Vec<Step> {
    use Level::*;
    match (from, to) {
        (None, Ha) => UP_TO_HA.to_vec(),
        (Ha, Ft) => UP_TO_FT.to_vec(),
        (Ft, Ha) => DOWN_TO_HA.to_vec(),
        (Ha, None) => DOWN_TO_NONE.to_vec(),
        (None, Ft) => [UP_TO_HA.as_slice(), &UP_TO_FT].concat(),
        (Ft, None) => [DOWN_TO_HA.as_slice(), &DOWN_TO_NONE].concat(),
        (None, None) | (Ha, Ha) | (Ft, Ft) => Vec::new(),
    }
}

/// The steps that undo `started` (the steps begun so far, in the order they were begun): the undo of
/// each, latest first.
pub fn rollback(started: &[Step]) -> Vec<Step> {
    started
        .iter()
        .rev()
        .flat_map(|s| s.undo().iter().copied())
        .collect()
}

/// Renders steps as `a, b, c` for events and messages.
pub fn describe(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Level::*;

    #[test]
    fn every_transition_has_its_steps() {
        assert_eq!(
            steps(None, Ha),
            [Step::StartMonitoring, Step::StartVolumeReplication]
        );
        assert_eq!(
            steps(Ha, Ft),
            [Step::PickSecondary, Step::InitialSync, Step::StartEpochs]
        );
        assert_eq!(steps(Ft, Ha), [Step::StopEpochs, Step::ReleaseSecondary]);
        assert_eq!(
            steps(Ha, None),
            [Step::StopVolumeReplication, Step::StopMonitoring]
        );
        assert_eq!(steps(None, Ft).len(), 5);
        assert_eq!(steps(Ft, None).len(), 4);
        for l in Level::ALL {
            assert!(steps(l, l).is_empty());
        }
    }

    #[test]
    fn full_rollback_is_the_reverse_transition() {
        for from in Level::ALL {
            for to in Level::ALL {
                let undo = rollback(&steps(from, to));
                // Undoing a whole transition is the reverse transition.
                assert_eq!(undo, steps(to, from), "{from}→{to}");
            }
        }
    }

    #[test]
    fn partial_rollback() {
        // none→ft interrupted during initial_sync.
        let s = steps(None, Ft);
        assert_eq!(
            rollback(&s[..4]),
            [
                Step::ReleaseSecondary,
                Step::StopVolumeReplication,
                Step::StopMonitoring
            ]
        );
        // ft→ha interrupted during release_secondary: back to ft needs a secondary again.
        assert_eq!(
            rollback(&steps(Ft, Ha)),
            [Step::PickSecondary, Step::InitialSync, Step::StartEpochs]
        );
        assert!(rollback(&[]).is_empty());
    }

    #[test]
    fn names() {
        assert_eq!(
            serde_json::to_string(&Step::InitialSync).unwrap(),
            "\"initial_sync\""
        );
        assert_eq!(describe(&steps(Ft, Ha)), "stop_epochs, release_secondary");
    }
}
