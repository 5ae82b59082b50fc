//! Workload identity: SPIFFE IDs, the mesh CA (server side), certificate
//! providers, the agent's in-memory identity manager, and the rustls
//! verifiers that check peers against an exact SPIFFE ID.
pub mod authority;
pub mod manager;
pub mod node_auth;
pub mod provider;
pub mod server;
pub mod spiffe;
pub mod verify;

/// The CA's gRPC API, generated from proto/ca.proto.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("mesh.ca.v1");
}

pub use spiffe::SpiffeId;
