//! The test-only kustomize layer on top of a rendered overlay: what podman
//! 4.3 needs to play it on one machine, every change a JSON patch operation
//! with a `test` of the value it replaces. tests/podman/README.md lists
//! each change and why.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};

use super::certificates::IssuedSecret;
use super::play::Ports;
use super::{POSTGRES_IMAGE, REDIS_IMAGE, SERVER_IMAGE, WORKER_TOOLCHAIN_IMAGE};

/// Files of the kustomization directory (path relative to it, contents),
/// beside `rendered.yaml`, the overlay as `kubectl kustomize` printed it;
/// `issued` are the Secrets cert-manager would make for its Certificates.
pub(crate) fn kustomization(
    rendered: &str,
    ports: &Ports,
    suffix: &str,
    issued: &[IssuedSecret],
) -> Result<Vec<(String, String)>> {
    let objects = parse(rendered)?;
    let services = service_ports(&objects, ports)?;
    let mut files = Vec::new();
    let mut kustomization = String::from(
        "# Test-only layer for podman 4.3 on one machine (tests/podman/README.md).\n\
         resources:\n- rendered.yaml\n",
    );
    let statefulsets: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "StatefulSet")
        .collect();
    if !statefulsets.is_empty() {
        kustomization.push_str("- statefulsets-as-deployments.yaml\n");
        files.push((
            "statefulsets-as-deployments.yaml".to_string(),
            statefulsets_as_deployments(&statefulsets)?,
        ));
    }
    let issued: Vec<Value> = issued.iter().map(issued_secret).collect::<Result<_>>()?;
    let secrets: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "Secret")
        .chain(&issued)
        .collect();
    if !secrets.is_empty() {
        kustomization.push_str("- secrets-as-configmaps.yaml\n");
        files.push((
            "secrets-as-configmaps.yaml".to_string(),
            secrets_as_config_maps(&secrets)?,
        ));
    }
    // Unique names for pods, config maps and volumes: tests run side by side.
    writeln!(kustomization, "nameSuffix: -{suffix}\npatches:")?;
    for object in &objects {
        let name = name(object)?;
        let ops = match kind(object) {
            "Deployment" => workload_ops(object, ports, &services, suffix)?,
            "StatefulSet" => {
                writeln!(
                    kustomization,
                    "# podman kube play (4.3) does not play StatefulSets: the same pod as a Deployment.\n\
                     - patch: |-\n    $patch: delete\n    apiVersion: apps/v1\n    kind: StatefulSet\n    \
                     metadata:\n      name: {name}\n      namespace: {}",
                    namespace(object)
                )?;
                continue;
            }
            "ConfigMap" => config_map_ops(object, &services)?,
            "Secret" => {
                writeln!(
                    kustomization,
                    "# podman 4.3 mounts a Secret's data base64-encoded: the same values as a ConfigMap.\n\
                     - patch: |-\n    $patch: delete\n    apiVersion: v1\n    kind: Secret\n    \
                     metadata:\n      name: {name}\n      namespace: {}",
                    namespace(object)
                )?;
                continue;
            }
            _ => continue,
        };
        if ops.is_empty() {
            continue;
        }
        let file = format!("{}-{name}.yaml", kind(object).to_lowercase());
        writeln!(
            kustomization,
            "- path: {file}\n  target:\n    kind: {}\n    name: {name}",
            kind(object)
        )?;
        files.push((file, render_ops(&ops)));
    }
    // The StatefulSets' Deployments get the same ops as any Deployment.
    for statefulset in statefulsets {
        let name = name(statefulset)?;
        let deployment = statefulset_as_deployment(statefulset)?;
        let ops = workload_ops(&deployment, ports, &services, suffix)?;
        let file = format!("deployment-{name}.yaml");
        writeln!(
            kustomization,
            "- path: {file}\n  target:\n    kind: Deployment\n    name: {name}"
        )?;
        files.push((file, render_ops(&ops)));
    }
    files.push(("kustomization.yaml".to_string(), kustomization));
    Ok(files)
}

/// One JSON patch operation, with the reason shown as a comment.
struct Op {
    why: &'static str,
    op: &'static str,
    path: String,
    value: Option<Value>,
}

impl Op {
    fn new(why: &'static str, op: &'static str, path: String, value: Option<Value>) -> Op {
        Op {
            why,
            op,
            path,
            value,
        }
    }
}

fn render_ops(ops: &[Op]) -> String {
    let mut out = String::new();
    for op in ops {
        let mut entry = Mapping::new();
        entry.insert("op".into(), op.op.into());
        entry.insert("path".into(), op.path.clone().into());
        if let Some(value) = &op.value {
            entry.insert("value".into(), value.clone());
        }
        let yaml = serde_yaml::to_string(&vec![Value::Mapping(entry)]).expect("YAML of a patch");
        if op.why.is_empty() {
            let _ = writeln!(out, "{}", yaml.trim_end());
        } else {
            let _ = writeln!(out, "# {}\n{}", op.why, yaml.trim_end());
        }
    }
    out
}

