//! Sinew's kernel programs: they capture an enrolled pod's TCP traffic for the node agent.
//!
//! Outbound, on the pod's cgroup: `connect4`/`connect6` remember the original destination by
//! socket cookie and point the connection at the agent's loopback listener; `sockops` re-keys that
//! entry by (netns cookie, client, listener) once the connection is established, which is what
//! the agent can name after `accept()`; `getpeername4`/`getpeername6` keep showing the
//! application the destination it asked for. On the agent's own cgroup, `getsockopt` answers
//! `SO_ORIGINAL_DST` from the re-keyed entry. Inbound, on the pod's network namespace,
//! `sk_lookup` hands every new TCP connection that did not come over loopback to the agent's
//! in-pod listener, and refuses it when the pod is enrolled but the agent is not listening
//! (fail closed).
//!
//! Every program is a thin entry around `try_*`, which returns `Err` to mean "leave the
//! connection alone": a capture program must never break traffic it does not own.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        bpf_sock, bpf_sock_addr, bpf_sockopt,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use sinew_ebpf_common::{
    AF_INET, AF_INET6, BYPASS_MARK, ConnKey, INBOUND_HBONE_PORT, IPPROTO_TCP, IpKey, ListenerKey,
    MAX_CONNECTIONS, MAX_POD_ADDRESSES, OUTBOUND_PORT, SLOT_HBONE, SLOT_PLAINTEXT, SO_ORIGINAL_DST,
    SOL_IP, SOL_IPV6, SockAddr, WORKER_SLOTS, listener_slot,
};

/// The verdicts of cgroup and sk_lookup programs.
const ALLOW: i32 = 1;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// `TCP_CLOSE` in `enum tcp_state`.
const TCP_CLOSE: u32 = 7;
/// `BPF_SK_LOOKUP_F_NO_REUSEPORT`: assign exactly the socket given.
const SK_LOOKUP_NO_REUSEPORT: u64 = 2;
/// Loopback's ifindex in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[map(name = "SINEW_ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map(name = "SINEW_ORIG_BY_CONN")]
static ORIG_BY_CONN: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map(name = "SINEW_POD_ADDRS")]
static POD_ADDRS: HashMap<IpKey, u32> = HashMap::pinned(MAX_POD_ADDRESSES, 0);

#[map(name = "SINEW_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_POD_ADDRESSES * 2 * WORKER_SLOTS, 0);

// ---- outbound: connect ----

#[cgroup_sock_addr(connect4)]
pub fn sinew_connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_connect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sinew_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect(&ctx, true);
    ALLOW
}

fn try_connect(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands cgroup/connect programs a valid bpf_sock_addr for the call.
    let (protocol, user_port) = unsafe { ((*sa).protocol, (*sa).user_port) };
    if protocol != IPPROTO_TCP {
        return Err(());
    }
    // SAFETY: as above; `sk` is always set for connect hooks.
    let sk: *mut bpf_sock = unsafe { (*sa).__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { (*sk).mark } == BYPASS_MARK {
        return Err(());
    }
    let ip = if v6 {
        // SAFETY: as above.
        IpKey::v6(unsafe { (*sa).user_ip6 })
    } else {
        IpKey::v4(unsafe { (*sa).user_ip4 })
    };
    if ip.is_loopback() {
        return Err(());
    }
    let port = u16::from_be(user_port as u16);
    let orig = SockAddr { ip, port: port as u32 };
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.insert(&cookie, &orig, 0).map_err(|_| ())?;

    let listener_port = (OUTBOUND_PORT.to_be()) as u32;
    // SAFETY: writing user_ip4/user_ip6/user_port is what connect hooks are for.
    unsafe {
        if v6 {
            if ip.family == AF_INET {
                // A dual-stack socket dialling an IPv4 address: keep it IPv4-mapped.
                (*sa).user_ip6 = [0, 0, u32::from_be(0xffff), u32::from_ne_bytes([127, 0, 0, 1])];
            } else {
                (*sa).user_ip6 = [0, 0, 0, u32::from_be(1)];
            }
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        }
        (*sa).user_port = listener_port;
    }
    Ok(())
}

// ---- outbound: re-key once established, forget at close ----

#[sock_ops]
pub fn sinew_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let _ = try_established(&ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let _ = try_closed(&ctx);
        }
        _ => {}
    }
    1
}

