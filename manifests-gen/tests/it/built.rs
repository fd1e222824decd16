//! Builds every overlay with `kubectl kustomize`, validates the output in
//! strict mode against the schemas of every supported Kubernetes minor
//! (kubernetes-validate), and checks the cross-object invariants over the
//! built objects. Nothing is skipped silently: a missing tool fails the test
//! with the command that installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use buildkube_config::{ServerArgs, WorkerArgs};
use clap::Parser;
use manifests_gen::crd::{
    Certificate, Issuer, ScaledObject, ServiceMonitor, CERT_MANAGER_API_VERSION,
};
use manifests_gen::spec::{
    quantity_to_bytes, AutoscalingKind, EgressAllowSpec, ExposeSpec, StackSpec, TlsKind,
};
use manifests_gen::{generate, owned_roots, KUBERNETES_VERSION, SUPPORTED_KUBERNETES_VERSIONS};
use serde_json::Value;

/// Custom resource kinds kubernetes-validate has no schema for. Each is
/// reported as `no-schema` by the validator (never silently passed), has its
/// metadata validated against ObjectMeta, and is read back into its typed
/// definition with `deny_unknown_fields`. Any other kind without a schema fails.
const KINDS_WITHOUT_SCHEMA: &[(&str, &str)] = &[
    (ScaledObject::API_VERSION, ScaledObject::KIND),
    (ServiceMonitor::API_VERSION, ServiceMonitor::KIND),
    (CERT_MANAGER_API_VERSION, Issuer::KIND),
    (CERT_MANAGER_API_VERSION, Certificate::KIND),
];

const INSTALL_KUBECTL: &str = "install kubectl (e.g. `apt-get install -y kubectl` from the Kubernetes apt repository, or a release binary on PATH); CI installs it in .ci/run";
const INSTALL_VALIDATE: &str = "pip install kubernetes-validate==1.37.0";

/// The objects `kubectl kustomize` built for one overlay.
pub(crate) struct Built {
    pub(crate) overlay: String,
    dir: PathBuf,
    pub(crate) docs: Vec<Value>,
}

fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}): {INSTALL_KUBECTL}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn build(root: &Path, overlay: &str) -> Built {
    let dir = root.join(overlay);
    let text = kustomize(&dir);
    let file = root.join(format!("{overlay}.built.yaml"));
    std::fs::write(&file, &text).unwrap();
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(doc).unwrap()).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect();
    Built {
        overlay: overlay.to_string(),
        dir,
        docs,
    }
}

use serde::Deserialize as _;

/// Runs the strict schema validation against every supported minor;
/// returns problems, each naming the minor.
fn validate(root: &Path, built: &Built) -> Vec<String> {
    assert_eq!(
        SUPPORTED_KUBERNETES_VERSIONS.first(),
        Some(&KUBERNETES_VERSION),
        "the typed version is the oldest supported minor"
    );
    SUPPORTED_KUBERNETES_VERSIONS
        .iter()
        .flat_map(|version| {
            validate_against(root, built, version)
                .into_iter()
                .map(move |problem| format!("Kubernetes {version}: {problem}"))
        })
        .collect()
}

/// Runs the strict schema validation of one Kubernetes minor.
fn validate_against(root: &Path, built: &Built, version: &str) -> Vec<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/validate_k8s.py");
    let file = root.join(format!("{}.built.yaml", built.overlay));
    let out = Command::new("python3")
        .arg(&script)
        .arg(version)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); install python3 and `{INSTALL_VALIDATE}`")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(3),
        "{stderr}\ninstall with: {INSTALL_VALIDATE}"
    );
    assert!(out.status.success(), "validate_k8s.py failed:\n{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let summary = lines.last().expect("summary line");
    assert_eq!(
        summary["documents"].as_u64(),
        Some(built.docs.len() as u64),
        "every object validated"
    );
    let mut problems = Vec::new();
    for line in &lines[..lines.len() - 1] {
        let what = format!(
            "{}/{} {}",
            line["apiVersion"].as_str().unwrap_or("?"),
            line["kind"].as_str().unwrap_or("?"),
            line["name"].as_str().unwrap_or("?")
        );
        let allowed_without_schema = KINDS_WITHOUT_SCHEMA
            .iter()
            .any(|(api, kind)| line["apiVersion"] == *api && line["kind"] == *kind);
        match (line["result"].as_str().unwrap(), allowed_without_schema) {
            ("valid", false) => {}
            ("no-schema", true) => {}
            ("valid", true) => problems.push(format!(
                "{what}: unexpectedly has a schema; drop it from KINDS_WITHOUT_SCHEMA"
            )),
            ("no-schema", false) => problems.push(format!(
                "{what}: no schema for Kubernetes {version}: {}",
                line["error"]
            )),
            (_, _) => problems.push(format!("{what}: {}", line["error"])),
        }
    }
    // The kinds without a schema are still checked: against their typed definitions.
    for doc in &built.docs {
        let result = match doc["kind"].as_str() {
            Some(ScaledObject::KIND) => {
                serde_json::from_value::<ScaledObject>(doc.clone()).map(|_| ())
            }
            Some(ServiceMonitor::KIND) => {
                serde_json::from_value::<ServiceMonitor>(doc.clone()).map(|_| ())
            }
            Some(Issuer::KIND) => serde_json::from_value::<Issuer>(doc.clone()).map(|_| ()),
            Some(Certificate::KIND) => {
                serde_json::from_value::<Certificate>(doc.clone()).map(|_| ())
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            problems.push(format!(
                "{} {}: does not match its typed definition: {e}",
                doc["kind"], doc["metadata"]["name"]
            ));
        }
    }
    problems
}

pub(crate) fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

pub(crate) fn name_of(doc: &Value) -> &str {
    str_of(&doc["metadata"]["name"])
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), str_of(v).to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A pod template of a Deployment or StatefulSet.
struct Workload<'a> {
    kind: &'a str,
    name: &'a str,
    labels: BTreeMap<String, String>,
    pod: &'a Value,
    claim_templates: Vec<&'a str>,
}

impl Built {
    pub(crate) fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    pub(crate) fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && name_of(d) == name)
    }

    fn workloads(&self) -> Vec<Workload<'_>> {
        self.docs
            .iter()
            .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
            .map(|d| Workload {
                kind: str_of(&d["kind"]),
                name: name_of(d),
                labels: labels(&d["spec"]["template"]["metadata"]["labels"]),
                pod: &d["spec"]["template"]["spec"],
                claim_templates: d["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .map(|a| a.iter().map(name_of).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    pub(crate) fn containers<'a>(&'a self, image: &'a str) -> Vec<(&'a Value, &'a Value, &'a str)> {
        // (pod spec, container, workload name) of containers whose image names `image`.
        let mut found = Vec::new();
        for w in self.workloads() {
            for c in w.pod["containers"].as_array().unwrap() {
                let reference = str_of(&c["image"]);
                let name = reference
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap();
                if name == image {
                    found.push((w.pod, c, w.name));
                }
            }
        }
        found
    }
}

fn container_port(pod: &Value, target: &Value) -> Option<i64> {
    pod["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find_map(|p| {
            let hit = match target {
                Value::String(name) => p["name"] == name.as_str(),
                Value::Number(n) => p["containerPort"].as_i64() == n.as_i64(),
                _ => false,
            };
            hit.then(|| p["containerPort"].as_i64().unwrap())
        })
}

pub(crate) fn args_of(container: &Value, program: &str) -> Vec<String> {
    let mut args = vec![program.to_string()];
    args.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| str_of(a).to_string()),
    );
    args
}

/// The Secret or ConfigMap key that provides file `path` in this container, if any.
pub(crate) fn file_source(
    built: &Built,
    pod: &Value,
    container: &Value,
    path: &Path,
) -> Result<(String, String), String> {
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let Ok(rest) = path.strip_prefix(str_of(&m["mountPath"])) else {
            continue;
        };
        let key = rest.to_string_lossy().to_string();
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == m["name"]);
        let Some(volume) = volume else {
            return Err(format!("mount {} has no volume", m["name"]));
        };
        let (kind, name) = if volume["secret"].is_object() {
            ("Secret", str_of(&volume["secret"]["secretName"]))
        } else if volume["configMap"].is_object() {
            ("ConfigMap", str_of(&volume["configMap"]["name"]))
        } else {
            return Err(format!(
                "{} is on volume {} which is not a Secret or ConfigMap",
                path.display(),
                m["name"]
            ));
        };
        // A Secret that a cert-manager Certificate of the stack fills.
        if kind == "Secret"
            && built.of_kind(Certificate::KIND).any(|c| {
                c["spec"]["secretName"] == name
                    && ["tls.crt", "tls.key", "ca.crt"].contains(&key.as_str())
            })
        {
            return Ok((kind.to_string(), name.to_string()));
        }
        let Some(object) = built.find(kind, name) else {
            return Err(format!("{kind} {name} does not exist"));
        };
        if object["data"].get(&key).is_none() {
            return Err(format!(
                "{kind} {name} has no key {key} for {}",
                path.display()
            ));
        }
        return Ok((kind.to_string(), name.to_string()));
    }
    Err(format!("{} is not on any mounted volume", path.display()))
}

