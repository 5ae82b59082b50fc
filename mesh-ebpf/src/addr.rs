//! One address-family seam for the sock_addr hooks. Every map keys
//! addresses as [`Addr`] (IPv4 in its IPv4-mapped form), so an AF_INET6
//! socket connecting or sending to `::ffff:a.b.c.d` (what Java and other
//! dual-stack programs use for IPv4) is the IPv4 connect it is, and native
//! IPv6 takes the same path. `V6` picks where the address lives in
//! `bpf_sock_addr`; it is a const so each program only touches the fields
//! its attach type may (the verifier refuses `user_ip4` in a *6 hook, even
//! on a branch never taken).
use aya_ebpf::bindings::bpf_sock_addr;
use mesh_common::Addr;

/// A context field, loaded straight from its own address: the verifier
/// refuses a context read through a pointer LLVM computed to serve two
/// fields, and volatile loads are never merged that way.
#[inline(always)]
pub fn field(p: &u32) -> u32 {
    unsafe { core::ptr::read_volatile(p) }
}

/// An IPv6 address field of a context, its four words loaded one by one.
#[inline(always)]
pub fn words(p: &[u32; 4]) -> [u32; 4] {
    [field(&p[0]), field(&p[1]), field(&p[2]), field(&p[3])]
}

/// The address the socket addresses.
#[inline(always)]
pub fn address<const V6: bool>(sa: &bpf_sock_addr) -> Addr {
    if V6 {
        Addr {
            words: words(&sa.user_ip6),
        }
    } else {
        Addr::from_ipv4_be(field(&sa.user_ip4))
    }
}

/// The port (host byte order).
#[inline(always)]
pub fn port(sa: &bpf_sock_addr) -> u16 {
    u16::from_be(sa.user_port as u16)
}

/// Rewrites the address and port (host byte order). An AF_INET socket can
/// only be given an IPv4 address: false (nothing written) otherwise.
#[inline(always)]
pub fn set<const V6: bool>(sa: &mut bpf_sock_addr, addr: &Addr, port: u16) -> bool {
    if V6 {
        sa.user_ip6[0] = addr.words[0];
        sa.user_ip6[1] = addr.words[1];
        sa.user_ip6[2] = addr.words[2];
        sa.user_ip6[3] = addr.words[3];
    } else {
        if !addr.is_ipv4() {
            return false;
        }
        sa.user_ip4 = addr.ipv4_be();
    }
    sa.user_port = u32::from(port.to_be());
    true
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// A socket's (local, remote) addresses from a sockops context,
/// whose fields the caller loaded up front (the verifier refuses a context
/// read through a computed pointer, which is what LLVM makes of branches
/// that load different fields into one variable). An AF_INET6 socket to an
/// IPv4-mapped peer already holds the mapped form: the same key as AF_INET.
#[inline(always)]
pub fn socket_pair(family: u32, v4: (u32, u32), v6: ([u32; 4], [u32; 4])) -> Option<(Addr, Addr)> {
    match family {
        AF_INET => Some((Addr::from_ipv4_be(v4.0), Addr::from_ipv4_be(v4.1))),
        AF_INET6 => Some((Addr { words: v6.0 }, Addr { words: v6.1 })),
        _ => None,
    }
}
