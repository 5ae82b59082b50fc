//! Moving captured connections' bytes. `outbound` accepts what the kernel
//! redirected to the agent and carries it to the original destination
//! (plaintext for now; the mTLS tunnel replaces that hop).
pub mod outbound;
