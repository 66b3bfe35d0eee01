//! # failover — heartbeat, failure detection, witness leases and promotion for ax FT pairs
//!
//! An FT pair is a *primary* host running a VM and a *secondary* host holding its replica (see
//! `docs/DESIGN.md` §3). This crate decides **who may release the VM's output**, and when the secondary
//! must take over. It does not move checkpoint frames (QUIC replication lives in the agent) and it does
//! not fence hosts (fencing commands live with the HA path); it tells its caller when to do those things.
//!
//! | module | concern |
//! |---|---|
//! | [`heartbeat`] | UDP heartbeats on one or two paths, echo replies for RTT, a strict wire format |
//! | [`detector`] | per-peer Alive → Suspect → Dead state machine (and back, with restart detection) |
//! | [`witness`] | the [`witness::Coordinator`] trait: generations and leases; a UDP witness server and client, an in-memory coordinator |
//! | [`role`] | the promotion state machine: pure, synchronous, deterministic; events in, actions out |
//! | [`rt`] | `SCHED_FIFO` and memory locking for the heartbeat and detector threads |
//!
//! ## How the pieces fit
//! ```text
//!  Heartbeat ──observations──▶ Detector ──PeerEvent──▶ ┌─────────────┐ ──Action::Cas──────────▶ Coordinator
//!  (role, generation) ◀──────── heartbeat_status ───── │ RoleMachine │ ◀──Event::Cas/CasFailed── (witness, etcd)
//!  replication acks, frames, sessions ──Event───────▶ └─────────────┘ ──Release / Ack / Promote / StartResync /
//!                                                                          Fence / DropReplica / …──▶ agent
//! ```
//! A caller owns the loop: it turns detector events and coordinator results into [`role::Event`]s,
//! feeds them to the [`role::RoleMachine`] with the current time, and carries out the [`role::Action`]s
//! it returns. [`sim`] contains such a driver over a simulated network. **The agent's FT node
//! (`ax-agent/src/node.rs`) does not drive the machine yet**: it still runs the v1 lease protocol of
//! [`witness`] by hand (issue 10 makes it a driver of the machine).
//!
//! ## The safety rule in one sentence
//! A primary releases an epoch's output once its secondary acknowledged that epoch under the
//! primary's generation, or alone under a generation it won by compare-and-set for running alone; a
//! secondary never acknowledges after it decided to promote, and promotes only under a generation it
//! won. No clock is involved. See `docs/DESIGN.md` §3.6 and [`role`].

pub mod coordinator;
pub mod detector;
pub mod heartbeat;
pub mod role;
pub mod rt;
pub mod sim;
pub mod witness;

mod wire;
