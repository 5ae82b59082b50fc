//! The node agent of a sidecarless, eBPF-accelerated service mesh, as a
//! library: the binary (`main.rs`) parses the command line and calls `app`;
//! the end-to-end tests reuse pieces (e.g. the tunnel client, to play a
//! rogue peer).
// Unsafe code only where a module says why (memory.rs: malloc_trim).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod authz;
pub mod cmd;
pub mod config;
pub mod drain;
pub mod enrol;
pub mod gamma;
pub mod gateway;
pub mod handoff;
pub mod identity;
pub mod kernel_events;
pub mod listeners;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pod_net;
pub mod policy;
pub mod preflight;
pub mod reconcile;
pub mod redirect;
pub mod resilience;
pub mod routes;
pub mod services;
pub mod smi;
pub mod source;
pub mod state;
pub mod tables;
pub mod traces;
pub mod traffic_policy;
pub mod tunnel;