/// The Secret cert-manager would write, in the overlay's namespace.
fn issued_secret(secret: &IssuedSecret) -> Result<Value> {
    let mut value: Value = serde_yaml::from_str(&format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata:\n  name: {}\n  namespace: {}\n",
        secret.name, secret.namespace
    ))?;
    let data: Mapping = secret
        .data
        .iter()
        .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
        .collect();
    value["stringData"] = Value::Mapping(data);
    Ok(value)
}

pub(super) fn parse(rendered: &str) -> Result<Vec<Value>> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|document| Value::deserialize(document).context("parsing the rendered overlay"))
        .filter(|object| !matches!(object, Ok(Value::Null)))
        .collect()
}

use serde::Deserialize as _;

fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &Value) -> Result<&str> {
    object["metadata"]["name"]
        .as_str()
        .with_context(|| format!("a {} without metadata.name", kind(object)))
}

fn namespace(object: &Value) -> &str {
    object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
}

/// `service:port` as clients in the overlay write it, to the test's port.
fn service_ports(objects: &[Value], ports: &Ports) -> Result<BTreeMap<String, u16>> {
    let mut map = BTreeMap::new();
    for service in objects.iter().filter(|o| kind(o) == "Service") {
        let service_name = name(service)?;
        for port in service["spec"]["ports"].as_sequence().into_iter().flatten() {
            let number = port["port"].as_u64().context("a Service port number")?;
            let port_name = port["name"].as_str().unwrap_or_default();
            let ours = match (service_name, port_name) {
                ("buildkube-server", "grpc") => ports.grpc,
                ("buildkube-server", "http") => ports.http,
                ("buildkube-postgres", _) => ports.postgres,
                ("buildkube-redis", _) => ports.redis,
                // e.g. a separate metrics port: nothing in the pods dials it.
                _ => continue,
            };
            map.insert(format!("{service_name}:{number}"), ours);
        }
    }
    Ok(map)
}

/// `text` with every `service:port` of the overlay pointed at the test's port.
fn repoint(text: &str, services: &BTreeMap<String, u16>) -> String {
    let mut text = text.to_string();
    for (from, port) in services {
        let host = from.split(':').next().unwrap_or_default();
        text = text.replace(from.as_str(), &format!("{host}:{port}"));
    }
    text
}

fn config_map_ops(object: &Value, services: &BTreeMap<String, u16>) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    for (key, value) in object["data"].as_mapping().into_iter().flatten() {
        let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
            continue;
        };
        let repointed = repoint(value, services);
        if repointed != value {
            let path = format!("/data/{}", key.replace('~', "~0").replace('/', "~1"));
            ops.push(Op::new(
                "the overlay's value",
                "test",
                path.clone(),
                Some(value.into()),
            ));
            ops.push(Op::new(
                "Services on this machine's loopback, at the test's ports",
                "replace",
                path,
                Some(repointed.into()),
            ));
        }
    }
    Ok(ops)
}

