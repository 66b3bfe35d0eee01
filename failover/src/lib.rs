//! # failover — heartbeat, failure detection, coordinators and promotion for ax FT pairs
//!
//! An FT pair is a *primary* host running a VM and a *secondary* host holding its replica (see
//! `docs/DESIGN.md` §3). This crate decides **who may release the VM's output**, and when the secondary
//! must take over. It does not move checkpoint frames (QUIC replication lives in the agent) and it does
//! not fence hosts itself: it tells its caller when to, and [`fence`] is the one fence runner every caller
//! (the FT nodes, host-failure recovery, the Nova HA engine) uses.
//!
//! | module | concern |
//! |---|---|
//! | [`heartbeat`] | UDP heartbeats on one or two paths, echo replies for RTT, a strict wire format |
//! | [`detector`] | per-peer Alive → Suspect → Dead state machine (and back, with restart detection) |
//! | [`coordinator`] | the compare-and-set register of generations: the [`coordinator::Coordinator`] trait, the witness (mutual TLS), etcd, in memory |
//! | [`role`] | the promotion state machine: pure, synchronous, deterministic; events in, actions out |
//! | [`sim`] | a deterministic simulation of the protocol: drivers, coordinator, network, faults |
//! | [`fence`] | the fence command: argv template, timeout, attempts — the one fence runner |
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
//! it returns. [`sim`] contains such a driver over a simulated network; the agent's FT node
//! (`ft/src/node.rs`, crate `ax-ft`) is the production one.
//!
//! ## The safety rule in one sentence
//! A primary releases an epoch's output once its secondary acknowledged that epoch under the
//! primary's generation, or alone under a generation it won by compare-and-set for running alone; a
//! secondary never acknowledges after it decided to promote, and promotes only under a generation it
//! won. No clock is involved. See `docs/DESIGN.md` §3.6 and [`role`].

pub mod coordinator;
pub mod detector;
pub mod fence;
pub mod heartbeat;
pub mod role;
pub mod rt;
pub mod sim;

mod wire;
