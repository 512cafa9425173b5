//! kiam's kernel programs. Attached (multi mode) to the kubelet's pods cgroup, they send every
//! TCP connection to the instance-metadata service to the local kiam agent, remember who made
//! it, and drop anything else addressed to the metadata service.
//!
//! How the agent learns who is calling, without trusting the source IP:
//! 1. `kiam_connect4`/`kiam_connect6` run in the caller's context: they record the caller's
//!    cgroup id and tgid under the client socket's cookie and rewrite the destination.
//! 2. `kiam_sock_ops` at `ACTIVE_ESTABLISHED_CB` (client side: the agent's SYN-ACK has
//!    arrived, the client's ACK is not sent yet) moves that record under the connection's
//!    4-tuple and asks for state callbacks, so the tuple entry is removed when the client
//!    socket closes. Only the socket the SYN-ACK reached gets here: a socket in another
//!    network namespace that bound someone else's address (`IP_TRANSPARENT`, which
//!    `CAP_NET_RAW` allows) sends a SYN whose answer goes to the address's real owner, so it
//!    never claims, nor poisons, that owner's tuple.
//! 3. `kiam_sock_ops` at `PASSIVE_ESTABLISHED_CB` (agent side, on the client's ACK, so after
//!    step 2; the agent's cgroup must be covered) moves the record under the cookie of the
//!    agent's new socket. The agent reads it after `accept()` with `getsockopt(SO_COOKIE)`.
//!    The record is bound to the agent's socket before the agent runs, so a client that
//!    connects, sends and closes before `accept()` is still identified.
//!
//! Minimum kernel: 5.8 (bpf links for cgroups 5.7; `bpf_get_socket_cookie` and
//! `bpf_get_current_cgroup_id` for sock_addr programs; `bpf_skb_cgroup_id` in cgroup_skb).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::info;
use kiam_common::{
    CONFIG_LOG_CONNECTIONS, CONFIG_READY, Config, ConnRecord, IMDS_ADDR4, IMDS_ADDR6, IMDS_PORT,
    RECORD_POISONED, TupleKey, V4_MAPPED_WORD, limits, stat, v4_mapped,
};

const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const ETH_P_IP_NET: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_NET: u32 = (0x86ddu16).to_be() as u32;
/// `user_port` holds the network-order port in its low 16 bits.
const IMDS_PORT_NET: u32 = IMDS_PORT.to_be() as u32;

/// `KIAM_EBPF_VARIANT` at build time, written into each connection record: a build with
/// another value is different code (other program tags), as a real upgrade is. The upgrade
/// test builds one (`cargo xtask build-ebpf --variant`); releases use 0.
const BUILD_VARIANT: u32 = match option_env!("KIAM_EBPF_VARIANT") {
    Some(v) => parse_u32(v),
    None => 0,
};

const fn parse_u32(text: &str) -> u32 {
    let bytes = text.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        value = value
            .wrapping_mul(10)
            .wrapping_add((bytes[i] - b'0') as u32);
        i += 1;
    }
    value
}

/// connect4/6 return values: 1 lets `connect()` proceed, 0 makes it fail with `EPERM`.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "KIAM_CONFIG")]
static KIAM_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "KIAM_EXEMPT")]
static KIAM_EXEMPT: HashMap<u64, u32> = HashMap::with_max_entries(limits::EXEMPT_ENTRIES, 0);

#[map(name = "KIAM_CONNECT")]
static KIAM_CONNECT: LruHashMap<u64, ConnRecord> =
    LruHashMap::with_max_entries(limits::CONNECT_ENTRIES, 0);

#[map(name = "KIAM_TUPLES")]
static KIAM_TUPLES: LruHashMap<TupleKey, ConnRecord> =
    LruHashMap::with_max_entries(limits::TUPLES_ENTRIES, 0);

#[map(name = "KIAM_ACCEPTED")]
static KIAM_ACCEPTED: LruHashMap<u64, ConnRecord> =
    LruHashMap::with_max_entries(limits::ACCEPTED_ENTRIES, 0);