/// With external stores, the server reads a storage config from a ConfigMap
/// that parses, names the PostgreSQL and Redis Services, and takes the
/// PostgreSQL password from its Secret; without them, the embedded default.
/// Where the server's worker and client tokens come from.
struct AuthSources {
    worker_sources: BTreeSet<(String, String)>,
    client_sources: BTreeSet<(String, String)>,
}

/// The server's `--auth-config` comes from a ConfigMap and parses; every
/// token file it names is mounted from a Secret; no Secret holds both a
/// worker's and a client's token.
fn auth_invariants(
    built: &Built,
    server: &ServerArgs,
    pod: &Value,
    container: &Value,
    bad: &mut Vec<String>,
) -> Option<AuthSources> {
    use buildkube_config::auth::AuthConfig;
    let path = server.auth_config.as_ref()?;
    let (kind, name) = match file_source(built, pod, container, path) {
        Ok(source) => source,
        Err(e) => {
            bad.push(format!("server --auth-config: {e}"));
            return None;
        }
    };
    let key = path.file_name().unwrap().to_string_lossy();
    let text = built.find(&kind, &name).unwrap()["data"][key.as_ref()]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let config = match AuthConfig::from_yaml(&text) {
        Ok(config) => config,
        Err(e) => {
            bad.push(format!("{kind} {name} {key} does not parse: {e}"));
            return None;
        }
    };
    let mut sources = AuthSources {
        worker_sources: BTreeSet::new(),
        client_sources: BTreeSet::new(),
    };
    let files = config
        .workers
        .iter()
        .map(|w| (true, &w.token_file))
        .chain(config.clients.iter().map(|c| (false, &c.token_file)));
    for (worker, file) in files {
        match file_source(built, pod, container, file) {
            Ok(source) if source.0 == "Secret" => {
                if worker {
                    sources.worker_sources.insert(source);
                } else {
                    sources.client_sources.insert(source);
                }
            }
            Ok(source) => bad.push(format!(
                "token {} comes from {source:?}, not a Secret",
                file.display()
            )),
            Err(e) => bad.push(format!("server token {}: {e}", file.display())),
        }
    }
    if let Some(shared) = sources
        .worker_sources
        .intersection(&sources.client_sources)
        .next()
    {
        bad.push(format!("{shared:?} holds both worker and client tokens"));
    }
    Some(sources)
}

fn storage_invariants(
    built: &Built,
    external_stores: bool,
    server: &ServerArgs,
    pod: &Value,
    container: &Value,
) -> Vec<String> {
    use buildkube_config::storage::{StorageConfig, StoreConfig};
    use manifests_gen::objects::{POSTGRES_NAME, POSTGRES_SECRET, REDIS_NAME};
    let Some(path) = &server.storage_config else {
        return if external_stores {
            vec!["external stores, but the server has no --storage-config".into()]
        } else {
            vec![]
        };
    };
    if !external_stores {
        return vec![format!(
            "--storage-config {} without external stores",
            path.display()
        )];
    }
    let (kind, name) = match file_source(built, pod, container, path) {
        Ok(source) => source,
        Err(e) => return vec![format!("server --storage-config: {e}")],
    };
    if kind != "ConfigMap" {
        return vec![format!(
            "--storage-config comes from {kind} {name}, not a ConfigMap"
        )];
    }
    let key = path.file_name().unwrap().to_string_lossy();
    let text = built.find(&kind, &name).unwrap()["data"][key.as_ref()]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let config = match StorageConfig::from_yaml(&text) {
        Ok(config) => config,
        Err(e) => return vec![format!("ConfigMap {name} {key} does not parse: {e}")],
    };
    let mut bad = Vec::new();
    let (mut postgres, mut redis) = (0, 0);
    let mut stack = vec![&config.cas, &config.action_cache];
    while let Some(store) = stack.pop() {
        match store {
            StoreConfig::Filesystem(_) => {}
            StoreConfig::Postgres(pg) => {
                postgres += 1;
                if !pg.url.contains(&format!("@{POSTGRES_NAME}:")) || pg.url.contains(":@") {
                    bad.push(format!(
                        "postgres url {} is not the {POSTGRES_NAME} Service, or carries a password",
                        pg.url
                    ));
                }
                // The same (hash-suffixed) Secret PostgreSQL takes its password from.
                let db_secret = built.find("StatefulSet", POSTGRES_NAME).and_then(|db| {
                    db["spec"]["template"]["spec"]["containers"][0]["env"]
                        .as_array()?
                        .iter()
                        .find(|e| e["name"] == "POSTGRES_PASSWORD")
                        .map(|e| str_of(&e["valueFrom"]["secretKeyRef"]["name"]).to_string())
                });
                match pg.password_file.as_ref().map(|p| file_source(built, pod, container, p)) {
                    Some(Ok((kind, name)))
                        if kind == "Secret" && Some(&name) == db_secret.as_ref() => {}
                    other => bad.push(format!(
                        "postgres password_file: {other:?}, want PostgreSQL's Secret {db_secret:?} ({POSTGRES_SECRET})"
                    )),
                }
            }
            StoreConfig::Redis(r) => {
                redis += 1;
                if !r.url.contains(&format!("//{REDIS_NAME}:")) {
                    bad.push(format!(
                        "redis url {} is not the {REDIS_NAME} Service",
                        r.url
                    ));
                }
            }
            StoreConfig::ReadCache(rc) => stack.extend([&rc.cache, &rc.backing]),
            StoreConfig::SizePartitioned(sp) => stack.extend([&sp.small, &sp.large]),
        }
    }
    if postgres == 0 || redis == 0 {
        bad.push(format!(
            "storage config uses postgres {postgres}x, redis {redis}x: both stores should be used"
        ));
    }
    bad
}