/// The ops for one Deployment (or a StatefulSet turned into one).
fn workload_ops(
    object: &Value,
    ports: &Ports,
    services: &BTreeMap<String, u16>,
    suffix: &str,
) -> Result<Vec<Op>> {
    let workload = name(object)?;
    let pod = &object["spec"]["template"]["spec"];
    let mut ops = vec![Op::new(
        "every packet on loopback: never podman's bridge network",
        "add",
        "/spec/template/spec/hostNetwork".into(),
        Some(true.into()),
    )];
    if object["spec"]["replicas"].as_u64().unwrap_or(1) > 1 {
        ops.push(Op::new(
            "podman 4.3 would share the emptyDir volumes between replicas: one pod",
            "replace",
            "/spec/replicas".into(),
            Some(1.into()),
        ));
    }
    let mut renamed = BTreeMap::new();
    for (index, volume) in pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let volume_name = volume["name"].as_str().context("a volume without a name")?;
        if volume.get("emptyDir").is_some() {
            let unique = format!("{workload}-{volume_name}-{suffix}");
            ops.push(Op::new(
                "podman 4.3 makes an emptyDir a named volume shared by every pod: a name of this pod's own",
                "replace",
                format!("/spec/template/spec/volumes/{index}/name"),
                Some(unique.clone().into()),
            ));
            renamed.insert(volume_name.to_string(), unique);
        }
        if let Some(secret) = volume.get("secret") {
            let path = format!("/spec/template/spec/volumes/{index}");
            let secret_name = secret["secretName"]
                .as_str()
                .with_context(|| format!("secret volume {volume_name} without secretName"))?;
            ops.push(Op::new(
                "the overlay's Secret",
                "test",
                format!("{path}/secret/secretName"),
                Some(secret_name.into()),
            ));
            ops.push(Op::new(
                "podman 4.3 mounts a Secret's data base64-encoded: the Secret's values as a ConfigMap",
                "replace",
                path,
                Some(secret_volume_as_config_map(volume_name, secret)),
            ));
        }
    }
    for (index, container) in pod["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let base = format!("/spec/template/spec/containers/{index}");
        let container_name = container["name"].as_str().context("a container name")?;
        let image = match container_name {
            "server" => SERVER_IMAGE,
            "worker" => WORKER_TOOLCHAIN_IMAGE,
            "postgres" => POSTGRES_IMAGE,
            "redis" => REDIS_IMAGE,
            other => bail!("no test image for container `{other}` of {workload}"),
        };
        ops.push(Op::new(
            "images built from this checkout (tests/podman/build-images.sh)",
            "replace",
            format!("{base}/image"),
            Some(image.into()),
        ));
        for (env_index, env) in container["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(reference) = env["valueFrom"].get("secretKeyRef") else {
                continue;
            };
            let path = format!("{base}/env/{env_index}/valueFrom");
            ops.push(Op::new(
                "the overlay's Secret",
                "test",
                format!("{path}/secretKeyRef"),
                Some(reference.clone()),
            ));
            let mut from = Mapping::new();
            from.insert("configMapKeyRef".into(), reference.clone());
            ops.push(Op::new(
                "podman 4.3 cannot read a played Secret into env: the Secret's values as a ConfigMap",
                "replace",
                path,
                Some(Value::Mapping(from)),
            ));
        }
        if container.get("envFrom").is_some() {
            bail!("{workload}/{container_name}: envFrom is not translated for podman (tests/src/podman/patch.rs)");
        }
        if container.get("ports").is_some() {
            ops.push(Op::new(
                "podman turns container ports into host port mappings, refused with hostNetwork",
                "remove",
                format!("{base}/ports"),
                None,
            ));
        }
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            if container[probe].get("httpGet").is_some() {
                ops.push(Op::new(
                    "probes name the removed ports (and podman runs probes only under systemd): the test polls instead",
                    "remove",
                    format!("{base}/{probe}"),
                    None,
                ));
            }
        }
        for (arg_index, arg) in container["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(arg) = arg.as_str() else { continue };
            let replacement = match arg.split_once('=') {
                Some(("--listen", _)) => format!("--listen=127.0.0.1:{}", ports.grpc),
                Some(("--metrics-listen", _)) => {
                    format!("--metrics-listen=127.0.0.1:{}", ports.metrics)
                }
                Some(("--http-listen", _)) if container_name == "server" => {
                    format!("--http-listen=127.0.0.1:{}", ports.http)
                }
                Some(("--http-listen", _)) => {
                    format!("--http-listen=127.0.0.1:{}", ports.worker_http)
                }
                _ => repoint(arg, services),
            };
            if replacement != arg {
                let path = format!("{base}/args/{arg_index}");
                ops.push(Op::new(
                    "the overlay's argument",
                    "test",
                    path.clone(),
                    Some(arg.into()),
                ));
                ops.push(Op::new(
                    "hostNetwork: every pod shares the host's ports, so the test chooses free ones",
                    "replace",
                    path,
                    Some(replacement.into()),
                ));
            }
        }
        match container_name {
            "redis" => {
                for arg in ["--port".to_string(), ports.redis.to_string()] {
                    ops.push(Op::new(
                        "hostNetwork: Redis on the test's port",
                        "add",
                        format!("{base}/args/-"),
                        Some(arg.into()),
                    ));
                }
            }
            "postgres" => {
                let mut env = Mapping::new();
                env.insert("name".into(), "PGPORT".into());
                env.insert("value".into(), ports.postgres.to_string().into());
                ops.push(Op::new(
                    "hostNetwork: PostgreSQL on the test's port",
                    "add",
                    format!("{base}/env/-"),
                    Some(Value::Mapping(env)),
                ));
            }
            _ => {}
        }
        for (mount_index, mount) in container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mount_path = mount["mountPath"].as_str().unwrap_or_default();
            if let Some(under_run) = mount_path.strip_prefix("/var/run/") {
                let path = format!("{base}/volumeMounts/{mount_index}/mountPath");
                ops.push(Op::new(
                    "the overlay's mount path",
                    "test",
                    path.clone(),
                    Some(mount_path.into()),
                ));
                ops.push(Op::new(
                    "podman 4.3 resolves the image's /var/run -> /run symlink on the host when it fills a new volume: the same directory without the symlink",
                    "replace",
                    path,
                    Some(format!("/run/{under_run}").into()),
                ));
            }
            if let Some(unique) = mount["name"].as_str().and_then(|n| renamed.get(n)) {
                ops.push(Op::new(
                    "the renamed emptyDir",
                    "replace",
                    format!("{base}/volumeMounts/{mount_index}/name"),
                    Some(unique.clone().into()),
                ));
            }
        }
    }
    Ok(ops)
}

