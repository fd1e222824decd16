//! NetworkPolicies of the server and the workers.
//!
//! The server takes gRPC and HTTP from anywhere, and its metrics port only
//! from the monitoring namespaces. Workers take nothing and dial only the
//! server, the cluster DNS and the spec's `worker_egress` allow list: the
//! actions they run share their network, so without an egress policy any
//! action could reach the cloud metadata endpoint or internal services.
//! (Kubelet probes are not subject to NetworkPolicy.)

use std::net::{IpAddr, Ipv4Addr};

use buildkube_config::DEFAULT_GRPC_PORT;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::objects::{
    meta, server_selector, workers_selector, GRPC_PORT_NAME, HTTP_PORT_NAME, METRICS_PORT_NAME,
    SERVER_NAME, WORKER_NAME,
};
use crate::spec::{parse_cidr, EgressAllowSpec, StackSpec};

/// The cloud metadata endpoint (AWS, GCP, Azure, OpenStack): credentials of
/// the node live behind it, so no allow-list entry opens it.
pub const CLOUD_METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Namespace of the cluster DNS (CoreDNS / kube-dns).
const DNS_NAMESPACE: &str = "kube-system";
/// Label every namespace carries with its own name (Kubernetes 1.22+).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn port(port: IntOrString, protocol: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(port),
        protocol: Some(protocol.into()),
        ..Default::default()
    }
}

fn named(name: &str) -> NetworkPolicyPort {
    port(IntOrString::String(name.into()), "TCP")
}

fn labels(selector: impl IntoIterator<Item = (String, String)>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector.into_iter().collect()),
        ..Default::default()
    }
}

/// The server accepts its gRPC and HTTP ports from anywhere (workers,
/// clients, ingress controllers) and its metrics port only from namespaces
/// labelled as `monitoring.namespace_labels` says.
pub fn server_network_policy(spec: &StackSpec) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(SERVER_NAME, server_selector()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(labels(server_selector())),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![named(GRPC_PORT_NAME), named(HTTP_PORT_NAME)]),
                    ..Default::default()
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(labels(spec.monitoring.namespace_labels.clone())),
                        ..Default::default()
                    }]),
                    ports: Some(vec![named(METRICS_PORT_NAME)]),
                },
            ]),
            ..Default::default()
        }),
    }
}

/// Whether the CIDR `(address, prefix)` contains `ip`.
fn contains(address: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (address, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// One allow-list entry as an egress rule; the metadata address is cut out
/// of a block that contains it.
fn allow_rule(allow: &EgressAllowSpec) -> NetworkPolicyEgressRule {
    let (address, prefix) = parse_cidr(&allow.cidr).expect("validated: worker_egress[].cidr");
    let except = contains(address, prefix, IpAddr::V4(CLOUD_METADATA_ADDRESS))
        .then(|| vec![format!("{CLOUD_METADATA_ADDRESS}/32")]);
    let ports = (!allow.ports.is_empty()).then(|| {
        allow
            .ports
            .iter()
            .map(|p| port(IntOrString::Int((*p).into()), "TCP"))
            .collect()
    });
    NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: allow.cidr.clone(),
                except,
            }),
            ..Default::default()
        }]),
        ports,
    }
}

/// Nothing reaches the workers (they only dial out); they reach only the
/// server's gRPC port, the cluster DNS, and `worker_egress`.
pub fn worker_network_policy(spec: &StackSpec) -> NetworkPolicy {
    let mut egress = vec![
        NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(labels(server_selector())),
                ..Default::default()
            }]),
            // The number: a named port would resolve on the destination pod.
            ports: Some(vec![port(
                IntOrString::Int(DEFAULT_GRPC_PORT.into()),
                "TCP",
            )]),
        },
        NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(labels([(
                    NAMESPACE_NAME_LABEL.to_string(),
                    DNS_NAMESPACE.to_string(),
                )])),
                ..Default::default()
            }]),
            ports: Some(vec![
                port(IntOrString::Int(53), "UDP"),
                port(IntOrString::Int(53), "TCP"),
            ]),
        },
    ];
    egress.extend(spec.worker_egress.iter().map(allow_rule));
    NetworkPolicy {
        metadata: meta(WORKER_NAME, workers_selector()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(labels(workers_selector())),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![]),
            egress: Some(egress),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_cut_out_the_metadata_endpoint_only_when_they_contain_it() {
        let rule = |cidr: &str| {
            allow_rule(&EgressAllowSpec {
                cidr: cidr.into(),
                ports: vec![443],
            })
        };
        let except =
            |rule: NetworkPolicyEgressRule| rule.to.unwrap()[0].ip_block.clone().unwrap().except;
        assert_eq!(
            except(rule("0.0.0.0/0")),
            Some(vec!["169.254.169.254/32".to_string()])
        );
        assert_eq!(
            except(rule("169.254.0.0/16")),
            Some(vec!["169.254.169.254/32".to_string()])
        );
        assert_eq!(except(rule("10.0.0.0/8")), None);
        assert_eq!(except(rule("fd00::/8")), None);
        assert_eq!(
            rule("10.0.0.0/8").ports.unwrap()[0].port,
            Some(IntOrString::Int(443))
        );
    }
}
