//! Specs that cannot be deployed are rejected with a message naming the field.

use manifests_gen::spec::StackSpec;

use crate::insta_settings;

/// The default spec as YAML, with `edit` applied to its text.
fn default_yaml_with(edit: impl FnOnce(&mut serde_yaml::Value)) -> String {
    let mut value = serde_yaml::to_value(StackSpec::default()).unwrap();
    edit(&mut value);
    serde_yaml::to_string(&value).unwrap()
}

fn error_of(yaml: &str) -> String {
    StackSpec::from_yaml("stack.yaml", yaml)
        .expect_err("the spec must be rejected")
        .to_string()
}

fn pool(value: &mut serde_yaml::Value) -> &mut serde_yaml::Value {
    &mut value["worker_pools"][0]
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let yaml = default_yaml_with(|v| {
        pool(v)
            .as_mapping_mut()
            .unwrap()
            .insert("replica".into(), 3.into());
    });
    let error = error_of(&yaml);
    assert!(
        error.contains("worker_pools[0]") && error.contains("unknown field `replica`"),
        "{error}"
    );
    insta_settings().bind(|| insta::assert_snapshot!("error-unknown-field", error));
}

#[test]
fn impossible_specs_name_every_bad_field() {
    let yaml = default_yaml_with(|v| {
        pool(v)["autoscaling"]["min_replicas"] = 30.into();
        pool(v)["platform"]["runner"] = "docker".into();
        pool(v)["instance"] = "ci".into();
        v["instances"][0] = "main/blobs".into();
        v["overlays"]["example"]["images"]["registry"] = "GHCR.io/Acme".into();
        v["overlays"]["example"]["images"]["tag"] = "latest".into();
        v["overlays"]["kind"]["worker_replicas"]["gpu"] = 1.into();
        v["server"]["cas_max_size"] = "200GiB".into();
    });
    let error = error_of(&yaml);
    for field in [
        "worker_pools[0].autoscaling.min_replicas",
        "worker_pools[0].platform.runner",
        "worker_pools[0].instance",
        "instances[0]",
        "overlays.example.images.registry",
        "overlays.example.images.tag",
        "overlays.kind.worker_replicas.gpu",
        "server.cas_max_size",
    ] {
        assert!(
            error.contains(&format!("  {field}: ")),
            "{field} not named in:\n{error}"
        );
    }
    insta_settings().bind(|| insta::assert_snapshot!("error-impossible-spec", error));
}

#[test]
fn a_pool_without_a_runner_is_rejected() {
    let yaml = default_yaml_with(|v| {
        pool(v)["platform"]
            .as_mapping_mut()
            .unwrap()
            .remove("runner");
    });
    let error = error_of(&yaml);
    assert!(
        error.contains("worker_pools[0].platform: no `runner` property"),
        "{error}"
    );
}

#[test]
fn the_binary_reports_the_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stack.yaml");
    std::fs::write(
        &config,
        default_yaml_with(|v| pool(v)["concurrency"] = 0.into()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifests-gen"))
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("worker_pools[0].concurrency: must be at least 1"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists(), "nothing written");
}

/// Issue 4: a scale-down must never kill an action within its timeout, so a
/// drain shorter than the longest action is rejected, naming the field.
#[test]
fn issue_4_drain_shorter_than_the_longest_action_is_rejected() {
    let yaml = default_yaml_with(|v| {
        pool(v)["max_action_timeout_secs"] = 7200.into();
    });
    let error = error_of(&yaml);
    assert!(
        error.contains(
            "worker_pools[0].drain_timeout_secs: 3900 is less than max_action_timeout_secs 7200"
        ),
        "{error}"
    );
    insta_settings().bind(|| insta::assert_snapshot!("error-drain-shorter-than-action", error));
}

#[test]
fn scale_down_pace_and_limits_name_their_fields() {
    let yaml = default_yaml_with(|v| {
        pool(v)["autoscaling"]["scale_down_max_pods"] = 0.into();
        pool(v)["autoscaling"]["scale_down_period_secs"] = 0.into();
        pool(v)["autoscaling"]["scale_down_stabilization_secs"] = 7200.into();
        pool(v)["max_stdio_size"] = "lots".into();
    });
    let error = error_of(&yaml);
    for field in [
        "worker_pools[0].autoscaling.scale_down_max_pods",
        "worker_pools[0].autoscaling.scale_down_period_secs",
        "worker_pools[0].autoscaling.scale_down_stabilization_secs",
        "worker_pools[0].max_stdio_size",
    ] {
        assert!(
            error.contains(&format!("  {field}: ")),
            "{field} not named in:\n{error}"
        );
    }
}

/// A pool whose every platform an earlier pool of its instance can run would
/// get no load counted, so it would never scale: rejected.
#[test]
fn a_pool_shadowed_by_an_earlier_one_is_rejected() {
    let yaml = default_yaml_with(|v| {
        let mut twin = pool(v).clone();
        twin["name"] = "twin".into();
        v["worker_pools"].as_sequence_mut().unwrap().push(twin);
    });
    let error = error_of(&yaml);
    assert!(
        error.contains("worker_pools[1].platform: pool `default`, listed before, offers all of it"),
        "{error}"
    );
}

/// Issue 7: a work directory must hold the cache and every running action's
/// outputs and stdio at their limits, in the pool and in an overlay's sizes,
/// or a full disk evicts the pod with every action on it.
#[test]
fn issue_7_a_work_dir_smaller_than_its_actions_is_rejected() {
    let yaml = default_yaml_with(|v| {
        pool(v)["max_output_size"] = "16GiB".into();
        v["overlays"]["kind"]["pool_sizes"]["default"]["work_dir_size"] = "6Gi".into();
    });
    let error = error_of(&yaml);
    assert!(
        error.contains(
            "  worker_pools[0].work_dir_size: 40Gi is less than cache_max_size 10GiB + \
             concurrency 4 × (max_output_size 16GiB + 2 × max_stdio_size 256MiB) = 76GiB"
        ),
        "{error}"
    );
    assert!(
        error.contains("  overlays.kind.pool_sizes.default.work_dir_size: 6Gi is less than"),
        "{error}"
    );
}

/// Issue 7: credentials reach only pools that opt in; an overlay that
/// generates them for no pool is rejected.
#[test]
fn issue_7_worker_credentials_without_an_opted_in_pool_are_rejected() {
    let yaml = default_yaml_with(|v| {
        v["overlays"]["example"]["worker_credentials"] = true.into();
    });
    let error = error_of(&yaml);
    assert!(
        error
            .contains("  overlays.example.worker_credentials: no worker pool sets git_credentials"),
        "{error}"
    );
    let yaml = default_yaml_with(|v| {
        v["overlays"]["example"]["worker_credentials"] = true.into();
        pool(v)["git_credentials"] = true.into();
    });
    StackSpec::from_yaml("stack.yaml", &yaml).unwrap();
}