#[map(name = "KIAM_THROTTLE")]
static KIAM_THROTTLE: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(limits::THROTTLE_ENTRIES, 0);

// Per-CPU because the bpfel target has no atomic read-modify-write.
#[map(name = "KIAM_STATS")]
static KIAM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = KIAM_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, not shared with a concurrent writer; the pointer comes from a
        // successful map lookup.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn config() -> Option<Config> {
    // Copied out so no reference outlives a concurrent update by the agent.
    KIAM_CONFIG.get(0).copied()
}

/// Redirects a TCP `connect()` to `169.254.169.254:80`.
#[cgroup_sock_addr(connect4)]
pub fn kiam_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; each field is read with a 4-byte load at a
    // constant offset, as the verifier requires.
    let (dst, port, sock_type) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).type_) };
    // Anything else to the metadata address (other ports, UDP) is dropped by the egress guard.
    if dst != IMDS_ADDR4 || port != IMDS_PORT_NET || sock_type != SOCK_STREAM {
        return ALLOW;
    }
    match redirect(ctx, v4_mapped(dst), stat::REDIRECTED4) {
        Redirect::To(config) => {
            // SAFETY: constant-offset 4-byte stores into the context.
            unsafe {
                (*sa).user_ip4 = config.agent_addr4;
                (*sa).user_port = agent_port_net(&config);
            }
            ALLOW
        }
        Redirect::Exempt => ALLOW,
        Redirect::Deny => DENY,
    }
}

/// Redirects a TCP `connect()` to `[fd00:ec2::254]:80` or `[::ffff:169.254.169.254]:80`.
/// An AF_INET6 socket runs only this hook, even for an IPv4-mapped destination.
#[cgroup_sock_addr(connect6)]
pub fn kiam_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx)
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: constant-offset 4-byte loads from the kernel-provided context.
    let (dst, port, sock_type) = unsafe { (read_user_ip6(sa), (*sa).user_port, (*sa).type_) };
    if port != IMDS_PORT_NET || sock_type != SOCK_STREAM {
        return ALLOW;
    }
    let mapped = dst == v4_mapped(IMDS_ADDR4);
    if !mapped && dst != IMDS_ADDR6 {
        return ALLOW;
    }
    match redirect(ctx, dst, stat::REDIRECTED6) {
        Redirect::To(config) => {
            // An IPv4-mapped destination must stay IPv4-mapped: the socket is talking IPv4.
            let to = if mapped {
                v4_mapped(config.agent_addr4)
            } else {
                config.agent_addr6
            };
            // SAFETY: constant-offset 4-byte stores into the context.
            unsafe {
                (*sa).user_ip6[0] = to[0];
                (*sa).user_ip6[1] = to[1];
                (*sa).user_ip6[2] = to[2];
                (*sa).user_ip6[3] = to[3];
                (*sa).user_port = agent_port_net(&config);
            }
            ALLOW
        }
        Redirect::Exempt => ALLOW,
        Redirect::Deny => DENY,
    }
}

/// # Safety
/// `sa` must be the program's context pointer.
#[inline(always)]
unsafe fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: per the contract; one 4-byte load per word (a 16-byte copy is rejected).
    unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    }
}

#[inline(always)]
fn agent_port_net(config: &Config) -> u32 {
    (config.agent_port as u16).to_be() as u32
}

