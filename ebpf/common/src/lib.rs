//! Map keys, values and constants shared by the Sinew eBPF programs and the node agent.
//!
//! Everything here is `#[repr(C)]`, padding-free and `Copy`, because the kernel compares map
//! keys byte for byte: a padding byte left uninitialised would make two equal keys differ.
//! Addresses are kept exactly as the kernel hands them to programs (network byte order, IPv4 in
//! `ip[0]`), ports in host order. IPv4-mapped IPv6 addresses are folded to IPv4 on both sides so
//! a dual-stack socket and an IPv4 socket describe a connection with the same key.
#![no_std]

/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;
/// `SOL_IP`, the level at which `SO_ORIGINAL_DST` is asked for IPv4.
pub const SOL_IP: i32 = 0;
/// `SOL_IPV6`, the level at which `IP6T_SO_ORIGINAL_DST` is asked for IPv6.
pub const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share this option number.
pub const SO_ORIGINAL_DST: i32 = 80;

/// The agent's outbound listener inside every enrolled pod (loopback only).
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's plaintext inbound listener inside every enrolled pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The agent's HBONE (mTLS tunnel) inbound listener inside every enrolled pod.
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// Sockets carrying this mark are never redirected (Istio's bypass mark).
pub const BYPASS_MARK: u32 = 0x539;

/// Index of the plaintext inbound listener in [`ListenerKey::slot`] (see [`listener_slot`]).
pub const SLOT_PLAINTEXT: u32 = 0;
/// Index of the HBONE inbound listener in [`ListenerKey::slot`] (see [`listener_slot`]).
pub const SLOT_HBONE: u32 = 1;
/// Listener slots per kind and address: sk_lookup spreads connections over them by source
/// port, and the agent points each at one of its workers' sockets (slot `w` at worker
/// `w % workers`). The program picks the exact socket (no `SO_REUSEPORT` selection), so a
/// process in the pod that joins the listeners' reuseport group never receives them.
pub const WORKER_SLOTS: u32 = 4;

/// The [`ListenerKey::slot`] of `kind` ([`SLOT_PLAINTEXT`] or [`SLOT_HBONE`]) for worker
/// slot `worker` (below [`WORKER_SLOTS`]).
pub const fn listener_slot(kind: u32, worker: u32) -> u32 {
    kind + 2 * worker
}

/// Capacity of the connection maps; LRU, so a burst past it evicts the oldest entries.
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Capacity of the enrolled-address and listener maps.
pub const MAX_POD_ADDRESSES: u32 = 16_384;

/// Names of the pinned maps (the agent opens them by these names under its bpffs directory).
pub mod maps {
    /// Socket cookie -> original destination, filled by connect4/6.
    pub const ORIG_BY_COOKIE: &str = "SINEW_ORIG_BY_COOKIE";
    /// [`super::ConnKey`] -> original destination, filled by sockops.
    pub const ORIG_BY_CONN: &str = "SINEW_ORIG_BY_CONN";
    /// [`super::IpKey`] of every captured pod address.
    pub const POD_ADDRS: &str = "SINEW_POD_ADDRS";
    /// [`super::ListenerKey`] -> the agent's in-pod inbound listener.
    pub const LISTENERS: &str = "SINEW_LISTENERS";
}

/// An IP address as the kernel gives it to programs, with its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Network-order words; IPv4 uses `ip[0]` and leaves the rest zero.
    pub ip: [u32; 4],
}

impl IpKey {
    /// An IPv4 address from its network-order word.
    pub const fn v4(ip: u32) -> Self {
        Self { family: AF_INET, ip: [ip, 0, 0, 0] }
    }

    /// An IPv6 address from its network-order words; IPv4-mapped addresses become IPv4.
    pub const fn v6(ip: [u32; 4]) -> Self {
        // ::ffff:a.b.c.d has words [0, 0, htonl(0xffff), a.b.c.d]; htonl(0xffff) reads as
        // 0xffff0000 on a little-endian host and 0x0000ffff on a big-endian one.
        if ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff) {
            Self::v4(ip[3])
        } else {
            Self { family: AF_INET6, ip }
        }
    }

    /// True for 127.0.0.0/8 and ::1.
    pub const fn is_loopback(&self) -> bool {
        if self.family == AF_INET {
            self.ip[0].to_ne_bytes()[0] == 127
        } else {
            self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == 0 && self.ip[3] == u32::from_be(1)
        }
    }
}

/// An address and a host-order port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    /// The address.
    pub ip: IpKey,
    /// Host byte order.
    pub port: u32,
}

/// Identifies one redirected connection as the agent sees it after `accept()`.
///
/// The netns cookie is what makes it unique: every pod connects from 127.0.0.1 to
/// 127.0.0.1:15001 in its own namespace, so the address pair alone repeats across pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    /// `SO_NETNS_COOKIE` of the pod's network namespace.
    pub netns_cookie: u64,
    /// The application's socket (the agent's peer).
    pub client: SockAddr,
    /// The agent's outbound listener the connection arrived on.
    pub listener: SockAddr,
}

/// Key of an in-pod inbound listener: the pod address the connection is for, and a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    /// The pod address.
    pub ip: IpKey,
    /// [`listener_slot`] of [`SLOT_PLAINTEXT`] or [`SLOT_HBONE`].
    pub slot: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is repr(C), Copy, made only of integers and has no padding, so any bit
    // pattern is a valid value and the kernel's bytes can be read back as-is.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<IpKey>(), 20);
        assert_eq!(core::mem::size_of::<SockAddr>(), 24);
        assert_eq!(core::mem::size_of::<ConnKey>(), 56);
        assert_eq!(core::mem::size_of::<ListenerKey>(), 24);
    }

    #[test]
    fn mapped_v6_folds_to_v4() {
        let v4 = u32::from_ne_bytes([198, 18, 0, 1]);
        let mapped = IpKey::v6([0, 0, u32::from_be(0xffff), v4]);
        assert_eq!(mapped, IpKey::v4(v4));
        assert!(!mapped.is_loopback());
        assert!(IpKey::v4(u32::from_ne_bytes([127, 0, 0, 1])).is_loopback());
        assert!(IpKey::v6([0, 0, 0, u32::from_be(1)]).is_loopback());
        assert!(!IpKey::v6([u32::from_be(0x2001_0002), 0, 0, u32::from_be(1)]).is_loopback());
    }
}
