//! The mesh's kernel programs. One module per attach point; the maps they
//! share live in `maps`. Every map is pinned by name so the agent can restart
//! (or be upgraded) without dropping the state the kernel is using.
#![no_std]
#![no_main]
// The BPF build runs nested in the agent's build.rs, where warnings scroll by
// unseen: make the ones that mean "this code is not what you think" errors.
#![deny(unused)]

mod addr;
mod connect4;
mod events;
mod fast_path;
mod inbound;
mod maps;
mod probe;
mod sockops;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: sockmap and cgroup helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