enum Redirect {
    To(Config),
    Exempt,
    Deny,
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext, orig_addr: [u32; 4], counter: u32) -> Redirect {
    // SAFETY: helper without arguments, valid in sock_addr programs.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if KIAM_EXEMPT.get_ptr(cgroup_id).is_some() {
        count(stat::EXEMPT);
        return Redirect::Exempt;
    }
    // Fail closed: without a configured agent nobody gets through to the real service.
    let config = match config() {
        Some(config) if config.flags & CONFIG_READY != 0 => config,
        _ => {
            count(stat::DENIED_UNCONFIGURED);
            return Redirect::Deny;
        }
    };
    // A cgroup over its pod's rate of new connections: refused here, in its own context,
    // for the time the agent set, so the flood never reaches the agent.
    if let Some(until) = KIAM_THROTTLE.get_ptr(cgroup_id) {
        // SAFETY: pointer from a successful lookup; one 8-byte load. Helper without
        // arguments.
        if unsafe { bpf_ktime_get_ns() < *until } {
            count(stat::THROTTLED);
            return Redirect::Deny;
        }
    }
    // SAFETY: the context pointer is what the helper expects for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let record = ConnRecord {
        cgroup_id,
        client_cookie: cookie,
        // The upper half is the tgid.
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        orig_port: IMDS_PORT as u32,
        orig_addr,
        flags: 0,
        _reserved: BUILD_VARIANT,
    };
    if KIAM_CONNECT.insert(cookie, record, 0).is_err() {
        // Without a record the agent could not tell who is asking: refuse rather than guess.
        count(stat::DENIED_NO_RECORD);
        return Redirect::Deny;
    }
    count(counter);
    if config.flags & CONFIG_LOG_CONNECTIONS != 0 {
        info!(
            ctx,
            "redirect cookie={} cgroup={} tgid={}", cookie, cgroup_id, record.tgid
        );
    }
    Redirect::To(config)
}

/// Binds a redirected connection's record to the agent's accepted socket.
#[sock_ops]
pub fn kiam_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    1
}

/// Client side, softirq: the agent's SYN-ACK reached this socket, which proves it owns the
/// connection's 4-tuple; its ACK is sent after this returns.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) {
    // Runs for every TCP connection of every pod: a look at the destination and out, before
    // any helper call or hash lookup, unless it is the agent.
    let Some(config) = config() else {
        return;
    };
    let key = client_side_key(ctx);
    let to_agent = key.server_port == config.agent_port
        && (key.server_addr == v4_mapped(config.agent_addr4)
            || key.server_addr == config.agent_addr6);
    if !to_agent {
        return;
    }
    // SAFETY: the sock_ops context is a valid argument for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // Only sockets whose connect() was redirected carry a record; a direct connection to the
    // agent's address has none and is refused by the agent.
    let Some(record) = KIAM_CONNECT.get_ptr(cookie) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let record = unsafe { *record };
    let _ = KIAM_CONNECT.remove(cookie);
    // Never overwrite: two established sockets claiming one 4-tuple (in two network
    // namespaces with the same address) cannot be told apart. Poison the entry so the agent
    // answers neither, rather than the wrong one.
    if KIAM_TUPLES.insert(key, record, BPF_NOEXIST as u64).is_ok() {
        // Ask for STATE_CB so the tuple entry goes away when this socket closes, whether or
        // not the agent ever completed the handshake: a later connection reusing the tuple
        // must never inherit this record.
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else if let Some(existing) = KIAM_TUPLES.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup; a single 4-byte store.
        unsafe { (*existing).flags |= RECORD_POISONED };
        count(stat::TUPLE_COLLISION);
    }
}

/// Client side: the redirected socket changed state.
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let key = client_side_key(ctx);
    // SAFETY: the sock_ops context is a valid argument for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // Only the socket that created the entry may remove it, so a spoofer closing its own
    // socket cannot clear a poisoned entry.
    if let Some(entry) = KIAM_TUPLES.get_ptr(key)
        // SAFETY: pointer from a successful lookup.
        && unsafe { (*entry).client_cookie } == cookie
    {
        let _ = KIAM_TUPLES.remove(key);
    }
}

/// Agent side, softirq: the handshake completed and the socket waits in the accept queue.
#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(config) = config() else {
        return;
    };
    // Only the agent's listener carries redirected connections; skip the lookup for others.
    let server_port = local_port(ctx);
    if server_port != config.agent_port {
        return;
    }
    let key = TupleKey {
        client_addr: remote_addr(ctx),
        server_addr: local_addr(ctx),
        client_port: remote_port(ctx),
        server_port,
    };
    let Some(record) = KIAM_TUPLES.get_ptr(key) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let record = unsafe { *record };
    // SAFETY: the sock_ops context is a valid argument for the helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if KIAM_ACCEPTED.insert(cookie, record, 0).is_ok() {
        let _ = KIAM_TUPLES.remove(key);
        count(stat::BOUND);
    }
}

