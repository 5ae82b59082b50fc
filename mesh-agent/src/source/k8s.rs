//! Conversions from Kubernetes objects (k8s-openapi types) to the agent's
//! model, shared by both sources so a Service read from a file and one read
//! from the API server mean the same thing.
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Service as K8sService, ServiceAccount},
    discovery::v1::EndpointSlice,
};

use crate::state::{Service, ServiceEndpoint, ServicePort};

/// The label EndpointSlices name their Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<(String, String)> {
    Some((
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone()?,
    ))
}

/// Services keyed `namespace/name`, with the endpoints of their slices.
pub fn services(svcs: &[&K8sService], slices: &[&EndpointSlice]) -> BTreeMap<String, Service> {
    let mut out = BTreeMap::new();
    for s in svcs {
        let Some((namespace, name)) = ns_name(&s.metadata) else {
            continue;
        };
        let spec = s.spec.clone().unwrap_or_default();
        let cluster_ip = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name,
                    port: u16::try_from(p.port).ok()?,
                    protocol: p.protocol.unwrap_or_else(|| "TCP".into()),
                })
            })
            .collect();
        out.insert(
            format!("{namespace}/{name}"),
            Service {
                namespace,
                name,
                cluster_ip,
                ports,
                endpoints: Vec::new(),
            },
        );
    }
    for slice in slices {
        let Some((namespace, _)) = ns_name(&slice.metadata) else {
            continue;
        };
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let Some(svc) = out.get_mut(&format!("{namespace}/{service}")) else {
            continue;
        };
        let ports: Vec<(Option<String>, u16)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone(), u16::try_from(p.port?).ok()?)))
            .collect();
        for ep in &slice.endpoints {
            // Absent `ready` means ready, as the EndpointSlice API says.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for addr in &ep.addresses {
                if let Ok(ip) = addr.parse() {
                    svc.endpoints.push(ServiceEndpoint {
                        ip,
                        ready,
                        node: ep.node_name.clone(),
                        ports: ports.clone(),
                    });
                }
            }
        }
        svc.endpoints.sort();
    }
    out
}

pub fn service_account(sa: &ServiceAccount) -> Option<String> {
    ns_name(&sa.metadata).map(|(ns, name)| format!("{ns}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_gather_their_ready_and_unready_endpoints() {
        let svc: K8sService = serde_yaml::from_str(
            "metadata: {name: web, namespace: shop}\nspec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
        )
        .unwrap();
        let slice: EndpointSlice = serde_yaml::from_str(
            "addressType: IPv4\nmetadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}\nports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [198.18.1.10], nodeName: n1, conditions: {ready: true}}\n- {addresses: [198.18.2.10], nodeName: n2, conditions: {ready: false}}\n",
        )
        .unwrap();
        let other: EndpointSlice = serde_yaml::from_str(
            "addressType: IPv4\nmetadata: {name: db-x, namespace: shop, labels: {kubernetes.io/service-name: db}}\nendpoints: []\n",
        )
        .unwrap();
        let m = services(&[&svc], &[&slice, &other]);
        let web = &m["shop/web"];
        assert_eq!(web.cluster_ip, Some(Ipv4Addr::new(198, 19, 0, 10)));
        assert_eq!(web.ports[0].port, 80);
        assert_eq!(web.endpoints.len(), 2);
        assert_eq!(web.endpoints.iter().filter(|e| e.ready).count(), 1);
        assert_eq!(web.endpoints[0].ports, [(Some("http".to_string()), 8080)]);
    }
}
