//! Availability levels (`none`, `ha`, `ft`) and their transitions at runtime.
//!
//! - [`Level`]: the three levels, with serde and `FromStr`/`Display`.
//! - [`plan`]: the ordered steps of every transition and of its rollback.
//! - [`Actuator`]: the trait the daemon implements, one method per step.
//! - [`Engine`]: runs transitions through an `Actuator`, one per VM at a time, persisting a cursor
//!   after every step so that a transition interrupted by a crash is resumed or rolled back.
//! - [`Store`]: the embedded store (redb) of levels, transitions and the event history.
//! - [`placement`]: where an FT VM's secondary may go.
//!
//! See `policy/README.md` for the state diagram, prerequisites, effects and limitations.

#![warn(missing_docs)]

pub mod actuator;
pub mod engine;
pub mod level;
pub mod placement;
pub mod plan;
pub mod store;
#[cfg(test)]
mod testkit;

pub use actuator::{Actuator, StepError};
pub use engine::{Engine, EngineError, Outcome, Recovered, Request};
pub use level::{Level, LevelError};
pub use placement::{pick_secondary, HostInfo, Limits, PlacementError};
pub use plan::Step;
pub use store::{Event, EventKind, EventQuery, Phase, Store, StoreError, Transition, VmRecord};