/// The remote port as a host-order number. The field carries the network-order port in its
/// upper 16 bits on current kernels and in the lower 16 on old ones; a port is never 0.
fn remote_port(ctx: &SockOpsContext) -> u32 {
    let raw = ctx.remote_port();
    let be = if raw >> 16 != 0 { (raw >> 16) as u16 } else { raw as u16 };
    u16::from_be(be) as u32
}

fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let (local, remote) = if ctx.family() == AF_INET6 {
        (IpKey::v6(ctx.local_ip6()), IpKey::v6(ctx.remote_ip6()))
    } else {
        (IpKey::v4(ctx.local_ip4()), IpKey::v4(ctx.remote_ip4()))
    };
    ConnKey {
        // SAFETY: the helper only reads the context it is given.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client: SockAddr { ip: local, port: ctx.local_port() },
        listener: SockAddr { ip: remote, port: remote_port(ctx) },
    }
}

fn try_established(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = conn_key(ctx);
    // SAFETY: the value is copied out at once; a concurrent delete can at worst give stale bytes
    // for a connection that is going away anyway.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        // Not redirected by us (or its entry aged out): an entry left under the same tuple
        // by an earlier connection nobody asked about must not answer for this one.
        let _ = ORIG_BY_CONN.remove(&key);
        return Err(());
    };
    ORIG_BY_CONN.insert(&key, &orig, 0).map_err(|_| ())?;
    // Ask for state callbacks so the cookie's entry goes away when the connection closes.
    ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).map_err(|_| ())?;
    Ok(())
}

fn try_closed(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    // Not ORIG_BY_CONN: a client that writes and closes at once can reach TCP_CLOSE before
    // the agent has accepted and asked for the original destination. The agent's question
    // removes it (try_getsockopt); one never asked for ages out of the LRU map.
    Ok(())
}

// ---- outbound: the application keeps seeing the destination it dialled ----

#[cgroup_sock_addr(getpeername4)]
pub fn sinew_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sinew_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, true);
    ALLOW
}

fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once, see try_established.
    let orig = *unsafe { ORIG_BY_COOKIE.get(&cookie) }.ok_or(())?;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: getpeername hooks may rewrite the address they report.
    unsafe {
        if v6 {
            (*sa).user_ip6 = if orig.ip.family == AF_INET {
                [0, 0, u32::from_be(0xffff), orig.ip.ip[0]]
            } else {
                orig.ip.ip
            };
        } else if orig.ip.family == AF_INET {
            (*sa).user_ip4 = orig.ip.ip[0];
        } else {
            return Err(());
        }
        (*sa).user_port = (orig.port as u16).to_be() as u32;
    }
    Ok(())
}

// ---- agent side: SO_ORIGINAL_DST ----

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sockopt(getsockopt)]
pub fn sinew_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_getsockopt(&ctx);
    ALLOW
}

