//! SMI access policy: compiles TrafficTargets and their routes into one
//! immutable [`Policy`], evaluated by the destination agent (authoritative),
//! turned into kernel allow rules for `connect()`, and explained by
//! `mesh-agent policy check` (`cmd::policy`) — one code path for all three.
//!
//! Semantics (the SMI spec): TrafficTargets are additive allow rules; in
//! enforcing mode every meshed flow no target allows is denied. A target
//! allows its sources to reach pods with its destination ServiceAccount on
//! the ports of its TCPRoute/UDPRoute rules (all ports when a route lists
//! none, or when the target has only HTTPRouteGroup rules).
//!
//! Split by stage: `model` (what a compiled policy is), `compile` (SMI to
//! model), `evaluate` (decisions), `lower` (rows for `mesh_policy`) and
//! `authorizer` (the destination side's runtime check, audited).
mod authorization;
mod authorizer;
mod compile;
mod evaluate;
mod lower;
mod model;

pub use authorizer::{DecisionLabels, KindLabels, PolicyAuthorizer, PolicyMetrics};
pub use compile::{MatchError, http_matches};
pub use model::{Decision, HttpMatch, InForce, Policy, PortRule, Rejected, Target};

#[cfg(test)]
mod tests;
