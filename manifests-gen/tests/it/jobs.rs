//! CI jobs' objects (issue 9, item 7): pools with `jobs` run steps with the
//! hooks ConfigMap; the server reads its webhook secrets from a Secret no
//! worker mounts; the webhook Ingress exposes exactly the webhook paths of
//! the HTTP port, which the server's NetworkPolicy admits.
//!
//! [`invariants`] runs over every built overlay of every stack `built`
//! checks; the tests here add a stack with both webhooks over SSH, show the
//! invariants catching broken objects, and pin the spec's refusals.

use std::collections::BTreeSet;
use std::path::Path;

use buildkube_config::jobs::{GITHUB_WEBHOOK_PATH, GITLAB_WEBHOOK_PATH};
use buildkube_config::{ServerArgs, WorkerArgs, DEFAULT_HTTP_PORT};
use clap::Parser;
use manifests_gen::jobs::{
    self, GITHUB_WEBHOOK_KEY, GITHUB_WEBHOOK_SECRET_FILE, HOOKS_CONFIGMAP, HOOKS_README_KEY,
    WEBHOOKS_INGRESS, WEBHOOKS_SECRET,
};
use manifests_gen::objects::{
    worker_deployment, HTTP_PORT_NAME, SERVER_IMAGE, WORKER_IMAGE, WORKER_NAME_PREFIX,
};
use manifests_gen::spec::{CloneUrlSpec, ExposeSpec, StackSpec, TlsKind, WebhooksSpec};
use manifests_gen::{generate, owned_roots};
use serde_json::Value;

use crate::built::{args_of, build, build_and_check, file_source, name_of, str_of, Built};

/// The server's webhook paths an Ingress may route to its HTTP port.
const WEBHOOK_PATHS: [&str; 2] = [GITHUB_WEBHOOK_PATH, GITLAB_WEBHOOK_PATH];

fn is_http_port(port: &Value) -> bool {
    port["name"] == HTTP_PORT_NAME || port["number"].as_u64() == Some(DEFAULT_HTTP_PORT.into())
}

/// The Deployment volume of `container`'s mount at `dir`, with the mount.
fn mounted_volume<'a>(
    pod: &'a Value,
    container: &'a Value,
    dir: &Path,
) -> Option<(&'a Value, &'a Value)> {
    let mount = container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| Path::new(str_of(&m["mountPath"])) == dir)?;
    let volume = pod["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    Some((volume, mount))
}