#[inline(always)]
fn client_side_key(ctx: &SockOpsContext) -> TupleKey {
    TupleKey {
        client_addr: local_addr(ctx),
        server_addr: remote_addr(ctx),
        client_port: local_port(ctx),
        server_port: remote_port(ctx),
    }
}

/// Reads one 4-byte context field. Volatile so that LLVM keeps every access a separate load at
/// a constant offset: merged loads through a computed pointer are rejected by the verifier
/// ("dereference of modified ctx ptr").
macro_rules! ctx_field {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: `ops` is the program's context pointer; the field is a 4-byte member.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$($field)+) }
    };
}

#[inline(always)]
fn local_port(ctx: &SockOpsContext) -> u32 {
    // Host order.
    ctx_field!(ctx, local_port)
}

#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u32 {
    // Network order in the upper 16 bits.
    u32::from_be(ctx_field!(ctx, remote_port))
}

// Both forms are loaded unconditionally and the *values* selected: selecting between two
// field addresses makes LLVM emit one load through a computed pointer, which is rejected.
#[inline(always)]
fn local_addr(ctx: &SockOpsContext) -> [u32; 4] {
    let v4 = ctx_field!(ctx, local_ip4);
    let v6 = [
        ctx_field!(ctx, local_ip6[0]),
        ctx_field!(ctx, local_ip6[1]),
        ctx_field!(ctx, local_ip6[2]),
        ctx_field!(ctx, local_ip6[3]),
    ];
    if ctx_field!(ctx, family) == AF_INET6 {
        v6
    } else {
        v4_mapped(v4)
    }
}

#[inline(always)]
fn remote_addr(ctx: &SockOpsContext) -> [u32; 4] {
    let v4 = ctx_field!(ctx, remote_ip4);
    let v6 = [
        ctx_field!(ctx, remote_ip6[0]),
        ctx_field!(ctx, remote_ip6[1]),
        ctx_field!(ctx, remote_ip6[2]),
        ctx_field!(ctx, remote_ip6[3]),
    ];
    if ctx_field!(ctx, family) == AF_INET6 {
        v6
    } else {
        v4_mapped(v4)
    }
}

/// Refuses `bind()` to the agent's TCP port in the agent's network namespace for everyone but
/// exempt cgroups, so a host-network pod cannot take the agent's place while it restarts and
/// answer other pods' requests. Pods keep the port in their own namespaces.
#[cgroup_sock_addr(bind4)]
pub fn kiam_bind4(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

/// `bind4` for IPv6 sockets (a dual-stack `[::]` listener receives IPv4 connections too).
#[cgroup_sock_addr(bind6)]
pub fn kiam_bind6(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx)
}

