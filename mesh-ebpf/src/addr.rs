//! One address-family seam for the sock_addr hooks. An AF_INET6 socket
//! connecting or sending to an IPv4-mapped address (`::ffff:a.b.c.d`, what
//! Java and other dual-stack programs use for IPv4) is the IPv4 connect it
//! is: the same capture, policy, splice or tunnel, and audit. `MAPPED`
//! picks where the IPv4 address lives in `bpf_sock_addr`; it is a const so
//! each program only touches the fields its attach type may (the verifier
//! refuses `user_ip4` in a *6 hook, even on a branch never taken).
use aya_ebpf::bindings::bpf_sock_addr;

/// `::ffff:0:0/96` as `user_ip6[2]` holds it (network byte order).
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A context field, loaded straight from its own address: the verifier
/// refuses a context read through a pointer LLVM computed to serve two
/// fields, and volatile loads are never merged that way.
#[inline(always)]
fn field(p: &u32) -> u32 {
    unsafe { core::ptr::read_volatile(p) }
}

/// Whether an AF_INET6 hook's address is IPv4-mapped.
#[inline(always)]
pub fn is_v4_mapped(sa: &bpf_sock_addr) -> bool {
    field(&sa.user_ip6[0]) == 0 && field(&sa.user_ip6[1]) == 0 && field(&sa.user_ip6[2]) == V4_MAPPED_PREFIX
}

/// The IPv4 address (network byte order) the socket addresses.
#[inline(always)]
pub fn ipv4<const MAPPED: bool>(sa: &bpf_sock_addr) -> u32 {
    if MAPPED {
        field(&sa.user_ip6[3])
    } else {
        field(&sa.user_ip4)
    }
}

/// The port (host byte order).
#[inline(always)]
pub fn port(sa: &bpf_sock_addr) -> u16 {
    u16::from_be(sa.user_port as u16)
}

/// Rewrites the address (network byte order) and port (host byte order);
/// a mapped address stays mapped.
#[inline(always)]
pub fn set<const MAPPED: bool>(sa: &mut bpf_sock_addr, ipv4: u32, port: u16) {
    if MAPPED {
        sa.user_ip6[3] = ipv4;
    } else {
        sa.user_ip4 = ipv4;
    }
    sa.user_port = u32::from(port.to_be());
}
