#![no_std]
// Lets `cargo check --workspace` see the crate; the programs are in main.rs.
