//! End-to-end and fault-injection harness for ax (network namespaces, fault injection, observers).
//!
//! **Not implemented yet** (issue 3): the single-host statepoint tests live in `statepoint/tests/`.
