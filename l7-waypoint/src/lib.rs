//! `sinew-waypoint`: the optional L7 proxy (issue 5, not built yet).
//!
//! This crate holds its place in the workspace layout.
#![forbid(unsafe_code)]
