//! Types shared by the kiam eBPF programs (`kiam-ebpf`) and the agent.
//!
//! Every map key and value is `#[repr(C)]`, `Copy` and free of padding so the kernel and user
//! space agree on its bytes. Addresses are kept as four network-order `u32` words; IPv4
//! addresses use their IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) so one key type serves both
//! families. Ports are host order.
//!
//! With the `user` feature the types implement `aya::Pod`, [`addr`] converts between these
//! words and `std::net` types, and [`sys`] reads what the programs compare against: a
//! socket's network-namespace cookie, and a cgroup's directory from its id.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

/// Names of the maps, as `bpftool map list` shows them (the kernel keeps 15 characters).
pub mod map_names {
    /// `Array<Config>` with one entry: where to redirect, and whether the agent is ready.
    pub const CONFIG: &str = "KIAM_CONFIG";
    /// `HashMap<u64 cgroup id, u32>`: cgroups whose connections are left alone (the agent).
    pub const EXEMPT: &str = "KIAM_EXEMPT";
    /// `LruHashMap<u64 client socket cookie, ConnRecord>`: written by connect4/6, until the
    /// connection is established.
    pub const CONNECT: &str = "KIAM_CONNECT";
    /// `LruHashMap<TupleKey, ConnRecord>`: a redirected connection between the client's side
    /// of the handshake (the SYN-ACK arrived) and the agent's.
    pub const TUPLES: &str = "KIAM_TUPLES";
    /// `LruHashMap<u64 agent socket cookie, ConnRecord>`: read (and removed) by the agent after
    /// `accept()`, with the cookie from `getsockopt(SO_COOKIE)`.
    pub const ACCEPTED: &str = "KIAM_ACCEPTED";
    /// `PerCpuArray<u64>` of counters, indexed by [`crate::stat`].
    pub const STATS: &str = "KIAM_STATS";
    /// `LruHashMap<u64 cgroup id, u64 until>`: cgroups over their pod's rate of new
    /// connections; their connections to the metadata service fail with `EPERM` in
    /// `connect()` until `until` (`bpf_ktime_get_ns`, CLOCK_MONOTONIC), so a flood costs its
    /// pod, not the agent. Written by the agent.
    pub const THROTTLE: &str = "KIAM_THROTTLE";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 7] = [CONFIG, EXEMPT, CONNECT, TUPLES, ACCEPTED, STATS, THROTTLE];
}

/// Names of the programs, as `bpftool prog list` shows them.
pub mod program_names {
    /// `cgroup/connect4`: redirects `169.254.169.254:80`.
    pub const CONNECT4: &str = "kiam_connect4";
    /// `cgroup/connect6`: redirects `[fd00:ec2::254]:80` and `[::ffff:169.254.169.254]:80`.
    pub const CONNECT6: &str = "kiam_connect6";
    /// `sockops`: binds a redirected connection's record to the agent's accepted socket.
    pub const SOCK_OPS: &str = "kiam_sock_ops";
    /// `cgroup_skb/egress`: drops anything still addressed to the metadata service.
    pub const EGRESS: &str = "kiam_egress";
    /// `cgroup/bind4`: only the agent may bind the agent's port.
    pub const BIND4: &str = "kiam_bind4";
    /// `cgroup/bind6`: the same for IPv6 sockets.
    pub const BIND6: &str = "kiam_bind6";
    /// `cgroup/post_bind4`: only the agent may be given the agent's port by `bind(0)`.
    pub const POST_BIND4: &str = "kiam_post_bind4";
    /// `cgroup/post_bind6`: the same for IPv6 sockets.
    pub const POST_BIND6: &str = "kiam_post_bind6";

    /// Every program, in attach order: the guards first, so that an install that fails half
    /// way leaves pods cut off from the metadata service rather than let through.
    pub const ALL: [&str; 8] = [
        EGRESS, BIND4, BIND6, POST_BIND4, POST_BIND6, CONNECT4, CONNECT6, SOCK_OPS,
    ];
}

/// Version of the map layouts (types, sizes, bounds). Maps are pinned under
/// `maps-v<LAYOUT_VERSION>`, so an agent with another layout gets fresh maps and swaps its
/// programs in instead of reusing incompatible ones. Bump on any change to the types below or
/// to `limits`.
pub const LAYOUT_VERSION: u32 = 4;

/// Bounds of the maps. Entries live for the few milliseconds between a pod's `connect()` and
/// the agent's `accept()`; the bounds only matter under a flood.
pub mod limits {
    pub const CONNECT_ENTRIES: u32 = 16_384;
    pub const TUPLES_ENTRIES: u32 = 16_384;
    pub const ACCEPTED_ENTRIES: u32 = 16_384;
    pub const EXEMPT_ENTRIES: u32 = 64;
    pub const THROTTLE_ENTRIES: u32 = 4_096;
}

