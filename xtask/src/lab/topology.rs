//! The topology file: nodes, and pods placed on them, validated.
use super::*;

/// The topology file: nodes, and pods placed on them.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// The kubelet's cgroup driver the lab's nodes imitate.
    #[serde(default)]
    pub cgroup_driver: CgroupDriver,
}

/// The two ways a kubelet lays out pod cgroups (cgroup v2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
    #[default]
    Systemd,
    /// `kubepods/<qos>/pod<uid>/<id>`
    Cgroupfs,
}

/// A pod's QoS class, as `status.qosClass` spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Qos {
    Guaranteed,
    #[default]
    Burstable,
    BestEffort,
}

impl Qos {
    pub const ALL: [Qos; 3] = [Qos::Burstable, Qos::BestEffort, Qos::Guaranteed];

    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default = "default_ns")]
    pub service_account: String,
    pub node: String,
    /// Default: Burstable, BestEffort, Guaranteed in turn.
    #[serde(default)]
    pub qos: Option<Qos>,
    /// `false`: a pod the mesh does not know (no Pod object in the agents'
    /// source): the benchmark's no-mesh baseline, on veths no mesh program
    /// touches.
    #[serde(default = "yes")]
    pub meshed: bool,
    /// `metadata.labels` of its Pod object (AuthorizationPolicy selectors).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

pub(super) fn yes() -> bool {
    true
}

fn default_ns() -> String {
    "default".into()
}

impl Topology {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path).with_context(|| format!("reading topology {}", path.display()))?;
        let topo: Topology =
            serde_yaml::from_str(&text).with_context(|| format!("parsing topology {}", path.display()))?;
        topo.validate()?;
        Ok(topo)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.nodes.is_empty(), "topology has no nodes");
        ensure!(self.nodes.len() <= 200, "at most 200 nodes (198.18.N.0/24 per node)");
        let mut seen = std::collections::HashSet::new();
        for n in &self.nodes {
            ensure!(
                valid_name(&n.name),
                "node name {:?}: use lowercase letters, digits and '-', up to 20 chars",
                n.name
            );
            ensure!(seen.insert(n.name.clone()), "node {} listed twice", n.name);
        }
        let mut pods = std::collections::HashSet::new();
        for p in &self.pods {
            ensure!(
                valid_name(&p.name) && valid_namespace(&p.namespace),
                "pod {}/{}: use lowercase letters, digits and '-' (names up to 20 chars, namespaces up to 40)",
                p.namespace,
                p.name
            );
            ensure!(
                self.nodes.iter().any(|n| n.name == p.node),
                "pod {}/{} is on unknown node {}",
                p.namespace,
                p.name,
                p.node
            );
            ensure!(
                pods.insert((p.namespace.clone(), p.name.clone())),
                "pod {}/{} listed twice",
                p.namespace,
                p.name
            );
        }
        ensure!(self.pods.len() <= 200, "at most 200 pods");
        Ok(())
    }
}

/// Namespaces only name the pod's netns (a file name), so they may be as
/// long as the Gateway API conformance suite's `gateway-conformance-mesh`.
fn valid_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