/// Every invariant over one built overlay; returns the violations.
pub(crate) fn invariants(built: &Built, spec: &StackSpec) -> Vec<String> {
    let mut bad = Vec::new();
    let overlay = spec.overlays.get(&built.overlay);
    let workloads = built.workloads();

    // Services select pods, and target declared container ports.
    for service in built.of_kind("Service") {
        let selector = labels(&service["spec"]["selector"]);
        let selected: Vec<_> = workloads
            .iter()
            .filter(|w| matches(&selector, &w.labels))
            .collect();
        if selected.is_empty() {
            bad.push(format!(
                "Service {} selects no pod template",
                name_of(service)
            ));
        }
        for port in service["spec"]["ports"].as_array().unwrap() {
            for w in &selected {
                if container_port(w.pod, &port["targetPort"]).is_none() {
                    bad.push(format!(
                        "Service {} targetPort {} is not a container port of {} {}",
                        name_of(service),
                        port["targetPort"],
                        w.kind,
                        w.name
                    ));
                }
            }
        }
    }

    // Referenced ConfigMaps, Secrets, PVCs and ServiceAccounts exist.
    for w in &workloads {
        let mut refs: Vec<(&str, &str)> = Vec::new();
        if let Some(sa) = w.pod["serviceAccountName"].as_str() {
            refs.push(("ServiceAccount", sa));
        }
        for v in w.pod["volumes"].as_array().into_iter().flatten() {
            if let Some(n) = v["configMap"]["name"].as_str() {
                refs.push(("ConfigMap", n));
            }
            if let Some(n) = v["secret"]["secretName"].as_str() {
                refs.push(("Secret", n));
            }
            if let Some(n) = v["persistentVolumeClaim"]["claimName"].as_str() {
                refs.push(("PersistentVolumeClaim", n));
            }
        }
        let mut mounted: BTreeSet<&str> = w.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| str_of(&v["name"]))
            .collect();
        mounted.extend(w.claim_templates.iter().copied());
        for c in w.pod["containers"].as_array().unwrap() {
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    refs.push(("Secret", n));
                }
                if let Some(n) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    refs.push(("ConfigMap", n));
                }
            }
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                if !mounted.contains(str_of(&m["name"])) {
                    bad.push(format!(
                        "{} {}: mount {} has no volume",
                        w.kind, w.name, m["name"]
                    ));
                }
            }
            // Probes use declared ports.
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let port = &c[probe]["httpGet"]["port"];
                if !port.is_null() && container_port(w.pod, port).is_none() {
                    bad.push(format!(
                        "{} {}: {probe} port {port} is not declared",
                        w.kind, w.name
                    ));
                }
            }
            // Issue 7: every container requests and limits ephemeral
            // storage, at least the size limits of the pod's emptyDirs.
            let empty_dirs: u64 = w.pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["emptyDir"].is_object())
                .map(|v| {
                    let limit = quantity_to_bytes(str_of(&v["emptyDir"]["sizeLimit"]));
                    if limit.is_none() {
                        bad.push(format!(
                            "{} {}: emptyDir {} has no sizeLimit",
                            w.kind, w.name, v["name"]
                        ));
                    }
                    limit.unwrap_or(0)
                })
                .sum();
            for side in ["requests", "limits"] {
                match quantity_to_bytes(str_of(&c["resources"][side]["ephemeral-storage"])) {
                    Some(bytes) if bytes >= empty_dirs => {}
                    other => bad.push(format!(
                        "{} {}: container {} {side} ephemeral-storage {other:?}, \
                         below its emptyDirs' {empty_dirs} bytes",
                        w.kind, w.name, c["name"]
                    )),
                }
            }
            // Non-root, no privilege escalation.
            if c["securityContext"]["allowPrivilegeEscalation"] != false {
                bad.push(format!(
                    "{} {}: container {} may escalate privileges",
                    w.kind, w.name, c["name"]
                ));
            }
        }
        if w.pod["securityContext"]["runAsNonRoot"] != true
            || w.pod["securityContext"]["fsGroup"].is_null()
        {
            bad.push(format!(
                "{} {}: pod must run as non-root with an fsGroup",
                w.kind, w.name
            ));
        }
        for (kind, name) in refs {
            let issued = kind == "Secret"
                && built
                    .of_kind(Certificate::KIND)
                    .any(|c| c["spec"]["secretName"] == name);
            if built.find(kind, name).is_none() && !issued {
                bad.push(format!(
                    "{} {} references {kind} {name}, which does not exist",
                    w.kind, w.name
                ));
            }
        }
    }

    bad.extend(autoscaler_invariants(built));

    // Autoscalers, disruption budgets and network policies target what exists.
    for hpa in built
        .of_kind("HorizontalPodAutoscaler")
        .chain(built.of_kind(ScaledObject::KIND))
    {
        let target = &hpa["spec"]["scaleTargetRef"];
        if !workloads
            .iter()
            .any(|w| w.kind == target["kind"] && w.name == target["name"])
        {
            bad.push(format!(
                "{} {} targets missing {} {}",
                hpa["kind"],
                name_of(hpa),
                target["kind"],
                target["name"]
            ));
        }
    }
    for (kind, path) in [
        ("PodDisruptionBudget", "/spec/selector/matchLabels"),
        ("NetworkPolicy", "/spec/podSelector/matchLabels"),
    ] {
        for doc in built.of_kind(kind) {
            let selector = labels(doc.pointer(path).unwrap_or(&Value::Null));
            if !workloads.iter().any(|w| matches(&selector, &w.labels)) {
                bad.push(format!("{kind} {} selects no pods", name_of(doc)));
            }
        }
    }
    for monitor in built.of_kind(ServiceMonitor::KIND) {
        let selector = labels(&monitor["spec"]["selector"]["matchLabels"]);
        for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
            let ok = built.of_kind("Service").any(|s| {
                matches(&selector, &labels(&s["metadata"]["labels"]))
                    && s["spec"]["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["name"] == endpoint["port"])
            });
            if !ok {
                bad.push(format!(
                    "ServiceMonitor {} port {} is on no selected Service",
                    name_of(monitor),
                    endpoint["port"]
                ));
            }
        }
    }
    for ingress in built.of_kind("Ingress") {
        for tls in ingress["spec"]["tls"].as_array().into_iter().flatten() {
            let secret = str_of(&tls["secretName"]);
            // cert-manager issues it for this Ingress, or for another one
            // with the same hosts in the same Secret (the webhook Ingress
            // shares the gRPC Ingress's certificate).
            let issued = built.of_kind("Ingress").any(|other| {
                !other["metadata"]["annotations"]
                    [manifests_gen::objects::CERT_MANAGER_ISSUER_ANNOTATION]
                    .is_null()
                    && other["spec"]["tls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|t| t["secretName"] == tls["secretName"] && t["hosts"] == tls["hosts"])
            });
            if built.find("Secret", secret).is_none() && !issued {
                bad.push(format!(
                    "Ingress {} TLS Secret {secret} neither exists nor is issued by cert-manager",
                    name_of(ingress)
                ));
            }
        }
        for rule in ingress["spec"]["rules"].as_array().unwrap() {
            for path in rule["http"]["paths"].as_array().unwrap() {
                let backend = &path["backend"]["service"];
                let ok = built
                    .find("Service", str_of(&backend["name"]))
                    .is_some_and(|s| {
                        s["spec"]["ports"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|p| p["name"] == backend["port"]["name"])
                    });
                if !ok {
                    bad.push(format!(
                        "Ingress {} backend {} does not exist",
                        name_of(ingress),
                        backend
                    ));
                }
            }
        }
    }

    // The flags parse (the binaries' own parsers) and agree with each other.
    let servers = built.containers(manifests_gen::objects::SERVER_IMAGE);
    assert_eq!(servers.len(), 1, "{}: one server container", built.overlay);
    let (server_pod, server_container, _) = servers[0];
    let server = match ServerArgs::try_parse_from(args_of(server_container, "buildkube-server")) {
        Ok(args) => args,
        Err(e) => {
            bad.push(format!("server args do not parse: {e}"));
            return bad;
        }
    };
    if container_port(server_pod, &"grpc".into()) != Some(server.listen.port().into()) {
        bad.push("server --listen port is not the container's grpc port".into());
    }
    if container_port(server_pod, &"http".into()) != Some(server.http_listen.port().into()) {
        bad.push("server --http-listen port is not the container's http port".into());
    }
    if container_port(server_pod, &"metrics".into()) != Some(server.metrics_listen.port().into()) {
        bad.push("server --metrics-listen port is not the container's metrics port".into());
    }
    let tls_files = [
        ("--tls-cert-file", &server.tls.tls_cert_file),
        ("--tls-key-file", &server.tls.tls_key_file),
        ("--tls-client-ca-file", &server.tls.tls_client_ca_file),
    ];
    for (flag, path) in tls_files {
        if let Some(path) = path {
            if let Err(e) = file_source(built, server_pod, server_container, path) {
                bad.push(format!("server {flag}: {e}"));
            }
        }
    }
    bad.extend(network_policy_invariants(built));
    bad.extend(redis_invariants(built));
    bad.extend(crate::jobs::invariants(built, spec));
    // Issue 8: worker and client tokens come from different Secrets, every
    // token the server's --auth-config names is mounted in the server.
    let auth = auth_invariants(built, &server, server_pod, server_container, &mut bad);
    bad.extend(storage_invariants(
        built,
        overlay.is_some_and(|o| o.external_stores),
        &server,
        server_pod,
        server_container,
    ));
    let workers = built.containers(manifests_gen::objects::WORKER_IMAGE);
    assert_eq!(
        workers.len(),
        spec.worker_pools.len(),
        "{}: one worker container per pool",
        built.overlay
    );
    for (pod, container, name) in workers {
        let worker = match WorkerArgs::try_parse_from(args_of(container, "buildkube-worker")) {
            Ok(args) => args,
            Err(e) => {
                bad.push(format!("{name}: worker args do not parse: {e}"));
                continue;
            }
        };
        if !server.instances.contains(&worker.instance) {
            bad.push(format!(
                "{name}: --instance={} is not served (server: {:?})",
                worker.instance, server.instances
            ));
        }
        // --server=http://SERVICE:PORT (https:// with TLS) reaches the
        // server's gRPC port, speaking what it speaks.
        let server_tls = server.tls.tls_cert_file.is_some();
        let scheme = if server_tls { "https://" } else { "http://" };
        let Some(authority) = worker.server.strip_prefix(scheme) else {
            bad.push(format!(
                "{name}: --server={} does not start with {scheme}, which the server speaks",
                worker.server
            ));
            continue;
        };
        if server.tls.tls_client_ca_file.is_some() && worker.tls.tls_client_cert_file.is_none() {
            bad.push(format!(
                "{name}: the server requires client certificates but the worker has none"
            ));
        }
        let worker_tls_files = [
            ("--tls-ca-file", &worker.tls.tls_ca_file),
            ("--tls-client-cert-file", &worker.tls.tls_client_cert_file),
            ("--tls-client-key-file", &worker.tls.tls_client_key_file),
        ];
        for (flag, path) in worker_tls_files {
            if let Some(path) = path {
                if let Err(e) = file_source(built, pod, container, path) {
                    bad.push(format!("{name}: {flag}: {e}"));
                }
            }
        }
        let (host, port) = authority.rsplit_once(':').expect("host:port");
        let reaches = built.find("Service", host).is_some_and(|s| {
            matches(
                &labels(&s["spec"]["selector"]),
                &labels(&server_pod_labels(built)),
            ) && s["spec"]["ports"].as_array().unwrap().iter().any(|p| {
                p["port"].as_i64() == port.parse::<i64>().ok()
                    && container_port(server_pod, &p["targetPort"])
                        == Some(server.listen.port().into())
            })
        });
        if !reaches {
            bad.push(format!(
                "{name}: --server={} does not reach the server's gRPC port",
                worker.server
            ));
        }
        if container_port(pod, &"http".into()) != Some(worker.http_listen.port().into()) {
            bad.push(format!(
                "{name}: --http-listen port is not the container's http port"
            ));
        }
        // Issue 7: the worker is named after its pod through the flag's env
        // fallback, never an argument substitution (podman does not expand
        // `$(VAR)`).
        if let Some(arg) = args_of(container, "buildkube-worker")
            .iter()
            .find(|a| a.contains("$("))
        {
            bad.push(format!("{name}: argument {arg} relies on $(VAR) expansion"));
        }
        let id_from_pod_name = container["env"].as_array().into_iter().flatten().any(|e| {
            e["name"] == buildkube_config::WORKER_ID_ENV
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        });
        if worker.worker_id.is_some() || !id_from_pod_name {
            bad.push(format!(
                "{name}: the worker id should come from {} = metadata.name, not --worker-id",
                buildkube_config::WORKER_ID_ENV
            ));
        }
        // Issue 7: the work directory holds the cache and every running
        // action's outputs and stdio at their limits, so an action over
        // them fails alone instead of the pod being evicted.
        let work_limit = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| {
                container["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| {
                        m["name"] == v["name"]
                            && Path::new(str_of(&m["mountPath"])) == worker.work_dir
                    })
            })
            .and_then(|v| quantity_to_bytes(str_of(&v["emptyDir"]["sizeLimit"])));
        let concurrency = worker.concurrency.unwrap_or(1) as u64;
        let needed = worker.cache_max_size
            + concurrency * (worker.max_output_size + 2 * worker.max_stdio_size);
        if work_limit.is_none_or(|limit| limit < needed) {
            bad.push(format!(
                "{name}: the work dir emptyDir limit {work_limit:?} is below cache + \
                 concurrency × (max output + 2 × max stdio) = {needed}"
            ));
        }
        // Issue 4: a scale-down never kills an action within its timeout.
        // The kubelet waits the grace period after SIGTERM; the worker drains
        // for --drain-timeout-secs, which covers the longest action.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        if grace <= worker.drain_timeout_secs {
            bad.push(format!("{name}: terminationGracePeriodSeconds {grace} does not exceed --drain-timeout-secs {}", worker.drain_timeout_secs));
        }
        if worker.drain_timeout_secs < worker.max_action_timeout_secs {
            bad.push(format!(
                "{name}: --drain-timeout-secs {} is less than --max-action-timeout-secs {}",
                worker.drain_timeout_secs, worker.max_action_timeout_secs
            ));
        }
        match (&worker.auth_token_file, &auth) {
            (Some(path), Some(auth)) => match file_source(built, pod, container, path) {
                Ok(source) if auth.worker_sources.contains(&source) => {}
                Ok(source) => bad.push(format!(
                    "{name}: --auth-token-file comes from {source:?}, not a worker token of the server's --auth-config ({:?})",
                    auth.worker_sources
                )),
                Err(e) => bad.push(format!("{name}: --auth-token-file: {e}")),
            },
            (None, None) => {}
            _ => bad.push(format!(
                "{name}: auth is on in one of server and worker only"
            )),
        }
        if let Some(auth) = &auth {
            for m in container["volumeMounts"].as_array().into_iter().flatten() {
                let volume = pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == m["name"]);
                let secret = volume.map(|v| str_of(&v["secret"]["secretName"]).to_string());
                if let Some(secret) = secret.filter(|s| {
                    auth.client_sources
                        .contains(&("Secret".to_string(), s.clone()))
                }) {
                    bad.push(format!("{name}: mounts the client token Secret {secret}"));
                }
            }
        }
        if let Some(path) = &worker.env_script {
            if let Err(e) = file_source(built, pod, container, path) {
                bad.push(format!("{name}: --env-script: {e}"));
            }
        }
        // Credentials reach only the pools that opt in, from a Secret.
        let pool = spec
            .worker_pools
            .iter()
            .find(|p| manifests_gen::objects::worker_deployment_name(&p.name) == name);
        let opted_in = pool.is_some_and(|p| p.git_credentials)
            && overlay.is_some_and(|o| o.worker_credentials);
        if worker.git_credentials_dir.is_some() != opted_in {
            bad.push(format!(
                "{name}: --git-credentials-dir {:?}, but the pool opts in: {opted_in}",
                worker.git_credentials_dir
            ));
        }
        if let Some(dir) = &worker.git_credentials_dir {
            for file in [
                buildkube_config::GIT_CREDENTIALS_FILE,
                buildkube_config::SSH_KEY_FILE,
                buildkube_config::KNOWN_HOSTS_FILE,
            ] {
                match file_source(built, pod, container, &dir.join(file)) {
                    Ok((kind, _)) if kind == "Secret" => {}
                    other => bad.push(format!("{name}: --git-credentials-dir {file}: {other:?}")),
                }
            }
        }
    }

    // Overlays (not the base) pin every image, and the client configuration
    // names a served instance and an endpoint that reaches the server.
    if let Some(overlay) = overlay {
        let (server_image, worker_image) = manifests_gen::overlays::image_references(overlay);
        for w in &workloads {
            for c in w.pod["containers"].as_array().unwrap() {
                let image = str_of(&c["image"]);
                let tag = image
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .split_once(':')
                    .map(|(_, t)| t);
                if tag.is_none() || tag == Some("latest") {
                    bad.push(format!(
                        "{} {}: image {image} is not pinned",
                        w.kind, w.name
                    ));
                }
                if c["name"] == "server" && image != server_image
                    || c["name"] == "worker" && image != worker_image
                {
                    bad.push(format!(
                        "{} {}: image {image} is not the overlay's",
                        w.kind, w.name
                    ));
                }
            }
        }
        bad.extend(client_config_invariants(built, overlay, &server));
    }
    bad
}