/// Indexes into `KIAM_STATS`.
pub mod stat {
    /// IPv4 connections to the metadata address redirected to the agent.
    pub const REDIRECTED4: u32 = 0;
    /// IPv6 (and IPv4-mapped) connections redirected to the agent.
    pub const REDIRECTED6: u32 = 1;
    /// Connections to the metadata address from an exempt cgroup, left alone.
    pub const EXEMPT: u32 = 2;
    /// Connections refused because the agent has not configured the programs.
    pub const DENIED_UNCONFIGURED: u32 = 3;
    /// Connections refused because their record could not be stored.
    pub const DENIED_NO_RECORD: u32 = 4;
    /// Records bound to an agent socket at the server side of the handshake.
    pub const BOUND: u32 = 5;
    /// Packets to the metadata address dropped by the egress guard.
    pub const GUARD_DROPPED: u32 = 6;
    /// Two connections claimed one 4-tuple; the record was poisoned.
    pub const TUPLE_COLLISION: u32 = 7;
    /// A `bind()` to the agent's port (asked for, or picked by the kernel) from outside the
    /// agent, refused.
    pub const BIND_DENIED: u32 = 8;
    /// Connections to the metadata service refused in `connect()`: their cgroup is over its
    /// pod's rate (`KIAM_THROTTLE`).
    pub const THROTTLED: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;

    /// Counter names, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "redirected_ipv4",
        "redirected_ipv6",
        "exempt",
        "denied_unconfigured",
        "denied_no_record",
        "bound_to_agent_socket",
        "guard_dropped",
        "tuple_collision",
        "bind_denied",
        "denied_throttled",
    ];
}

/// `Config::flags`: the agent has written a complete configuration. Until then the programs
/// refuse connections to the metadata address instead of letting them through.
pub const CONFIG_READY: u32 = 1;
/// `Config::flags`: emit an aya-log record per redirected connection (debugging only; costs
/// ~20 µs per connection).
pub const CONFIG_LOG_CONNECTIONS: u32 = 2;

/// The agent's address, written by the agent into `KIAM_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Id of the cgroup the pinned links are attached to; lets a restarted agent notice that
    /// it was pointed at another cgroup. Not read by the programs.
    pub attach_cgroup_id: u64,
    /// IPv4 address connections to `169.254.169.254` are sent to (network order).
    pub agent_addr4: u32,
    /// IPv6 address connections to `fd00:ec2::254` are sent to; the IPv4-mapped form of
    /// `agent_addr4` when the agent has no IPv6 address.
    pub agent_addr6: [u32; 4],
    /// The agent's TCP port (host order).
    pub agent_port: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    pub _reserved: u32,
    /// Cookie of the agent's network namespace: only binds there are guarded, so pods keep
    /// the agent's port in their own namespaces. 0: every namespace is guarded (kernels
    /// before 5.14 cannot tell the agent its cookie).
    pub agent_netns_cookie: u64,
}

/// `ConnRecord::flags`: two established connections claimed the same 4-tuple (two network
/// namespaces with one address). The agent refuses a poisoned record: it cannot tell which of
/// the two it is talking to.
pub const RECORD_POISONED: u32 = 1;

/// What connect4/6 learned about a connection to the metadata address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// `bpf_get_current_cgroup_id()` of the connecting task: its container's cgroup.
    pub cgroup_id: u64,
    /// Cookie of the client socket; only that socket may remove its tuple entry.
    pub client_cookie: u64,
    /// Process id (thread group id) of the connecting task, in the root pid namespace.
    pub tgid: u32,
    /// Original destination port (host order).
    pub orig_port: u32,
    /// Original destination address (IPv4-mapped for IPv4).
    pub orig_addr: [u32; 4],
    /// `RECORD_*` bits.
    pub flags: u32,
    pub _reserved: u32,
}

/// One end-to-end TCP connection, the same seen from the client or the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub client_addr: [u32; 4],
    pub server_addr: [u32; 4],
    pub client_port: u32,
    pub server_port: u32,
}

/// The IPv4 metadata address `169.254.169.254`, as the kernel stores it (network order).
pub const IMDS_ADDR4: u32 = u32::from_ne_bytes([169, 254, 169, 254]);
/// The IPv6 metadata address `fd00:ec2::254`, as four network-order words.
pub const IMDS_ADDR6: [u32; 4] = [
    u32::from_ne_bytes([0xfd, 0x00, 0x0e, 0xc2]),
    0,
    0,
    u32::from_ne_bytes([0, 0, 0x02, 0x54]),
];
/// The metadata service's port.
pub const IMDS_PORT: u16 = 80;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4-mapped form of a network-order IPv4 address.
#[inline(always)]
pub const fn v4_mapped(addr4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, addr4]
}

#[cfg(feature = "user")]
mod user {
    use super::{Config, ConnRecord, TupleKey};

    // SAFETY: `#[repr(C)]`, only integer fields, no padding (checked by the layout tests), so
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TupleKey {}
}