fn try_getsockopt(ctx: &SockoptContext) -> Result<(), ()> {
    let so: *mut bpf_sockopt = ctx.sockopt;
    // SAFETY: the kernel hands cgroup/getsockopt programs a valid bpf_sockopt for the call.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return Err(());
    }
    // SAFETY: as above; `sk` is a full socket for sockopt hooks.
    let sk: *mut bpf_sock = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return Err(());
    }
    // The agent asks on its accepted socket: local = its listener, remote = the application.
    let (family, src_port, dst_port_be) = unsafe { ((*sk).family, (*sk).src_port, (*sk).dst_port) };
    let (local, remote) = if family == AF_INET6 {
        unsafe { (IpKey::v6((*sk).src_ip6), IpKey::v6((*sk).dst_ip6)) }
    } else {
        unsafe { (IpKey::v4((*sk).src_ip4), IpKey::v4((*sk).dst_ip4)) }
    };
    let key = ConnKey {
        // SAFETY: the helper only reads the context it is given.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client: SockAddr { ip: remote, port: u16::from_be(dst_port_be) as u32 },
        listener: SockAddr { ip: local, port: src_port },
    };
    // SAFETY: copied out at once, see try_established.
    let orig = *unsafe { ORIG_BY_CONN.get(&key) }.ok_or(())?;

    // SAFETY: optval..optval_end is the kernel's copy of the caller's buffer; every write below
    // is bounds-checked against it first, as the verifier also demands.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let len: i32 = if orig.ip.family == AF_INET {
            if start.add(core::mem::size_of::<SockaddrIn>()) > end {
                return Err(());
            }
            let out = SockaddrIn {
                family: AF_INET as u16,
                port_be: (orig.port as u16).to_be(),
                addr: orig.ip.ip[0],
                zero: [0; 8],
            };
            core::ptr::write_unaligned(start as *mut SockaddrIn, out);
            core::mem::size_of::<SockaddrIn>() as i32
        } else {
            if start.add(core::mem::size_of::<SockaddrIn6>()) > end {
                return Err(());
            }
            let out = SockaddrIn6 {
                family: AF_INET6 as u16,
                port_be: (orig.port as u16).to_be(),
                flowinfo: 0,
                addr: orig.ip.ip,
                scope_id: 0,
            };
            core::ptr::write_unaligned(start as *mut SockaddrIn6, out);
            core::mem::size_of::<SockaddrIn6>() as i32
        };
        // Two separate 4-byte stores: LLVM may otherwise merge them into one 8-byte store,
        // which the verifier rejects for this context.
        core::ptr::write_volatile(&mut (*so).optlen, len);
        core::ptr::write_volatile(&mut (*so).retval, 0);
    }
    // The agent asks once per connection: the entry has served.
    let _ = ORIG_BY_CONN.remove(&key);
    Ok(())
}

// ---- inbound: any port, to the agent's in-pod listener ----

#[sk_lookup]
pub fn sinew_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx).unwrap_or(SK_PASS)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, ()> {
    let l = ctx.lookup;
    // SAFETY: the kernel hands sk_lookup programs a valid bpf_sk_lookup for the call.
    let (protocol, family, ifindex, port, remote_port) = unsafe {
        ((*l).protocol, (*l).family, (*l).ingress_ifindex, (*l).local_port, (*l).remote_port)
    };
    // Loopback arrivals are the agent delivering to the application, or the pod talking to
    // itself: never steer those.
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return Err(());
    }
    // SAFETY: as above.
    let (ip, remote) = unsafe {
        if family == AF_INET6 {
            (IpKey::v6((*l).local_ip6), IpKey::v6((*l).remote_ip6))
        } else {
            (IpKey::v4((*l).local_ip4), IpKey::v4((*l).remote_ip4))
        }
    };
    // A connection from the pod's own address to itself is the agent delivering inside the pod
    // (the pod's own connections to itself were already captured outbound): leave it alone.
    // Such traffic does not reliably show the loopback ifindex, so the address is what counts.
    if ip == remote {
        return Err(());
    }
    // Addresses the agent has not enrolled are none of our business.
    if POD_ADDRS.get_ptr(&ip).is_none() {
        return Err(());
    }
    let kind = if port == INBOUND_HBONE_PORT as u32 { SLOT_HBONE } else { SLOT_PLAINTEXT };
    // Spread over the agent's workers by the client's port; the exact socket, never one the
    // kernel would pick from its reuseport group.
    let slot = listener_slot(kind, u32::from(u16::from_be(remote_port)) % WORKER_SLOTS);
    match LISTENERS.redirect_sk_lookup(ctx, ListenerKey { ip, slot }, SK_LOOKUP_NO_REUSEPORT) {
        Ok(()) => Ok(SK_PASS),
        // Enrolled but no agent listening: refuse (the client gets a reset) rather than let
        // the connection reach the application around the mesh.
        Err(_) => Ok(SK_DROP),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
