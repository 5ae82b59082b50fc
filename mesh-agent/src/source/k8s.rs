//! Conversions from Kubernetes objects (k8s-openapi types) to the agent's
//! model, shared by both sources so a Service read from a file and one read
//! from the API server mean the same thing.
use std::{collections::BTreeMap, net::IpAddr};

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

/// A pod's addresses from `status.podIP` and `status.podIPs` (dual-stack:
/// at most one per family, the primary first, as the API server keeps them).
pub fn pod_ips(primary: &str, listed: &[String]) -> Result<Vec<IpAddr>, String> {
    let parse = |s: &str| {
        s.parse::<IpAddr>()
            .map_err(|_| format!("status.podIP(s) {s:?} is not an IPv4 or IPv6 address"))
    };
    let primary = parse(primary)?;
    let mut ips = vec![primary];
    for s in listed {
        let ip = parse(s)?;
        if ip == primary {
            continue;
        }
        if ips.iter().any(|known| known.is_ipv4() == ip.is_ipv4()) {
            return Err(format!(
                "status.podIPs lists two {} addresses; a pod has at most one per family",
                if ip.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
        ips.push(ip);
    }
    if !listed.is_empty() && !listed.iter().any(|s| parse(s).ok() == Some(primary)) {
        return Err(format!("status.podIPs does not list status.podIP {primary}"));
    }
    Ok(ips)
}

/// Services keyed `namespace/name`, with the endpoints of their slices.
pub fn services(svcs: &[&K8sService], slices: &[&EndpointSlice]) -> BTreeMap<String, Service> {
    let mut out = BTreeMap::new();
    for s in svcs {
        let Some((namespace, name)) = ns_name(&s.metadata) else {
            continue;
        };
        let spec = s.spec.clone().unwrap_or_default();
        // `clusterIPs` (dual-stack) holds `clusterIP` first; older objects
        // may only set the latter. "None" (headless) parses to nothing.
        let mut cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .unwrap_or_default()
            .iter()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        cluster_ips.sort_by_key(|ip| ip.is_ipv6());
        cluster_ips.dedup();
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
                cluster_ips,
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
        assert_eq!(web.cluster_ips, [IpAddr::from([198, 19, 0, 10])]);
        assert_eq!(web.ports[0].port, 80);
        assert_eq!(web.endpoints.len(), 2);
        assert_eq!(web.endpoints.iter().filter(|e| e.ready).count(), 1);
        assert_eq!(web.endpoints[0].ports, [(Some("http".to_string()), 8080)]);
    }

    #[test]
    fn dual_stack_services_keep_both_cluster_ips_and_slices() {
        let svc: K8sService = serde_yaml::from_str(
            "metadata: {name: web, namespace: shop}\nspec: {clusterIP: 198.19.0.10, clusterIPs: [198.19.0.10, '2001:2:ff::10'], ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}\n",
        )
        .unwrap();
        let v6: EndpointSlice = serde_yaml::from_str(
            "addressType: IPv6\nmetadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}\nports: [{port: 8080}]\nendpoints:\n- {addresses: ['2001:2:0:1::10'], nodeName: n1}\n",
        )
        .unwrap();
        let m = services(&[&svc], &[&v6]);
        let web = &m["shop/web"];
        let ip6: IpAddr = "2001:2:ff::10".parse().unwrap();
        assert_eq!(web.cluster_ips, [IpAddr::from([198, 19, 0, 10]), ip6]);
        assert_eq!(web.endpoints[0].ip, "2001:2:0:1::10".parse::<IpAddr>().unwrap());
        let headless: K8sService =
            serde_yaml::from_str("metadata: {name: h}\nspec: {clusterIP: None, clusterIPs: [None]}\n").unwrap();
        assert!(services(&[&headless], &[])["default/h"].cluster_ips.is_empty());
    }

    #[test]
    fn pod_ips_are_one_per_family_primary_first() {
        let v6: IpAddr = "2001:2:0:1::10".parse().unwrap();
        let v4 = IpAddr::from([198, 18, 1, 10]);
        assert_eq!(pod_ips("198.18.1.10", &[]), Ok(vec![v4]));
        assert_eq!(
            pod_ips("198.18.1.10", &["198.18.1.10".into(), "2001:2:0:1::10".into()]),
            Ok(vec![v4, v6])
        );
        assert_eq!(pod_ips("2001:2:0:1::10", &[]), Ok(vec![v6]));
        let two = pod_ips("198.18.1.10", &["198.18.1.10".into(), "198.18.1.11".into()]).unwrap_err();
        assert!(two.contains("at most one per family"), "{two}");
        let missing = pod_ips("198.18.1.10", &["2001:2:0:1::10".into()]).unwrap_err();
        assert!(missing.contains("does not list"), "{missing}");
        assert!(pod_ips("10.0.0.300", &[]).unwrap_err().contains("not an IPv4 or IPv6"));
    }
}
