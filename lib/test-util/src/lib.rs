//! Test support: a local cluster of "nodes" and "pods" built from real network namespaces,
//! veth pairs, bridges and cgroup v2 directories, with real `sinew-agent` processes.
//!
//! Everything a [`Cluster`] creates is torn down when it is dropped, including when a test
//! panics: processes are killed, namespaces deleted, cgroups removed, pins unlinked.
//! Addresses come from 198.18.0.0/15 and 2001:2::/48 only, inside namespaces made here.
//!
//! Topology: a `fabric` namespace holds a bridge; node k has an uplink on it (198.18.0.k,
//! 2001:2:0:ff::k) and a bridge of its own for its pods (198.18.k.0/24, 2001:2:0:k::/64).
//! Nodes route each other's pod subnets, like a flat CNI.

pub mod cluster;
pub mod wire;

pub use cluster::{Agent, CONTROL_ADDR, Cluster, Node, Pod, sh};

/// Fails the test unless it runs as root: the root tier never skips itself.
pub fn must_be_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
    assert!(
        uid.split_whitespace().nth(2) == Some("0"),
        "the root tier needs root (CI runs as root): run `sudo -E env \"PATH=$PATH\" cargo xtask test`"
    );
}