#[inline(always)]
fn guard_bind(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: constant-offset 4-byte loads from the kernel-provided context.
    let (port, sock_type) = unsafe { ((*sa).user_port, (*sa).type_) };
    let Some(config) = config() else {
        return ALLOW;
    };
    if sock_type != SOCK_STREAM || port != agent_port_net(&config) {
        return ALLOW;
    }
    if config.agent_netns_cookie != 0 {
        // SAFETY: the sock_addr context is a valid argument for the helper (Linux 5.7).
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        if netns != config.agent_netns_cookie {
            return ALLOW;
        }
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if KIAM_EXEMPT.get_ptr(cgroup_id).is_some() {
        return ALLOW;
    }
    count(stat::BIND_DENIED);
    DENY
}

/// Refuses the agent's port when the kernel chose it (`bind()` to port 0; `bind4` only sees
/// the port asked for) in the agent's network namespace, for everyone but exempt cgroups: a
/// host-network pod looping `bind(0)` while the agent is down would otherwise get it in the
/// end wherever the node's ephemeral range covers it. (`listen()` on an unbound socket picks
/// its port without this hook: the agent reserves its port with
/// `net.ipv4.ip_local_reserved_ports`, which the kernel never hands out.)
#[cgroup_sock(post_bind4)]
pub fn kiam_post_bind4(ctx: SockContext) -> i32 {
    guard_assigned_port(&ctx)
}

/// `post_bind4` for IPv6 sockets.
#[cgroup_sock(post_bind6)]
pub fn kiam_post_bind6(ctx: SockContext) -> i32 {
    guard_assigned_port(&ctx)
}

#[inline(always)]
fn guard_assigned_port(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: constant-offset 4-byte loads from the kernel-provided context; `src_port` is
    // host order.
    let (port, sock_type) = unsafe { ((*sk).src_port, (*sk).type_) };
    let Some(config) = config() else {
        return ALLOW;
    };
    if sock_type != SOCK_STREAM || port != config.agent_port {
        return ALLOW;
    }
    if config.agent_netns_cookie != 0 {
        // SAFETY: the sock context is a valid argument for the helper.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock.cast()) };
        if netns != config.agent_netns_cookie {
            return ALLOW;
        }
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if KIAM_EXEMPT.get_ptr(cgroup_id).is_some() {
        return ALLOW;
    }
    count(stat::BIND_DENIED);
    DENY
}

/// Drops packets still addressed to the metadata service: raw sockets and anything the
/// connect hooks let pass (other ports, UDP). Only exempt cgroups (the agent) get through.
#[cgroup_skb(egress)]
pub fn kiam_egress(ctx: SkBuffContext) -> i32 {
    if is_metadata_packet(&ctx) {
        // SAFETY: the skb context is a valid argument for the helper.
        let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
        if KIAM_EXEMPT.get_ptr(cgroup_id).is_none() {
            count(stat::GUARD_DROPPED);
            return 0;
        }
    }
    1
}

/// A pointer to a `T` at `offset` of the packet's linear data, if it is all there. Direct
/// packet access: no helper call, which every packet of every pod would otherwise pay.
#[inline(always)]
fn packet_at<T>(ctx: &SkBuffContext, offset: usize) -> Option<*const T> {
    // SAFETY: `skb` is the program's context; `data`/`data_end` are 4-byte members the
    // verifier turns into packet pointers.
    let (start, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn word_at(ctx: &SkBuffContext, offset: usize) -> Option<u32> {
    match packet_at::<u32>(ctx, offset) {
        // SAFETY: bounds checked against data_end just above; the header may not be 4-byte
        // aligned.
        Some(ptr) => Some(unsafe { core::ptr::read_unaligned(ptr) }),
        // Not in the linear data (rare): read it with the helper.
        None => ctx.load::<u32>(offset).ok(),
    }
}

#[inline(always)]
fn is_metadata_packet(ctx: &SkBuffContext) -> bool {
    // cgroup_skb data starts at the network header.
    let protocol = ctx.skb.protocol();
    if protocol == ETH_P_IP_NET {
        // IPv4 destination address at offset 16.
        word_at(ctx, 16) == Some(IMDS_ADDR4)
    } else if protocol == ETH_P_IPV6_NET {
        // IPv6 destination address at offset 24; its last word decides for nearly every
        // packet.
        let Some(w3) = word_at(ctx, 36) else {
            return false;
        };
        if w3 != IMDS_ADDR6[3] && w3 != IMDS_ADDR4 {
            return false;
        }
        let (Some(w0), Some(w1), Some(w2)) = (word_at(ctx, 24), word_at(ctx, 28), word_at(ctx, 32))
        else {
            return false;
        };
        let dst = [w0, w1, w2, w3];
        dst == IMDS_ADDR6 || (w0 == 0 && w1 == 0 && w2 == V4_MAPPED_WORD && w3 == IMDS_ADDR4)
    } else {
        false
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
