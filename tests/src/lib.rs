//! End-to-end tests over real network namespaces, cgroups, eBPF programs and agent processes.
//!
//! They need root (CI runs as root) and the binaries and eBPF object that `cargo xtask test`
//! builds first. A test that cannot get what it needs fails: it never skips.
