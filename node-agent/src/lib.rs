//! `sinew-agent`, the node agent: captures enrolled pods' TCP traffic with eBPF and carries it
//! between pods over mutually authenticated HBONE tunnels, enforcing L4 authorization.
//!
//! Per pod it attaches the capture programs (see the `sinew-ebpf` crate) to the pod's cgroup
//! and network namespace, and creates its own listeners inside the pod's namespace: 15001 for
//! traffic leaving the pod, 15006 for plaintext arriving at it, 15008 for HBONE. Upstream
//! sockets are created in the pod's namespace too, so traffic leaves with the pod's address
//! and routes. The agent itself runs in its own cgroup, so its sockets are never captured.
//!
//! Certificates ([`certs`]) and configuration ([`config`]) come from the control service;
//! the data path ([`proxy`]) resolves destinations against the mesh view and authorizes
//! inbound connections with `sinew-mesh`. Pods are enrolled through the local API ([`api`]),
//! persisted ([`pods`]), and re-adopted after a restart together with the pinned programs that
//! kept them failing closed meanwhile.

pub mod admin;
pub mod api;
pub mod bpf;
pub mod certs;
pub mod cgroup;
pub mod config;
pub mod explain;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod telemetry;
