//! `sinew-control`: the mesh's CA and configuration service (issue 3, not built yet).
//!
//! This crate holds its place in the workspace layout; the resource model it will serve
//! already lives in `sinew-model`.
#![forbid(unsafe_code)]