/// Conversions between the kernel's address words and `std::net` types.
#[cfg(feature = "user")]
pub mod addr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// Network-order words of an IPv4 address.
    pub fn v4_word(addr: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(addr.octets())
    }

    /// Four network-order words of an address; IPv4 becomes IPv4-mapped.
    pub fn words(addr: IpAddr) -> [u32; 4] {
        let octets = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let mut out = [0u32; 4];
        for (i, word) in out.iter_mut().enumerate() {
            let mut chunk = [0u8; 4];
            chunk.copy_from_slice(&octets[i * 4..i * 4 + 4]);
            *word = u32::from_ne_bytes(chunk);
        }
        out
    }

    /// The address the words stand for; IPv4-mapped words become IPv4.
    pub fn from_words(words: [u32; 4]) -> IpAddr {
        let mut octets = [0u8; 16];
        for (i, word) in words.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(octets);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

/// The system calls behind what the programs compare against. The agent forbids `unsafe`;
/// these calls have no safe wrapper in the crates it uses, so they live here, beside the
/// kernel-facing types, each with its reasoning.
#[cfg(feature = "user")]
pub mod sys {
    use std::{
        fs::File,
        io,
        mem::size_of,
        os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    };

    /// The cookie of the network namespace `socket` lives in: what `bpf_get_netns_cookie()`
    /// returns for it (`SO_NETNS_COOKIE`, Linux 5.14).
    pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: the fd is a valid open socket for the duration of the call; `cookie` and
        // `len` are live, writable and `len` holds the size of `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }

    /// `FILEID_KERNFS`: the file handle type of kernfs (cgroup2) directories, whose payload
    /// is the node id, i.e. the cgroup id.
    const FILEID_KERNFS: i32 = 0xfe;

    /// `struct file_handle` with the 8-byte kernfs payload.
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: u64,
    }

    /// Opens the cgroup directory with id `id` (what `bpf_get_current_cgroup_id()` returns)
    /// through `mount`, an open directory of the cgroup2 mount: one `open_by_handle_at(2)`,
    /// whatever the number of cgroups. Needs `CAP_DAC_READ_SEARCH`. `ESTALE` means the cgroup
    /// is gone.
    pub fn open_cgroup(mount: &File, id: u64) -> io::Result<OwnedFd> {
        let mut handle = KernfsHandle {
            handle_bytes: size_of::<u64>() as u32,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: `handle` is a live, correctly laid out `struct file_handle` whose
        // `handle_bytes` matches the payload that follows it; `mount` is an open fd. On
        // success the kernel returns a new fd that nothing else owns.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&raw mut handle).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    #[cfg(test)]
    mod tests {
        use std::os::unix::fs::MetadataExt as _;

        use super::*;

        #[test]
        fn netns_cookies_are_stable_per_namespace() {
            let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
            let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
            match (netns_cookie(&a), netns_cookie(&b)) {
                (Ok(x), Ok(y)) => assert_eq!(x, y),
                // Kernels before 5.14.
                (Err(e), _) => assert_eq!(e.raw_os_error(), Some(libc::ENOPROTOOPT)),
                (Ok(_), Err(e)) => panic!("{e}"),
            }
        }

        #[test]
        fn a_cgroup_opens_by_its_id_or_says_why_not() {
            let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .iter()
                .map(std::path::Path::new)
                .find(|p| p.join("cgroup.controllers").exists());
            let Some(root) = root else {
                std::eprintln!("no cgroup2 mount: nothing to open");
                return;
            };
            let mount = File::open(root).expect("open cgroup2 mount");
            let id = std::fs::metadata(root).expect("stat").ino();
            let permitted = match open_cgroup(&mount, id) {
                Ok(fd) => {
                    let opened = File::from(fd).metadata().expect("fstat").ino();
                    assert_eq!(opened, id);
                    true
                }
                // Without CAP_DAC_READ_SEARCH.
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                    false
                }
            };
            // A cgroup id that does not exist: ESTALE, which the resolver takes for "gone",
            // wherever opening by id is permitted at all.
            let gone = open_cgroup(&mount, u64::MAX - 1).expect_err("no such cgroup");
            let want = if permitted { libc::ESTALE } else { libc::EPERM };
            assert_eq!(e_code(&gone), want, "{gone}");
        }

        fn e_code(e: &io::Error) -> i32 {
            e.raw_os_error().unwrap_or(0)
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use core::mem::size_of;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<Config>(), 8 + 4 + 16 + 4 + 4 + 4 + 8);
        assert_eq!(size_of::<ConnRecord>(), 8 + 8 + 4 + 4 + 16 + 4 + 4);
        assert_eq!(size_of::<TupleKey>(), 16 + 16 + 4 + 4);
    }

    #[test]
    fn metadata_addresses_round_trip() {
        assert_eq!(
            addr::from_words(v4_mapped(IMDS_ADDR4)),
            IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))
        );
        let v6: Ipv6Addr = "fd00:ec2::254".parse().expect("literal");
        assert_eq!(addr::words(IpAddr::V6(v6)), IMDS_ADDR6);
        assert_eq!(addr::from_words(IMDS_ADDR6), IpAddr::V6(v6));
        assert_eq!(addr::v4_word(Ipv4Addr::new(169, 254, 169, 254)), IMDS_ADDR4);
    }
}
