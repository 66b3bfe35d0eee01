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
//!
//! ## How the pieces fit
//! ```text
//!  Heartbeat ──observations──▶ Detector ──PeerEvent──▶ ┌─────────────┐ ──Action::Acquire/Renew──▶ Coordinator
//!  (role, generation) ◀──────── heartbeat_status ───── │ RoleMachine │ ◀──Event::Granted/…──────── (witness)
//!  replication acks, commits ─────────Event──────────▶ └─────────────┘ ──ReleaseOutputUpTo / StopReleasing /
//!                                                                          Promote / StartResync / Demote──▶ agent
//! ```
//! A caller owns the loop: it turns detector events and coordinator results into [`role::Event`]s,
//! feeds them to the [`role::RoleMachine`] with the current time, and carries out the [`role::Action`]s
//! it returns. `failover/tests/pair.rs` contains a small such loop over real sockets. **The agent's FT
//! node (`ax-agent/src/node.rs`) does not drive the machine yet**: it applies the same rules by hand
//! (issue 10 makes it a driver of the machine).
//!
//! ## The safety rule in one sentence
//! A host releases output only while it holds an unexpired lease on the VM's current *generation*,
//! granted by the witness, and measured from the moment it *sent* the request — so its own view of the
//! lease always ends before the witness's, and the witness grants a newer generation only after the old
//! lease expired there. See [`witness`] for the full argument.

pub mod detector;
pub mod heartbeat;
pub mod role;
pub mod witness;

mod wire;