/// The invariants of CI jobs over one built overlay of `spec`.
pub(crate) fn invariants(built: &Built, spec: &StackSpec) -> Vec<String> {
    let mut bad = Vec::new();
    let overlay = spec.overlays.get(&built.overlay);

    // Workers: a pool with `jobs` runs steps with the hooks ConfigMap
    // mounted read-only and executable at --hooks-dir; others neither.
    for (pod, container, workload) in built.containers(WORKER_IMAGE) {
        let Some(pool) = workload
            .strip_prefix(WORKER_NAME_PREFIX)
            .and_then(|name| spec.pool(name))
        else {
            bad.push(format!("{workload}: not the Deployment of a pool"));
            continue;
        };
        let args = match WorkerArgs::try_parse_from(args_of(container, "buildkube-worker")) {
            Ok(args) => args,
            Err(e) => {
                bad.push(format!("{workload}: arguments do not parse: {e}"));
                continue;
            }
        };
        let hooks_volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| str_of(&v["configMap"]["name"]).starts_with(HOOKS_CONFIGMAP));
        if !pool.jobs {
            if args.run_steps || args.hooks_dir.is_some() || hooks_volume.is_some() {
                bad.push(format!(
                    "{workload}: pool `{}` does not set jobs, yet its worker runs steps or mounts hooks",
                    pool.name
                ));
            }
            continue;
        }
        if !args.run_steps {
            bad.push(format!(
                "{workload}: pool `{}` sets jobs, its worker lacks --run-steps",
                pool.name
            ));
        }
        let Some(dir) = &args.hooks_dir else {
            bad.push(format!(
                "{workload}: pool `{}` sets jobs, its worker has no --hooks-dir",
                pool.name
            ));
            continue;
        };
        match file_source(built, pod, container, &dir.join(HOOKS_README_KEY)) {
            Ok((kind, name)) if kind == "ConfigMap" && name.starts_with(HOOKS_CONFIGMAP) => {}
            Ok((kind, name)) => bad.push(format!(
                "{workload}: --hooks-dir {} is {kind} {name}, not the hooks ConfigMap",
                dir.display()
            )),
            Err(e) => bad.push(format!("{workload}: --hooks-dir: {e}")),
        }
        if let Some((volume, mount)) = mounted_volume(pod, container, dir) {
            if mount["readOnly"] != true {
                bad.push(format!("{workload}: the hooks are mounted writable"));
            }
            if volume["configMap"]["defaultMode"].as_i64().unwrap_or(0o644) & 0o111 == 0 {
                bad.push(format!(
                    "{workload}: the hooks are not executable (defaultMode)"
                ));
            }
        }
    }

    // The server: a webhook flag for each webhook the overlay turns on,
    // naming a file of a Secret no worker mounts.
    let worker_secrets: BTreeSet<&str> = built
        .containers(WORKER_IMAGE)
        .into_iter()
        .flat_map(|(pod, _, _)| pod["volumes"].as_array().into_iter().flatten())
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    let mut server_tls = false;
    let mut served_paths = BTreeSet::new();
    for (pod, container, workload) in built.containers(SERVER_IMAGE) {
        let args = match ServerArgs::try_parse_from(args_of(container, "buildkube-server")) {
            Ok(args) => args,
            Err(e) => {
                bad.push(format!("{workload}: arguments do not parse: {e}"));
                continue;
            }
        };
        server_tls = args.tls.tls_cert_file.is_some();
        let webhooks = overlay.map(|o| o.webhooks).unwrap_or_default();
        for (flag, file, on, path) in [
            (
                "--github-webhook-secret-file",
                &args.jobs.github_webhook_secret_file,
                webhooks.github,
                GITHUB_WEBHOOK_PATH,
            ),
            (
                "--gitlab-webhook-token-file",
                &args.jobs.gitlab_webhook_token_file,
                webhooks.gitlab,
                GITLAB_WEBHOOK_PATH,
            ),
        ] {
            match file {
                None if on => bad.push(format!(
                    "{workload}: the overlay turns {path} on, the server has no {flag}"
                )),
                None => {}
                Some(_) if !on => bad.push(format!(
                    "{workload}: {flag} is set, the overlay does not turn {path} on"
                )),
                Some(file) => {
                    served_paths.insert(path);
                    match file_source(built, pod, container, file) {
                        Ok((kind, name)) if kind == "Secret" => {
                            if worker_secrets.contains(name.as_str()) {
                                bad.push(format!(
                                    "{workload}: {flag}'s Secret {name} is mounted in a worker"
                                ));
                            }
                        }
                        Ok((kind, name)) => bad.push(format!(
                            "{workload}: {flag} is in {kind} {name}, not a Secret"
                        )),
                        Err(e) => bad.push(format!("{workload}: {flag}: {e}")),
                    }
                }
            }
        }
    }

    // Ingresses: the HTTP port only through Exact webhook paths the server
    // serves, in an Ingress of its own speaking HTTP(S) to it; never the
    // metrics port.
    let mut routed = BTreeSet::new();
    for ingress in built.of_kind("Ingress") {
        let name = name_of(ingress);
        let paths: Vec<&Value> = ingress["spec"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["http"]["paths"].as_array().into_iter().flatten())
            .collect();
        let to_http = paths
            .iter()
            .filter(|p| is_http_port(&p["backend"]["service"]["port"]))
            .count();
        if to_http == 0 {
            continue;
        }
        if to_http != paths.len() {
            bad.push(format!("Ingress {name} routes the HTTP port and another port: one backend protocol cannot serve both"));
        }
        for path in paths {
            let text = str_of(&path["path"]);
            if path["pathType"] != "Exact" || !WEBHOOK_PATHS.contains(&text) {
                bad.push(format!(
                    "Ingress {name} exposes {} {text} of the HTTP port: only the webhook paths, Exact",
                    str_of(&path["pathType"])
                ));
            } else if !served_paths.contains(text) {
                bad.push(format!(
                    "Ingress {name} routes {text}, which the server does not serve"
                ));
            } else {
                routed.insert(text);
            }
        }
        let protocol =
            &ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"];
        let expected = if server_tls { "HTTPS" } else { "HTTP" };
        if protocol != expected {
            bad.push(format!(
                "Ingress {name} speaks {protocol} to the HTTP port, which speaks {expected}"
            ));
        }
    }
    if overlay.is_some_and(|o| matches!(o.expose, ExposeSpec::Ingress)) && routed != served_paths {
        bad.push(format!(
            "webhook paths {served_paths:?} are served, the Ingress routes {routed:?}"
        ));
    }
    for ingress in built.of_kind("Ingress") {
        for rule in ingress["spec"]["rules"].as_array().into_iter().flatten() {
            for path in rule["http"]["paths"].as_array().into_iter().flatten() {
                if path["backend"]["service"]["port"]["name"]
                    == manifests_gen::objects::METRICS_PORT_NAME
                {
                    bad.push(format!(
                        "Ingress {} exposes the metrics port",
                        name_of(ingress)
                    ));
                }
            }
        }
    }

    // The ingress controller reaches the HTTP port: the server's policy
    // admits it from any source.
    if !routed.is_empty() {
        let admitted = built.of_kind("NetworkPolicy").any(|policy| {
            policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
                && policy["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        rule["from"].as_array().is_none_or(|from| from.is_empty())
                            && rule["ports"].as_array().into_iter().flatten().any(|p| {
                                p["port"] == HTTP_PORT_NAME
                                    || p["port"].as_u64() == Some(DEFAULT_HTTP_PORT.into())
                            })
                    })
        });
        if !admitted {
            bad.push("the Ingress routes webhooks, no NetworkPolicy admits the server's HTTP port from it".into());
        }
    }
    bad
}