/// The server's metrics port is open only to chosen namespaces, and the
/// workers' egress is denied except to the server's gRPC port and DNS (plus
/// IP blocks that never include the cloud metadata endpoint).
/// Issue 8: Redis (the action cache) is bounded: `--maxmemory` within its
/// container's memory limit, and `allkeys-lru` so a full Redis evicts
/// instead of failing every write.
fn redis_invariants(built: &Built) -> Vec<String> {
    let mut bad = Vec::new();
    let Some(redis) = built.find("Deployment", manifests_gen::objects::REDIS_NAME) else {
        return bad;
    };
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .copied()
    };
    let limit = quantity_to_bytes(str_of(&container["resources"]["limits"]["memory"]));
    match (value_of("--maxmemory").map(str::parse::<u64>), limit) {
        (Some(Ok(max)), Some(limit)) if max > 0 && max < limit => {}
        (max, limit) => bad.push(format!(
            "Redis --maxmemory {max:?} is not a positive number of bytes below its memory limit {limit:?}"
        )),
    }
    if value_of("--maxmemory-policy") != Some("allkeys-lru") {
        bad.push("Redis --maxmemory-policy is not allkeys-lru".into());
    }
    bad
}

fn network_policy_invariants(built: &Built) -> Vec<String> {
    let mut bad = Vec::new();
    let server_labels = labels(&server_pod_labels(built));
    let selects = |policy: &Value, pod_labels: &BTreeMap<String, String>| {
        matches(
            &labels(&policy["spec"]["podSelector"]["matchLabels"]),
            pod_labels,
        )
    };
    for policy in built.of_kind("NetworkPolicy") {
        if !selects(policy, &server_labels) {
            continue;
        }
        for rule in policy["spec"]["ingress"].as_array().into_iter().flatten() {
            let opens_metrics = rule["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["port"] == "metrics")
                || rule["ports"].is_null();
            let from_chosen_namespaces = rule["from"].as_array().is_some_and(|peers| {
                !peers.is_empty()
                    && peers.iter().all(|peer| {
                        peer["namespaceSelector"]["matchLabels"]
                            .as_object()
                            .is_some_and(|m| !m.is_empty())
                            && peer["ipBlock"].is_null()
                    })
            });
            if opens_metrics && !from_chosen_namespaces {
                bad.push(format!(
                    "NetworkPolicy {} opens the server's metrics port to any source",
                    name_of(policy)
                ));
            }
        }
    }
    for w in built.workloads() {
        let is_worker = w.pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| str_of(&c["image"]).contains(manifests_gen::objects::WORKER_IMAGE));
        if !is_worker {
            continue;
        }
        let policies: Vec<&Value> = built
            .of_kind("NetworkPolicy")
            .filter(|p| selects(p, &w.labels))
            .collect();
        let restricted = policies.iter().any(|p| {
            p["spec"]["policyTypes"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "Egress"))
        });
        if !restricted {
            bad.push(format!(
                "{} {}: no policy restricts its egress",
                w.kind, w.name
            ));
        }
        for policy in policies {
            for rule in policy["spec"]["egress"].as_array().into_iter().flatten() {
                for peer in rule["to"].as_array().into_iter().flatten() {
                    let block = &peer["ipBlock"];
                    if block.is_null() {
                        continue;
                    }
                    let cidr = str_of(&block["cidr"]);
                    let (address, prefix) = manifests_gen::spec::parse_cidr(cidr)
                        .unwrap_or((std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
                    let metadata = u32::from(manifests_gen::network::CLOUD_METADATA_ADDRESS);
                    let covers_metadata = match address {
                        std::net::IpAddr::V4(net) => {
                            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                            u32::from(net) & mask == metadata & mask
                        }
                        std::net::IpAddr::V6(_) => false,
                    };
                    let excepted = block["except"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e == "169.254.169.254/32");
                    if covers_metadata && !excepted {
                        bad.push(format!(
                            "NetworkPolicy {} lets workers reach the cloud metadata endpoint through {cidr}",
                            name_of(policy)
                        ));
                    }
                }
                if rule["to"].is_null() || rule["to"].as_array().is_some_and(|t| t.is_empty()) {
                    bad.push(format!(
                        "NetworkPolicy {} lets workers reach any destination",
                        name_of(policy)
                    ));
                }
            }
        }
    }
    bad
}

/// Aggregations, functions and operators the load queries may use.
const PROMQL_WORDS: &[&str] = &["sum", "vector", "or", "+"];

/// Problems with one load query, parsed as PromQL by a real parser: a parse
/// error, a metric that is not a load metric of `buildkube-config`, an
/// operation other than [`PROMQL_WORDS`], matchers other than
/// `instance="…"` and `platform=~"…"`, or a platform regex that does not
/// match the labels it lists. Returns each selector's `(instance, platform
/// labels)`.
fn query_problems(query: &str, bad: &mut Vec<String>, what: &str) -> Vec<(String, Vec<String>)> {
    use promql_parser::label::MatchOp;
    use promql_parser::parser::Expr;

    fn visit(
        expr: &Expr,
        query: &str,
        what: &str,
        bad: &mut Vec<String>,
        selectors: &mut Vec<(String, Vec<String>)>,
    ) {
        let mut word = |w: String| {
            if !PROMQL_WORDS.contains(&w.as_str()) {
                bad.push(format!("{what}: unexpected `{w}` in `{query}`"));
            }
        };
        match expr {
            Expr::Aggregate(a) => {
                word(a.op.to_string());
                visit(&a.expr, query, what, bad, selectors);
            }
            Expr::Binary(b) => {
                word(b.op.to_string());
                visit(&b.lhs, query, what, bad, selectors);
                visit(&b.rhs, query, what, bad, selectors);
            }
            Expr::Call(c) => {
                word(c.func.name.to_string());
                for arg in &c.args.args {
                    visit(arg, query, what, bad, selectors);
                }
            }
            Expr::Paren(p) => visit(&p.expr, query, what, bad, selectors),
            Expr::NumberLiteral(_) => {}
            Expr::VectorSelector(v) => {
                let metric = v.name.clone().unwrap_or_default();
                let load_metrics = [
                    buildkube_config::METRIC_QUEUE_DEPTH,
                    buildkube_config::METRIC_ACTIONS_RUNNING,
                ];
                if !load_metrics.contains(&metric.as_str()) {
                    bad.push(format!(
                        "{what}: `{metric}` is not a load metric of buildkube-config"
                    ));
                }
                let mut instance = None;
                let mut platforms = None;
                for m in &v.matchers.matchers {
                    match (m.name.as_str(), &m.op) {
                        ("__name__", MatchOp::Equal) => {}
                        ("instance", MatchOp::Equal) => instance = Some(m.value.clone()),
                        ("platform", MatchOp::Re(_)) => {
                            // The alternatives, each a regex-escaped label.
                            let labels: Vec<String> =
                                m.value.split('|').map(unescape_regex).collect();
                            for label in &labels {
                                if !m.is_match(label) {
                                    bad.push(format!(
                                        "{what}: platform regex `{}` does not match `{label}`",
                                        m.value
                                    ));
                                }
                            }
                            platforms = Some(labels);
                        }
                        _ => bad.push(format!("{what}: unexpected matcher `{m}` in `{query}`")),
                    }
                }
                match (instance, platforms) {
                    (Some(instance), Some(platforms)) => selectors.push((instance, platforms)),
                    _ => bad.push(format!(
                        "{what}: `{metric}` lacks an instance or platform matcher in `{query}`"
                    )),
                }
            }
            other => bad.push(format!("{what}: unexpected `{other}` in `{query}`")),
        }
    }

    let expr = match promql_parser::parser::parse(query) {
        Ok(expr) => expr,
        Err(e) => {
            bad.push(format!("{what}: `{query}` is not PromQL: {e}"));
            return Vec::new();
        }
    };
    let mut selectors = Vec::new();
    visit(&expr, query, what, bad, &mut selectors);
    if selectors.len() != 2 {
        bad.push(format!(
            "{what}: expected one selector per load metric in `{query}`"
        ));
    }
    selectors
}

/// The query check itself: a good query passes, each kind of bad one is named.
#[test]
fn load_query_check_parses_promql_and_names_problems() {
    let good = r#"(sum(buildkube_queue_depth{instance="main",platform=~"|runner=plain"}) or vector(0)) + (sum(buildkube_actions_running{instance="main",platform=~"|runner=plain"}) or vector(0))"#;
    let mut bad = Vec::new();
    let selectors = query_problems(good, &mut bad, "good");
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(
        selectors,
        vec![
            (
                "main".to_string(),
                vec![String::new(), "runner=plain".to_string()]
            );
            2
        ]
    );
    for (query, expected) in [
        (
            "sum(buildkube_queue_depth{instance=\"main\"",
            "is not PromQL",
        ),
        (
            r#"sum(rate(buildkube_queue_depth{instance="main",platform=~"a"}[5m])) + sum(buildkube_actions_running{instance="main",platform=~"a"})"#,
            "unexpected",
        ),
        (
            r#"sum(up{instance="main",platform=~"a"}) + sum(buildkube_actions_running{instance="main",platform=~"a"})"#,
            "`up` is not a load metric",
        ),
        (
            r#"sum(buildkube_queue_depth{instance="main",platform="a"}) + sum(buildkube_actions_running{instance="main",platform=~"a"})"#,
            "unexpected matcher",
        ),
        (
            r#"sum(buildkube_queue_depth{instance="main",platform=~"a.b|c"}) + sum(buildkube_actions_running{instance="main",platform=~"a"})"#,
            "",
        ),
    ] {
        let mut bad = Vec::new();
        query_problems(query, &mut bad, "q");
        if expected.is_empty() {
            assert!(bad.is_empty(), "{query}: {bad:?}");
        } else {
            assert!(
                bad.iter().any(|b| b.contains(expected)),
                "{query}: expected `{expected}` in {bad:?}"
            );
        }
    }
}

/// Undoes `regex::escape` of one alternative.
fn unescape_regex(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

/// Issue 4: every autoscaler paces its scale-down (a stabilization window, a
/// policy removing at most N pods per period), and reads its pool's load
/// exactly: queued plus running actions of the pool's instance, over the
/// platforms the pool's workers can run, each platform of an instance counted
/// for exactly one pool.
fn autoscaler_invariants(built: &Built) -> Vec<String> {
    let mut bad = Vec::new();
    // (instance, platform label) -> pools counting it.
    let mut counted: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    // (instance, platform label) of every platform some pool can run.
    let mut servable: BTreeSet<(String, String)> = BTreeSet::new();
    let adapter_rules: Value = built
        .dir
        .parent()
        .map(|root| {
            root.join("components")
                .join(manifests_gen::overlays::COMPONENT_HPA)
                .join(manifests_gen::overlays::ADAPTER_RULES_FILE)
        })
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|text| serde_yaml::from_str(&text).unwrap())
        .unwrap_or(Value::Null);
    for scaler in built
        .of_kind("HorizontalPodAutoscaler")
        .chain(built.of_kind(ScaledObject::KIND))
    {
        let what = format!("{} {}", str_of(&scaler["kind"]), name_of(scaler));
        let (behavior, queries, threshold) = if scaler["kind"] == ScaledObject::KIND {
            let trigger = &scaler["spec"]["triggers"][0];
            (
                &scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
                vec![str_of(&trigger["metadata"]["query"]).to_string()],
                str_of(&trigger["metadata"]["threshold"]).to_string(),
            )
        } else {
            let metrics = scaler["spec"]["metrics"].as_array().unwrap();
            let queries = metrics
                .iter()
                .map(|m| {
                    let name = &m["external"]["metric"]["name"];
                    adapter_rules["externalRules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|rule| rule["name"]["as"] == *name)
                        .map(|rule| str_of(&rule["metricsQuery"]).to_string())
                        .unwrap_or_else(|| {
                            bad.push(format!("{what}: no prometheus-adapter rule serves {name}"));
                            String::new()
                        })
                })
                .collect();
            (
                &scaler["spec"]["behavior"],
                queries,
                str_of(&metrics[0]["external"]["target"]["averageValue"]).to_string(),
            )
        };
        let down = &behavior["scaleDown"];
        if down["stabilizationWindowSeconds"].as_i64().unwrap_or(0) <= 0 {
            bad.push(format!("{what}: no scale-down stabilization window"));
        }
        let policies = down["policies"].as_array().cloned().unwrap_or_default();
        if policies.is_empty()
            || down["selectPolicy"] == "Disabled"
            || policies.iter().any(|p| {
                p["type"] != "Pods"
                    || p["value"].as_i64().unwrap_or(0) < 1
                    || p["periodSeconds"].as_i64().unwrap_or(0) < 1
            })
        {
            bad.push(format!(
                "{what}: scale-down is not limited to N pods per period: {down}"
            ));
        }

        // The target's worker flags: its instance, platform and concurrency.
        let target = &scaler["spec"]["scaleTargetRef"];
        let Some(deployment) = built.find("Deployment", str_of(&target["name"])) else {
            continue; // reported with the other dangling references
        };
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let worker = match WorkerArgs::try_parse_from(args_of(container, "buildkube-worker")) {
            Ok(worker) => worker,
            Err(e) => {
                bad.push(format!("{what}: target's worker args do not parse: {e}"));
                continue;
            }
        };
        if Some(threshold.as_str()) != worker.concurrency.map(|c| c.to_string()).as_deref() {
            bad.push(format!(
                "{what}: target {threshold} actions per worker is not the pool's --concurrency {:?}",
                worker.concurrency
            ));
        }
        let offered: Vec<(&str, &str)> = worker
            .platform
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for mask in 0u32..(1 << offered.len()) {
            let subset = (0..offered.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| offered[i]);
            servable.insert((
                worker.instance.clone(),
                buildkube_config::platform_label(subset),
            ));
        }
        for query in queries {
            let selectors = query_problems(&query, &mut bad, &what);
            let Some((instance, platforms)) = selectors.first() else {
                continue;
            };
            if selectors.iter().any(|s| s != &selectors[0]) {
                bad.push(format!(
                    "{what}: queued and running select different series"
                ));
            }
            if *instance != worker.instance {
                bad.push(format!(
                    "{what}: query instance `{instance}` is not the pool's --instance={}",
                    worker.instance
                ));
            }
            for label in platforms {
                let runnable = label.is_empty()
                    || label
                        .split(',')
                        .all(|pair| offered.iter().any(|(k, v)| format!("{k}={v}") == pair));
                if !runnable {
                    bad.push(format!(
                        "{what}: counts platform `{label}`, which its workers cannot run"
                    ));
                }
                counted
                    .entry((instance.clone(), label.clone()))
                    .or_default()
                    .push(what.clone());
            }
        }
    }
    if counted.is_empty() {
        return bad;
    }
    for ((instance, label), scalers) in &counted {
        // KEDA and HPA are alternatives: count each kind separately.
        for kind in ["HorizontalPodAutoscaler", ScaledObject::KIND] {
            let n = scalers.iter().filter(|s| s.starts_with(kind)).count();
            if n > 1 {
                bad.push(format!(
                    "instance `{instance}` platform `{label}` is counted by {n} autoscalers: {scalers:?}"
                ));
            }
        }
    }
    for (instance, label) in &servable {
        if !counted.contains_key(&(instance.clone(), label.clone())) {
            bad.push(format!(
                "instance `{instance}` platform `{label}` can run on a pool but no autoscaler counts it"
            ));
        }
    }
    bad
}

fn server_pod_labels(built: &Built) -> Value {
    built
        .find("Deployment", manifests_gen::objects::SERVER_NAME)
        .unwrap()["spec"]["template"]["metadata"]["labels"]
        .clone()
}

fn client_config_invariants(
    built: &Built,
    overlay: &manifests_gen::spec::OverlaySpec,
    server: &ServerArgs,
) -> Vec<String> {
    let Some(cm) = built.find("ConfigMap", "buildkube-client-config") else {
        return vec!["ConfigMap buildkube-client-config is missing".into()];
    };
    let in_cluster = |file: &str| str_of(&cm["data"][file]).to_string();
    let on_host = |file: &str| {
        std::fs::read_to_string(built.dir.join("client").join(file)).unwrap_or_default()
    };
    let mut bad: Vec<String> = client_files_invariants(built, overlay, server, &in_cluster, true)
        .into_iter()
        .map(|problem| format!("ConfigMap buildkube-client-config: {problem}"))
        .collect();
    bad.extend(
        client_files_invariants(built, overlay, server, &on_host, false)
            .into_iter()
            .map(|problem| format!("client/: {problem}")),
    );
    bad
}

/// The client files of one location (`in_cluster`: the ConfigMap for client
/// pods; otherwise `client/` for users' machines) agree with each other and
/// the server, reach its gRPC port from there, and name a token file that
/// exists there; recc and BuildStream get a token only over TLS.
fn client_files_invariants(
    built: &Built,
    overlay: &manifests_gen::spec::OverlaySpec,
    server: &ServerArgs,
    file: &dyn Fn(&str) -> String,
    in_cluster: bool,
) -> Vec<String> {
    let mut bad = Vec::new();
    let bazelrc = &file("bazelrc");
    let recc = &file("recc.env");
    let buildstream_text = file("buildstream.conf");
    let buildstream: serde_yaml::Value = serde_yaml::from_str(&buildstream_text).unwrap();
    let flag = |name: &str| {
        bazelrc
            .lines()
            .find_map(|l| l.strip_prefix(&format!("build:buildkube --{name}=")))
            .unwrap_or("")
            .to_string()
    };
    let env = |name: &str| {
        recc.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
            .to_string()
    };
    let executor = flag("remote_executor");
    let instance = flag("remote_instance_name");
    if !server.instances.contains(&instance) {
        bad.push(format!("bazelrc instance `{instance}` is not served"));
    }
    let (scheme, authority) = executor.split_once("://").unwrap_or(("", ""));
    let http_scheme = if scheme == "grpcs" { "https" } else { "http" };
    let http_url = format!("{http_scheme}://{authority}");
    if env("RECC_SERVER") != http_url || env("RECC_INSTANCE") != instance {
        bad.push(format!(
            "recc.env disagrees with bazelrc ({executor}, {instance}):\n{recc}"
        ));
    }
    for service in [
        "execution-service",
        "storage-service",
        "action-cache-service",
    ] {
        let s = &buildstream["remote-execution"][service];
        if s["url"].as_str() != Some(http_url.as_str())
            || s["instance-name"].as_str() != Some(instance.as_str())
        {
            bad.push(format!("buildstream.conf {service} disagrees with bazelrc"));
        }
    }
    if overlay.auth
        != bazelrc.contains(&format!(
            "--remote_header={}=Bearer",
            buildkube_config::AUTHORIZATION_HEADER
        ))
    {
        bad.push("bazelrc and auth disagree on the bearer token".into());
    }
    // The endpoint reaches the server's gRPC port the way the overlay exposes it.
    let (host, port) = authority.rsplit_once(':').unwrap_or(("", ""));
    let port: i64 = port.parse().unwrap_or(-1);
    let grpc_port_of = |service: &Value, pick: &dyn Fn(&Value) -> bool| {
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| pick(p) && p["name"] == "grpc")
    };
    let server_services: Vec<&Value> = built
        .of_kind("Service")
        .filter(|s| {
            matches(
                &labels(&s["spec"]["selector"]),
                &labels(&server_pod_labels(built)),
            )
        })
        .collect();
    let tls = http_scheme == "https";
    // A token path that exists where the files are used: a client token
    // Secret mounted where the server reads it, in a pod; the user's home,
    // on a machine.
    let token_ok = |path: &str| {
        if in_cluster {
            server.auth_config.is_some()
                && manifests_gen::auth::auth_config()
                    .clients
                    .iter()
                    .any(|c| c.token_file == Path::new(path))
        } else {
            path.starts_with("~/") || path.starts_with("$HOME/")
        }
    };
    let recc_token = env("RECC_ACCESS_TOKEN_PATH");
    let bst_tokens: Vec<String> = [
        "execution-service",
        "storage-service",
        "action-cache-service",
    ]
    .iter()
    .filter_map(|service| {
        buildstream["remote-execution"][*service]["auth"]["access-token"]
            .as_str()
            .map(str::to_string)
    })
    .collect();
    if overlay.auth && tls {
        if !token_ok(&recc_token) {
            bad.push(format!(
                "recc.env RECC_ACCESS_TOKEN_PATH `{recc_token}` does not exist there"
            ));
        }
        if bst_tokens.len() != 3 || !bst_tokens.iter().all(|t| token_ok(t)) {
            bad.push(format!(
                "buildstream.conf access-tokens {bst_tokens:?} do not exist there"
            ));
        }
    } else if !recc_token.is_empty() || !bst_tokens.is_empty() {
        // buildbox: "Secure Channel options cannot be used with this URL".
        bad.push(format!(
            "recc.env or buildstream.conf send a token without TLS ({http_url}), which buildbox refuses"
        ));
    }
    if overlay.auth {
        let path = bazelrc
            .split("$(cat ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or("");
        if !token_ok(path) {
            bad.push(format!(
                "bazelrc reads the token from `{path}`, which does not exist there"
            ));
        }
    }
    if buildstream_text.contains("project.conf fragment")
        || !buildstream_text.contains("user configuration")
    {
        bad.push("buildstream.conf is not labelled BuildStream 2 user configuration".into());
    }
    let expose = if in_cluster && !matches!(overlay.expose, ExposeSpec::Ingress) {
        // In the cluster, the ClusterIP Service, however the overlay exposes it.
        &ExposeSpec::ClusterIp
    } else {
        &overlay.expose
    };
    let reachable = match expose {
        ExposeSpec::ClusterIp => server_services.iter().any(|s| {
            host == format!(
                "{}.{}.svc.cluster.local",
                name_of(s),
                str_of(&s["metadata"]["namespace"])
            ) && grpc_port_of(s, &|p| p["port"].as_i64() == Some(port))
        }),
        ExposeSpec::NodePort { .. } => server_services.iter().any(|s| {
            s["spec"]["type"] == "NodePort"
                && grpc_port_of(s, &|p| match &overlay.kind_cluster {
                    Some(_) => {
                        kind_maps(&built.dir, p["nodePort"].as_i64(), port) && host == "localhost"
                    }
                    None => p["nodePort"].as_i64() == Some(port),
                })
        }),
        ExposeSpec::LoadBalancer => server_services.iter().any(|s| {
            s["spec"]["type"] == "LoadBalancer"
                && grpc_port_of(s, &|p| p["port"].as_i64() == Some(port))
        }),
        ExposeSpec::Ingress => {
            scheme == "grpcs"
                && port == 443
                && built.of_kind("Ingress").any(|i| {
                    i["spec"]["rules"].as_array().unwrap().iter().any(|r| {
                        r["host"] == host
                            && r["http"]["paths"].as_array().unwrap().iter().any(|p| {
                                let b = &p["backend"]["service"];
                                b["port"]["name"] == "grpc"
                                    && server_services.iter().any(|s| name_of(s) == b["name"])
                            })
                    }) && i["spec"]["tls"].as_array().into_iter().flatten().any(|t| {
                        t["hosts"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|h| h == host)
                    })
                })
        }
    };
    if !reachable {
        bad.push(format!(
            "client endpoint {executor} does not reach the server's gRPC port ({:?})",
            expose
        ));
    }
    bad
}

/// Whether the overlay's kind-cluster.yaml maps `host_port` to `node_port`.
fn kind_maps(dir: &Path, node_port: Option<i64>, host_port: i64) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("kind-cluster.yaml")) else {
        return false;
    };
    let config: Value = serde_yaml::from_str(&text).unwrap();
    config["nodes"].as_array().into_iter().flatten().any(|n| {
        n["extraPortMappings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| {
                m["containerPort"].as_i64() == node_port
                    && m["hostPort"].as_i64() == Some(host_port)
            })
    })
}

