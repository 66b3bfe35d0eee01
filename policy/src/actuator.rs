//! The trait through which the [`crate::Engine`] acts on the world: one method per [`crate::Step`].

use std::future::Future;

use crate::placement::PlacementError;
use crate::store::Transition;

/// Why a step failed. Any error makes the engine roll the transition back (or, if a rollback step
/// fails, mark the transition failed); retrying transient faults is the actuator's business.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The step could not be done; the text says why.
    #[error("{0}")]
    Failed(String),
    /// No host may take the secondary.
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

impl StepError {
    /// A [`StepError::Failed`] with this reason.
    pub fn failed(reason: impl Into<String>) -> Self {
        StepError::Failed(reason.into())
    }
}

/// What the daemon implements so that the engine can run transitions.
///
/// Every method must be **idempotent**: after a crash the engine runs the interrupted step again, and
/// a rollback may undo a step that never took effect. In particular `pick_secondary` must return the
/// host it already reserved for the VM, if any, and `release_secondary(vm, None)` must release
/// whatever was reserved for the VM. Methods must not return before their effect is durable
/// (e.g. `stop_epochs` returns once the last epoch is committed on the secondary).
///
/// Implementations may write `async fn` for each method; the futures must be `Send`.
pub trait Actuator: Send + Sync {
    /// Starts watching the VM (crash restarts, host failure → fencing and evacuation).
    fn start_monitoring(&self, vm: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Starts replicating the VM's volumes so that an evacuation finds its disks.
    fn start_volume_replication(
        &self,
        vm: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Chooses and reserves the secondary's host and returns its name. Implementations should use
    /// [`crate::pick_secondary`] and [`crate::placement::check_primary_host`]; the engine refuses a
    /// host equal to its own.
    fn pick_secondary(&self, vm: &str) -> impl Future<Output = Result<String, StepError>> + Send;

    /// Copies the VM to the secondary while it runs; returns when the secondary holds a full copy.
    fn initial_sync(
        &self,
        vm: &str,
        secondary: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Starts statepointing to the secondary: from now on output leaves only once acked.
    fn start_epochs(
        &self,
        vm: &str,
        secondary: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Stops statepointing cleanly: the last epoch is committed, held output released, the VM keeps
    /// running unprotected by FT.
    fn stop_epochs(&self, vm: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Tears the secondary down and frees its reservation. `secondary` is the host the engine knows
    /// of, `None` when a `pick_secondary` was interrupted before its answer was recorded.
    fn release_secondary(
        &self,
        vm: &str,
        secondary: Option<&str>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Stops replicating the VM's volumes.
    fn stop_volume_replication(
        &self,
        vm: &str,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Stops watching the VM.
    fn stop_monitoring(&self, vm: &str) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Called by [`crate::Engine::resume`] before resuming a transition that a crash interrupted while
    /// going forward: return an error when it cannot go on (e.g. the chosen secondary's host is gone),
    /// and the engine rolls it back instead. The default accepts every transition.
    fn check_resume(
        &self,
        vm: &str,
        transition: &Transition,
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        let _ = (vm, transition);
        async { Ok(()) }
    }
}