/// The default stack's production overlay, built.
fn built_production() -> (StackSpec, Built, tempfile::TempDir) {
    let spec = StackSpec::default();
    let dir = tempfile::tempdir().unwrap();
    generate(&spec)
        .write(dir.path(), &owned_roots(&spec))
        .unwrap();
    let built = build(dir.path(), "production");
    (spec, built, dir)
}

fn container_args<'a>(built: &'a mut Built, kind: &str, name: &str) -> &'a mut Vec<Value> {
    let doc = built
        .docs
        .iter_mut()
        .find(|d| d["kind"] == kind && name_of(d) == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    doc["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
}

/// A pool with `jobs` gets `--run-steps` and `--hooks-dir` at the mounted
/// hooks ConfigMap (paths from `manifests_gen::jobs`); a pool without gets
/// none of them.
#[test]
fn job_pool_workers_run_steps_with_the_hooks_mounted_read_only() {
    let spec = StackSpec::default();
    let mut pool = spec.worker_pools[0].clone();
    assert!(pool.jobs, "the default pool runs steps");
    for jobs in [true, false] {
        pool.jobs = jobs;
        let deployment = serde_json::to_value(worker_deployment(&spec, &pool)).unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args = WorkerArgs::try_parse_from(args_of(container, "buildkube-worker")).unwrap();
        assert_eq!(args.run_steps, jobs);
        assert_eq!(args.hooks_dir, jobs.then(jobs::hooks_dir));
        let mounted = mounted_volume(pod, container, &jobs::hooks_dir());
        assert_eq!(mounted.is_some(), jobs, "{deployment:#}");
        if let Some((volume, mount)) = mounted {
            assert_eq!(volume["configMap"]["name"], HOOKS_CONFIGMAP);
            assert_eq!(volume["configMap"]["defaultMode"], 0o555);
            assert_eq!(mount["readOnly"], true);
        }
    }
}

/// Production's server reads `--github-webhook-secret-file` from the
/// mounted Secret `buildkube-webhooks`, GitLab's flag is off, and the
/// Ingress of the webhook routes exactly `/webhooks/github` (Exact) to the
/// HTTP port, over mutual TLS; the gRPC Ingress never routes the HTTP port.
#[test]
fn webhook_secret_and_ingress_of_the_production_overlay() {
    let (_spec, built, _dir) = built_production();
    let (pod, container, _) = built.containers(SERVER_IMAGE)[0];
    let args = ServerArgs::try_parse_from(args_of(container, "buildkube-server")).unwrap();
    let file = args.jobs.github_webhook_secret_file.clone().unwrap();
    assert_eq!(file, jobs::webhook_secret_path(GITHUB_WEBHOOK_KEY));
    assert_eq!(args.jobs.gitlab_webhook_token_file, None);
    assert_eq!(
        args.jobs.webhook_clone_url,
        buildkube_config::WebhookCloneUrl::Https
    );
    let (kind, secret) = file_source(&built, pod, container, &file).unwrap();
    assert_eq!(kind, "Secret");
    assert!(
        secret.starts_with(&format!("{WEBHOOKS_SECRET}-")),
        "{secret}: a generated Secret"
    );

    let ingress = built
        .find("Ingress", WEBHOOKS_INGRESS)
        .expect("the webhook Ingress");
    let paths = &ingress["spec"]["rules"][0]["http"]["paths"];
    assert_eq!(paths.as_array().unwrap().len(), 1, "{paths:#}");
    assert_eq!(paths[0]["path"], GITHUB_WEBHOOK_PATH);
    assert_eq!(paths[0]["pathType"], "Exact");
    assert!(is_http_port(&paths[0]["backend"]["service"]["port"]));
    let annotations = &ingress["metadata"]["annotations"];
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/backend-protocol"],
        "HTTPS"
    );
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/proxy-body-size"],
        format!("{}m", buildkube_jobs::webhook::DEFAULT_MAX_BODY_BYTES >> 20),
        "the server's own delivery limit"
    );
    let grpc = built
        .find("Ingress", manifests_gen::objects::SERVER_NAME)
        .unwrap();
    assert_eq!(
        grpc["spec"]["tls"], ingress["spec"]["tls"],
        "same host and certificate"
    );
    assert_eq!(
        grpc["spec"]["rules"][0]["host"],
        ingress["spec"]["rules"][0]["host"]
    );
    for path in grpc["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .unwrap()
    {
        assert!(
            !is_http_port(&path["backend"]["service"]["port"]),
            "{path:#}"
        );
    }
    assert!(invariants(&built, &StackSpec::default()).is_empty());
}