/// Builds, validates and checks every overlay of `spec`, plus the base.
pub(crate) fn build_and_check(spec: &StackSpec) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    generate(spec)
        .write(dir.path(), &owned_roots(spec))
        .unwrap();
    let mut failures = Vec::new();
    let mut names: Vec<String> = vec!["base".into()];
    names.extend(spec.overlays.keys().cloned());
    for name in names {
        let built = build(dir.path(), &name);
        assert!(!built.docs.is_empty(), "{name} built nothing");
        for problem in validate(dir.path(), &built)
            .into_iter()
            .chain(invariants(&built, spec))
        {
            failures.push(format!("{name}: {problem}"));
        }
    }
    failures
}

#[test]
fn default_overlays_build_validate_and_hold_their_invariants() {
    let failures = build_and_check(&StackSpec::default());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Another stack: two instances and pools, HPA, a LoadBalancer, a bare
/// NodePort, auth without credentials, so every component is built.
#[test]
fn alternate_stack_builds_validates_and_holds_its_invariants() {
    let mut spec = StackSpec {
        instances: vec!["main".into(), "ci/linux".into()],
        ..StackSpec::default()
    };
    let mut ci = spec.worker_pools[0].clone();
    ci.name = "ci".into();
    ci.instance = "ci/linux".into();
    ci.platform.insert("runner".into(), "sandbox".into());
    ci.git_credentials = true;
    spec.worker_pools.push(ci);
    let mut second = spec.worker_pools[0].clone();
    second.name = "big".into();
    second.concurrency = 16;
    // 10 GiB cache + 16 × (6 GiB outputs + 2 × 256 MiB stdio) = 114 GiB.
    second.work_dir_size = "120Gi".into();
    // A property of its own: the autoscaler counts each platform for one pool.
    second.platform.insert("size".into(), "big".into());
    spec.worker_pools.push(second);
    let base = spec.overlays["production"].clone();
    spec.overlays.clear();
    let mut hpa = base.clone();
    hpa.autoscaling = AutoscalingKind::Hpa;
    hpa.expose = ExposeSpec::LoadBalancer;
    hpa.worker_credentials = false;
    hpa.external_stores = false;
    hpa.namespace = "farm".into();
    spec.overlays.insert("hpa-lb".into(), hpa);
    let mut node_port = base;
    node_port.autoscaling = AutoscalingKind::None;
    node_port.expose = ExposeSpec::NodePort { node_port: 31000 };
    node_port.auth = false;
    node_port.worker_replicas.insert("big".into(), 0);
    node_port.worker_credentials = true;
    // Mutual TLS from Secrets the user makes, without cert-manager.
    node_port.tls = TlsKind::Secrets;
    spec.overlays.insert("node-port".into(), node_port);
    spec.worker_egress = vec![
        EgressAllowSpec {
            cidr: "0.0.0.0/0".into(),
            ports: vec![443],
        },
        EgressAllowSpec {
            cidr: "10.20.0.0/16".into(),
            ports: vec![],
        },
    ];
    spec.validate().unwrap();
    let failures = build_and_check(&spec);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The invariants catch what they claim to: break an overlay on purpose.
#[test]
fn invariants_catch_a_broken_overlay() {
    let spec = StackSpec::default();
    let dir = tempfile::tempdir().unwrap();
    generate(&spec)
        .write(dir.path(), &owned_roots(&spec))
        .unwrap();
    let mut built = build(dir.path(), "example");
    for doc in &mut built.docs {
        if doc["kind"] == "Service" {
            doc["spec"]["ports"][0]["targetPort"] = 9999.into();
        }
        if name_of(doc) == "buildkube-worker-default" && doc["kind"] == "Deployment" {
            let args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array_mut()
                .unwrap();
            args[1] = "--instance=typo".into();
            doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30.into();
        }
        if doc["kind"] == "Secret" && name_of(doc).starts_with("buildkube-worker-token") {
            doc["metadata"]["name"] = "renamed".into();
        }
    }
    let failures = invariants(&built, &spec).join("\n");
    for expected in [
        "targetPort 9999 is not a container port",
        "--instance=typo is not served",
        "does not exceed --drain-timeout-secs",
        "references Secret buildkube-worker-token-",
    ] {
        assert!(
            failures.contains(expected),
            "`{expected}` not reported in:\n{failures}"
        );
    }
}

/// Issue 8, item 7: the invariants catch the server's metrics port open to
/// any source, workers whose egress nothing restricts or that may reach the
/// cloud metadata endpoint, and an unbounded Redis.
#[test]
fn issue_8_invariants_catch_open_metrics_open_egress_and_unbounded_redis() {
    let spec = StackSpec::default();
    let dir = tempfile::tempdir().unwrap();
    generate(&spec)
        .write(dir.path(), &owned_roots(&spec))
        .unwrap();
    let production = build(dir.path(), "production");
    assert!(
        invariants(&production, &spec).is_empty(),
        "{}",
        invariants(&production, &spec).join("\n")
    );
    let mut broken = build(dir.path(), "production");
    for doc in &mut broken.docs {
        if doc["kind"] == "NetworkPolicy" && name_of(doc) == manifests_gen::objects::SERVER_NAME {
            for rule in doc["spec"]["ingress"].as_array_mut().unwrap() {
                rule.as_object_mut().unwrap().remove("from");
            }
        }
        if doc["kind"] == "Deployment" && name_of(doc) == manifests_gen::objects::REDIS_NAME {
            let args = &mut doc["spec"]["template"]["spec"]["containers"][0]["args"];
            let kept: Vec<Value> = args
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| !str_of(a).starts_with("--maxmemory") && !str_of(a).contains("lru"))
                .cloned()
                .collect();
            *args = kept.into();
        }
    }
    let mut open_egress = build(dir.path(), "production");
    for doc in &mut open_egress.docs {
        if doc["kind"] == "NetworkPolicy" && name_of(doc) == manifests_gen::objects::WORKER_NAME {
            doc["spec"]["egress"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}));
        }
    }
    let mut unrestricted = build(dir.path(), "production");
    for doc in &mut unrestricted.docs {
        if doc["kind"] == "NetworkPolicy" && name_of(doc) == manifests_gen::objects::WORKER_NAME {
            doc["spec"]["policyTypes"] = serde_json::json!(["Ingress"]);
        }
    }
    let failures = [
        invariants(&broken, &spec),
        invariants(&open_egress, &spec),
        invariants(&unrestricted, &spec),
    ]
    .concat()
    .join("\n");
    for expected in [
        "opens the server's metrics port to any source",
        "Redis --maxmemory None",
        "Redis --maxmemory-policy is not allkeys-lru",
        "lets workers reach the cloud metadata endpoint through 0.0.0.0/0",
        "no policy restricts its egress",
    ] {
        assert!(
            failures.contains(expected),
            "`{expected}` not reported in:\n{failures}"
        );
    }
}

