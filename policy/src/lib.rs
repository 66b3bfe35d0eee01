//! Availability levels (`none`, `ha`, `ft`) and their transitions at runtime.
//!
//! **Not implemented yet** (issue 4): this crate is a placeholder in the workspace layout and exports
//! nothing, so that no caller can believe level changes work.