/// The placeholder of the webhook secret is empty, which the server
/// refuses at start (naming the file), so a forgotten one never accepts a
/// well-known secret.
#[test]
fn webhook_secret_placeholder_is_refused_by_the_server() {
    let (_spec, _built, dir) = built_production();
    let file = dir
        .path()
        .join("production/secrets")
        .join(GITHUB_WEBHOOK_SECRET_FILE);
    let error = buildkube_jobs::webhook::WebhookSecrets::from_file(&file).unwrap_err();
    assert!(error.to_string().contains("holds no secret"), "{error}");
}

/// A stack with both webhooks, cloning over SSH with the credentials, no
/// TLS (the Ingress speaks plain HTTP to the server), no auth (the overlay
/// renders the server's arguments for the webhooks alone), and a second
/// pool that does not run steps: built, validated, invariants hold.
#[test]
fn webhook_stack_over_ssh_without_tls_builds_and_holds_its_invariants() {
    let mut spec = StackSpec::default();
    spec.worker_pools[0].git_credentials = true;
    let mut plain = spec.worker_pools[0].clone();
    plain.name = "plain".into();
    plain.jobs = false;
    plain.git_credentials = false;
    plain.platform.insert("size".into(), "big".into());
    spec.worker_pools.push(plain);
    let mut overlay = spec.overlays["production"].clone();
    overlay.tls = TlsKind::None;
    overlay.auth = false;
    overlay.external_stores = false;
    overlay.worker_credentials = true;
    overlay.webhooks = WebhooksSpec {
        github: true,
        gitlab: true,
        clone_url: CloneUrlSpec::Ssh,
    };
    spec.overlays.clear();
    spec.overlays.insert("webhooks".into(), overlay);
    spec.validate().unwrap();
    let failures = build_and_check(&spec);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The invariants catch what they claim to: break production on purpose.
#[test]
fn job_invariants_catch_missing_hooks_an_exposed_http_port_and_a_leaked_webhook_secret() {
    let (spec, mut built, _dir) = built_production();
    let args = container_args(&mut built, "Deployment", "buildkube-worker-default");
    args.retain(|a| !str_of(a).starts_with("--hooks-dir") && str_of(a) != "--run-steps");
    let server_args = container_args(&mut built, "Deployment", "buildkube-server");
    server_args.push("--gitlab-webhook-token-file=/etc/buildkube/elsewhere/gitlab".into());
    let webhooks_secret = built
        .docs
        .iter()
        .find(|d| d["kind"] == "Secret" && name_of(d).starts_with(WEBHOOKS_SECRET))
        .map(|d| name_of(d).to_string())
        .unwrap();
    for doc in &mut built.docs {
        if doc["kind"] == "Ingress" && name_of(doc) == WEBHOOKS_INGRESS {
            let mut everything = doc["spec"]["rules"][0]["http"]["paths"][0].clone();
            everything["path"] = "/".into();
            everything["pathType"] = "Prefix".into();
            doc["spec"]["rules"][0]["http"]["paths"]
                .as_array_mut()
                .unwrap()
                .push(everything);
        }
        if doc["kind"] == "Deployment" && name_of(doc) == "buildkube-worker-default" {
            let volumes = doc["spec"]["template"]["spec"]["volumes"]
                .as_array_mut()
                .unwrap();
            volumes.push(
                serde_json::json!({"name": "leak", "secret": {"secretName": webhooks_secret}}),
            );
        }
        if doc["kind"] == "NetworkPolicy" && name_of(doc) == manifests_gen::objects::SERVER_NAME {
            for rule in doc["spec"]["ingress"].as_array_mut().unwrap() {
                rule["ports"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|p| p["port"] != HTTP_PORT_NAME);
            }
        }
    }
    let failures = invariants(&built, &spec).join("\n");
    for expected in [
        "buildkube-worker-default: pool `default` sets jobs, its worker lacks --run-steps",
        "buildkube-worker-default: pool `default` sets jobs, its worker has no --hooks-dir",
        "--gitlab-webhook-token-file is set, the overlay does not turn /webhooks/gitlab on",
        "is mounted in a worker",
        "exposes Prefix / of the HTTP port",
        "no NetworkPolicy admits the server's HTTP port",
    ] {
        assert!(
            failures.contains(expected),
            "`{expected}` not reported in:\n{failures}"
        );
    }
}

/// Webhooks whose jobs no pool runs, SSH clones without the SSH key, and a
/// pool that runs steps listed after one that does not (the autoscaler
/// would count its steps for the other) are refused, naming the field.
#[test]
fn webhook_and_job_pool_specs_that_cannot_work_are_refused() {
    let error_of = |spec: &StackSpec| spec.validate().unwrap_err().to_string();

    let mut no_jobs_pool = StackSpec::default();
    no_jobs_pool.worker_pools[0].jobs = false;
    let error = error_of(&no_jobs_pool);
    assert!(
        error.contains("  overlays.production.webhooks: webhook jobs run on instance `main`"),
        "{error}"
    );

    let mut ssh = StackSpec::default();
    ssh.overlays
        .get_mut("production")
        .unwrap()
        .webhooks
        .clone_url = CloneUrlSpec::Ssh;
    let error = error_of(&ssh);
    assert!(
        error
            .contains("  overlays.production.webhooks.clone_url: `ssh` needs the workers' SSH key"),
        "{error}"
    );
    // With the key in the overlay, and the pool allowed to have it: valid.
    ssh.worker_pools[0].git_credentials = true;
    ssh.overlays
        .get_mut("production")
        .unwrap()
        .worker_credentials = true;
    ssh.validate().unwrap();

    let mut order = StackSpec::default();
    let mut steps = order.worker_pools[0].clone();
    steps.name = "ci".into();
    let plain = &mut order.worker_pools[0];
    plain.jobs = false;
    plain.platform.insert("size".into(), "big".into());
    order.worker_pools.push(steps);
    let error = error_of(&order);
    assert!(
        error.contains("  worker_pools[1].jobs: pool `default`, listed before, does not run steps"),
        "{error}"
    );
    // Listed first, it is counted for what it can run, steps included.
    order.worker_pools.reverse();
    order.validate().unwrap();
}