/// A StatefulSet's pod as a Deployment, its claim templates as the PVCs a
/// cluster would make for pod 0 (`<template>-<statefulset>-0`).
fn statefulset_as_deployment(statefulset: &Value) -> Result<Value> {
    let name = name(statefulset)?;
    let mut deployment = statefulset.clone();
    deployment["kind"] = "Deployment".into();
    let spec = deployment["spec"]
        .as_mapping_mut()
        .context("a StatefulSet without spec")?;
    spec.remove("serviceName");
    spec.remove("volumeClaimTemplates");
    spec.remove("podManagementPolicy");
    spec.remove("updateStrategy");
    let mut volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    for template in statefulset["spec"]["volumeClaimTemplates"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let claim = template["metadata"]["name"]
            .as_str()
            .context("a claim template name")?;
        let volume: Value = serde_yaml::from_str(&format!(
            "name: {claim}\npersistentVolumeClaim:\n  claimName: {claim}-{name}-0\n"
        ))?;
        volumes.push(volume);
    }
    deployment["spec"]["template"]["spec"]["volumes"] = Value::Sequence(volumes);
    Ok(deployment)
}

fn statefulsets_as_deployments(statefulsets: &[&Value]) -> Result<String> {
    let mut out = String::from(
        "# The StatefulSets of rendered.yaml as podman 4.3 can play them: Deployments and PVCs.\n",
    );
    for statefulset in statefulsets {
        let name = name(statefulset)?;
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&statefulset_as_deployment(
            statefulset,
        )?)?);
        for template in statefulset["spec"]["volumeClaimTemplates"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            let mut claim = template.clone();
            claim["apiVersion"] = "v1".into();
            claim["kind"] = "PersistentVolumeClaim".into();
            let claim_name = format!(
                "{}-{name}-0",
                template["metadata"]["name"].as_str().unwrap_or_default()
            );
            claim["metadata"]["name"] = claim_name.into();
            claim["metadata"]["namespace"] = namespace(statefulset).into();
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&claim)?);
        }
    }
    Ok(out)
}

/// A secret volume as a ConfigMap volume of the same name (the ConfigMap
/// [`secrets_as_config_maps`] makes), with its items, mode and optional.
fn secret_volume_as_config_map(volume_name: &str, secret: &Value) -> Value {
    let mut source = Mapping::new();
    source.insert("name".into(), secret["secretName"].clone());
    for field in ["items", "defaultMode", "optional"] {
        if let Some(value) = secret.get(field) {
            source.insert(field.into(), value.clone());
        }
    }
    let mut volume = Mapping::new();
    volume.insert("name".into(), volume_name.into());
    volume.insert("configMap".into(), Value::Mapping(source));
    Value::Mapping(volume)
}

/// The Secrets of rendered.yaml as ConfigMaps of the same names and decoded
/// values. podman 4.3 writes a played Secret's `data` into secret volumes
/// still base64-encoded, ignores `stringData`, and cannot read it into env
/// (`secretKeyRef`); a ConfigMap's `data` it writes as it is.
fn secrets_as_config_maps(secrets: &[&Value]) -> Result<String> {
    let mut out = String::from(
        "# The Secrets of rendered.yaml, decoded, as ConfigMaps: podman 4.3 mounts a Secret's data base64-encoded.\n",
    );
    for secret in secrets {
        let secret_name = name(secret)?;
        let mut data = Mapping::new();
        for (key, value) in secret["data"].as_mapping().into_iter().flatten() {
            let key = key.as_str().context("a Secret key that is not a string")?;
            let value = value
                .as_str()
                .with_context(|| format!("Secret {secret_name} key {key}: not a string"))?;
            let decoded = super::play::base64_decode(value)
                .with_context(|| format!("Secret {secret_name} key {key}"))?;
            let decoded = String::from_utf8(decoded).with_context(|| {
                format!("Secret {secret_name} key {key} is not UTF-8: a ConfigMap's data cannot hold it")
            })?;
            data.insert(key.into(), decoded.into());
        }
        for (key, value) in secret["stringData"].as_mapping().into_iter().flatten() {
            data.insert(key.clone(), value.clone());
        }
        let config_map: Value = serde_yaml::from_str(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {secret_name}\n  namespace: {}\n",
            namespace(secret)
        ))?;
        let mut config_map = config_map;
        config_map["data"] = Value::Mapping(data);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&config_map)?);
    }
    Ok(out)
}