/// Issue 7: the invariants catch an unbounded or too small work directory,
/// a container without ephemeral storage, a worker id by argument
/// substitution, a token sent by recc without TLS, and a kind ConfigMap
/// pointing in-cluster clients at the host's address.
#[test]
fn issue_7_invariants_catch_storage_worker_id_and_client_config() {
    let spec = StackSpec::default();
    let dir = tempfile::tempdir().unwrap();
    generate(&spec)
        .write(dir.path(), &owned_roots(&spec))
        .unwrap();
    let mut example = build(dir.path(), "example");
    for doc in &mut example.docs {
        if doc["kind"] == "Deployment" && name_of(doc) == "buildkube-worker-default" {
            let pod = &mut doc["spec"]["template"]["spec"];
            pod["volumes"][0]["emptyDir"]["sizeLimit"] = "20Gi".into();
            pod["volumes"][2]["emptyDir"] = serde_json::json!({});
            let container = &mut pod["containers"][0];
            container["args"]
                .as_array_mut()
                .unwrap()
                .push("--worker-id=$(POD_NAME)".into());
            container["resources"]["limits"]
                .as_object_mut()
                .unwrap()
                .remove("ephemeral-storage");
        }
        if doc["kind"] == "ConfigMap" && name_of(doc) == "buildkube-client-config" {
            let recc = str_of(&doc["data"]["recc.env"]).to_string();
            doc["data"]["recc.env"] =
                format!("{recc}RECC_ACCESS_TOKEN_PATH=/etc/buildkube/auth/token\n").into();
        }
    }
    let failures = invariants(&example, &spec).join("\n");
    for expected in [
        "the work dir emptyDir limit Some(21474836480) is below",
        "emptyDir \"tmp\" has no sizeLimit",
        "limits ephemeral-storage None",
        "relies on $(VAR) expansion",
        "not --worker-id",
        "send a token without TLS",
    ] {
        assert!(
            failures.contains(expected),
            "`{expected}` not reported in:\n{failures}"
        );
    }

    let mut kind = build(dir.path(), "kind");
    let host_files = dir.path().join("kind/client");
    for doc in &mut kind.docs {
        if doc["kind"] == "ConfigMap" && name_of(doc) == "buildkube-client-config" {
            for file in ["bazelrc", "recc.env", "buildstream.conf"] {
                doc["data"][file] = std::fs::read_to_string(host_files.join(file))
                    .unwrap()
                    .into();
            }
        }
    }
    let failures = invariants(&kind, &spec).join("\n");
    assert!(
        failures.contains("ConfigMap buildkube-client-config: client endpoint grpc://localhost:8980 does not reach"),
        "the host's address in the ConfigMap is not reported:\n{failures}"
    );
}

