//! `sinew-agent`, the node agent: captures enrolled pods' TCP traffic with eBPF and carries it.
//!
//! Per pod it attaches the capture programs (see the `sinew-ebpf` crate) to the pod's cgroup
//! and network namespace, and creates its own listeners inside the pod's namespace: 15001 for
//! traffic leaving the pod, 15006 for plaintext arriving at it. Upstream sockets are created in
//! the pod's namespace too, so traffic leaves with the pod's address and routes. The agent
//! itself runs in its own cgroup, so its sockets are never captured.
//!
//! Pods are enrolled through the local API ([`api`]), persisted ([`pods`]), and re-adopted
//! after a restart together with the pinned programs that kept them failing closed meanwhile.

pub mod api;
pub mod bpf;
pub mod cgroup;
pub mod netns;
pub mod pods;
pub mod proxy;