/// Issue 4: the autoscaler invariants catch a query on a foreign metric or
/// another pool's platform, a missing scale-down pace, and a drain shorter
/// than the longest action.
#[test]
fn issue_4_invariants_catch_a_broken_autoscaler_and_drain() {
    let spec = StackSpec::default();
    let dir = tempfile::tempdir().unwrap();
    generate(&spec)
        .write(dir.path(), &owned_roots(&spec))
        .unwrap();
    let mut built = build(dir.path(), "production");
    for doc in &mut built.docs {
        if doc["kind"] == ScaledObject::KIND {
            let spec = &mut doc["spec"];
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] = serde_json::json!({"scaleDown": {"policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]}});
            let query = spec["triggers"][0]["metadata"]["query"]
                .as_str()
                .unwrap()
                .replacen("buildkube_queue_depth", "buildkube_workers_busy", 1)
                .replace("runner=plain", "runner=gpu");
            spec["triggers"][0]["metadata"]["query"] = query.into();
        }
        if doc["kind"] == "Deployment" && name_of(doc) == "buildkube-worker-default" {
            let args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array_mut()
                .unwrap();
            for arg in args.iter_mut() {
                if arg
                    .as_str()
                    .unwrap()
                    .starts_with("--max-action-timeout-secs=")
                {
                    *arg = "--max-action-timeout-secs=86400".into();
                }
            }
        }
    }
    let failures = invariants(&built, &spec).join("\n");
    for expected in [
        "no scale-down stabilization window",
        "scale-down is not limited to N pods per period",
        "`buildkube_workers_busy` is not a load metric of buildkube-config",
        "counts platform `runner=gpu`, which its workers cannot run",
        "platform `OSFamily=Linux,runner=plain` can run on a pool but no autoscaler counts it",
        "--drain-timeout-secs 3900 is less than --max-action-timeout-secs 86400",
    ] {
        assert!(
            failures.contains(expected),
            "`{expected}` not reported in:\n{failures}"
        );
    }
}
