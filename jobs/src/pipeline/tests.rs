use super::*;

const EXAMPLE: &str = "\
steps:
  - key: lint
    commands: [\"./tools/lint.sh\"]
  - key: build
    commands:
      - bazel build //...
      - ls bazel-bin
    platform: { OSFamily: linux, runner: sandbox }
    env: { RUST_LOG: info, CC: clang }
    timeout_secs: 1800
    retry:
      worker_lost: 3
      exit_codes: { codes: [75, 143], limit: 2 }
    artifacts: [\"bazel-bin/pkg/*.tar\", \"logs/**/*.log\"]
  - key: test
    depends_on: [build, lint]
    commands: [\"bazel test //...\"]
";

fn parse_error(yaml: &str) -> PipelineError {
    match Pipeline::from_yaml(yaml) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e,
    }
}

/// The path, line and message of a parse error.
fn parse_failure(yaml: &str) -> (String, Option<usize>, String) {
    match parse_error(yaml) {
        PipelineError::Parse {
            path,
            location,
            message,
        } => (path, location.map(|l| l.line), message),
        other => panic!("not a parse error: {other}"),
    }
}

fn invalid(yaml: &str) -> (String, String) {
    match parse_error(yaml) {
        PipelineError::Invalid { path, message } => (path, message),
        other => panic!("not an invalid-pipeline error: {other}"),
    }
}

fn one_step(fields: &str) -> String {
    format!("steps:\n  - key: a\n    commands: [make]\n{fields}")
}

#[test]
fn pipeline_example_parses_with_its_values_and_defaults() {
    let pipeline = Pipeline::from_yaml(EXAMPLE).unwrap();
    let keys: Vec<&str> = pipeline.steps().iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["lint", "build", "test"]);

    let lint = pipeline.step("lint").unwrap();
    assert_eq!(lint.timeout_secs, limits::DEFAULT_TIMEOUT_SECS);
    assert_eq!(lint.retry, Retry::default());
    assert_eq!(lint.retry.worker_lost, 2);
    assert!(lint.platform.is_empty() && lint.env.is_empty() && lint.artifacts.is_empty());

    let build = pipeline.step("build").unwrap();
    let commands: Vec<&str> = build.commands.iter().map(|c| c.as_str()).collect();
    assert_eq!(commands, ["bazel build //...", "ls bazel-bin"]);
    let platform: Vec<(&str, &str)> = build
        .platform
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(platform, [("OSFamily", "linux"), ("runner", "sandbox")]);
    let env: Vec<(&str, &str)> = build
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env, [("CC", "clang"), ("RUST_LOG", "info")]);
    assert_eq!(build.timeout_secs, 1800);
    assert_eq!(build.retry.worker_lost, 3);
    let rule = build.retry.exit_codes.as_ref().unwrap();
    assert_eq!(
        rule.codes.iter().map(|c| c.get()).collect::<Vec<_>>(),
        [75, 143]
    );
    assert_eq!(rule.limit, 2);
    assert_eq!(build.artifacts.len(), 2);

    let test = pipeline.step("test").unwrap();
    let deps: Vec<&str> = test.depends_on.iter().map(|d| d.as_str()).collect();
    assert_eq!(deps, ["build", "lint"]);
    assert!(pipeline.step("deploy").is_none());
}

#[test]
fn pipeline_round_trips_through_yaml() {
    let pipeline = Pipeline::from_yaml(EXAMPLE).unwrap();
    let again = Pipeline::from_yaml(&pipeline.to_yaml()).unwrap();
    assert_eq!(again, pipeline);
    // Defaults are written out, so what runs is visible in the stored copy.
    assert!(pipeline.to_yaml().contains("timeout_secs: 3600"));
}

#[test]
fn pipeline_unknown_field_names_its_path_line_and_the_known_fields() {
    let (path, line, message) = parse_failure(
        "steps:\n  - key: a\n    commands: [make]\n  - key: b\n    commands: [make]\n    timeout: 60\n",
    );
    assert_eq!(path, "steps[1].timeout");
    assert_eq!(line, Some(6));
    assert!(
        message.contains("unknown field `timeout`") && message.contains("timeout_secs"),
        "{message}"
    );
    let (path, line, message) = parse_failure("stages: []\n");
    assert_eq!((path.as_str(), line), ("stages", Some(1)));
    assert!(message.contains("steps"), "{message}");
}

#[test]
fn pipeline_wrong_types_and_missing_fields_name_their_path_and_line() {
    let (path, line, message) = parse_failure(&one_step("    timeout_secs: soon\n"));
    assert_eq!((path.as_str(), line), ("steps[0].timeout_secs", Some(4)));
    assert!(message.contains("invalid type"), "{message}");

    let (path, line, message) = parse_failure("steps:\n  - key: a\n    env: {A: b}\n");
    assert_eq!((path.as_str(), line), ("steps[0]", Some(2)));
    assert!(message.contains("missing field `commands`"), "{message}");

    let (path, _, message) = parse_failure("steps:\n  - key: a\n    commands: make\n");
    assert_eq!(path, "steps[0].commands");
    assert!(message.contains("a list of 1 to 64 entries"), "{message}");

    let (path, line, message) = parse_failure("steps: [\n");
    assert!(line.is_some(), "{path}: {message}");

    // The whole error reads as one line naming the file.
    let text = parse_error(&one_step("    timeout_secs: soon\n")).to_string();
    assert!(
        text.starts_with(".buildkube/pipeline.yaml: steps[0].timeout_secs at line 4, column "),
        "{text}"
    );
}

#[test]
fn pipeline_commands_must_be_present_and_not_blank() {
    let (path, _, message) = parse_failure("steps:\n  - key: a\n    commands: []\n");
    assert_eq!(path, "steps[0].commands");
    assert!(message.contains("at least 1"), "{message}");
    let (path, line, message) = parse_failure("steps:\n  - key: a\n    commands: [make, '  ']\n");
    assert_eq!((path.as_str(), line), ("steps[0].commands[1]", Some(3)));
    assert!(message.contains("empty"), "{message}");
    let (path, _, message) = parse_failure("steps: []\n");
    assert_eq!(path, "steps");
    assert!(message.contains("at least 1"), "{message}");
}

#[test]
fn pipeline_step_keys_are_checked_and_unique() {
    let (path, _, message) = parse_failure("steps:\n  - key: 'build all'\n    commands: [make]\n");
    assert_eq!(path, "steps[0].key");
    assert!(message.contains("letters, digits"), "{message}");
    let (path, _, _) = parse_failure("steps:\n  - key: '-x'\n    commands: [make]\n");
    assert_eq!(path, "steps[0].key");
    let long = "k".repeat(limits::MAX_KEY_BYTES + 1);
    let (path, _, message) =
        parse_failure(&format!("steps:\n  - key: {long}\n    commands: [make]\n"));
    assert_eq!(path, "steps[0].key");
    assert!(message.contains("limit of 64"), "{message}");

    let (path, message) = invalid(
        "steps:\n  - key: a\n    commands: [make]\n  - key: b\n    commands: [make]\n  - key: a\n    commands: [make]\n",
    );
    assert_eq!(path, "steps[2].key");
    assert_eq!(message, "\"a\" is also the key of steps[0]");
}

#[test]
fn pipeline_depends_on_must_name_other_steps_once() {
    let (path, message) = invalid(
        "steps:\n  - key: build\n    commands: [make]\n  - key: test\n    commands: [make]\n    depends_on: [build, biuld]\n",
    );
    assert_eq!(path, "steps[1].depends_on[1]");
    assert_eq!(
        message,
        "\"biuld\" names no step; the steps are build, test"
    );
    let (path, message) = invalid(
        "steps:\n  - key: build\n    commands: [make]\n  - key: test\n    commands: [make]\n    depends_on: [build, build]\n",
    );
    assert_eq!(path, "steps[1].depends_on[1]");
    assert!(message.contains("twice"), "{message}");
}

#[test]
fn pipeline_cycles_are_named_step_by_step() {
    let error = parse_error(
        "steps:\n  - key: a\n    commands: [x]\n    depends_on: [c]\n  - key: b\n    commands: [x]\n    depends_on: [a]\n  - key: c\n    commands: [x]\n    depends_on: [b]\n  - key: d\n    commands: [x]\n",
    );
    assert_eq!(
        error,
        PipelineError::Cycle {
            cycle: vec!["a".into(), "c".into(), "b".into(), "a".into()]
        }
    );
    assert_eq!(
        error.to_string(),
        ".buildkube/pipeline.yaml: steps depend on each other in a cycle: a -> c -> b -> a"
    );
    let error = parse_error("steps:\n  - key: a\n    commands: [x]\n    depends_on: [a]\n");
    assert_eq!(
        error,
        PipelineError::Cycle {
            cycle: vec!["a".into(), "a".into()]
        }
    );
}

#[test]
fn pipeline_topological_order_puts_dependencies_first_then_file_order() {
    let pipeline = Pipeline::from_yaml(EXAMPLE).unwrap();
    let order: Vec<&str> = pipeline
        .topological_order()
        .iter()
        .map(|s| s.key.as_str())
        .collect();
    assert_eq!(order, ["lint", "build", "test"]);

    // deploy (first in the file) waits for test, which waits for build.
    let pipeline = Pipeline::from_yaml(
        "steps:\n  - key: deploy\n    commands: [x]\n    depends_on: [test]\n  - key: test\n    commands: [x]\n    depends_on: [build]\n  - key: docs\n    commands: [x]\n  - key: build\n    commands: [x]\n",
    )
    .unwrap();
    let order: Vec<&str> = pipeline
        .topological_order()
        .iter()
        .map(|s| s.key.as_str())
        .collect();
    assert_eq!(order, ["docs", "build", "test", "deploy"]);
}

#[test]
fn pipeline_of_the_most_steps_in_one_chain_is_ordered_and_a_closed_chain_is_a_cycle() {
    let n = limits::MAX_STEPS;
    let mut yaml = String::from("steps:\n");
    for i in 0..n {
        yaml.push_str(&format!("  - key: s{i}\n    commands: [x]\n"));
        if i > 0 {
            yaml.push_str(&format!("    depends_on: [s{}]\n", i - 1));
        }
    }
    let pipeline = Pipeline::from_yaml(&yaml).unwrap();
    let order: Vec<String> = pipeline
        .topological_order()
        .iter()
        .map(|s| s.key.to_string())
        .collect();
    assert_eq!(order, (0..n).map(|i| format!("s{i}")).collect::<Vec<_>>());

    let closed = yaml.replacen(
        "  - key: s0\n    commands: [x]\n",
        &format!(
            "  - key: s0\n    commands: [x]\n    depends_on: [s{}]\n",
            n - 1
        ),
        1,
    );
    let PipelineError::Cycle { cycle } = parse_error(&closed) else {
        panic!("no cycle found")
    };
    assert_eq!(cycle.len(), n + 1);
    assert_eq!(cycle.first(), cycle.last());
}

#[test]
fn pipeline_sizes_are_bounded() {
    let mut yaml = String::from("steps:\n");
    for i in 0..=limits::MAX_STEPS {
        yaml.push_str(&format!("  - {{key: s{i}, commands: [x]}}\n"));
    }
    let (path, line, message) = parse_failure(&yaml);
    assert_eq!(path, "steps");
    assert!(line.is_some());
    assert!(message.contains("limit of 100"), "{message}");

    let commands = vec!["x"; limits::MAX_COMMANDS + 1].join(", ");
    let (path, _, message) =
        parse_failure(&format!("steps:\n  - key: a\n    commands: [{commands}]\n"));
    assert_eq!(path, "steps[0].commands");
    assert!(message.contains("limit of 64"), "{message}");

    let long = "y".repeat(limits::MAX_COMMAND_BYTES + 1);
    let (path, _, message) =
        parse_failure(&format!("steps:\n  - key: a\n    commands: [{long}]\n"));
    assert_eq!(path, "steps[0].commands[0]");
    assert!(message.contains("16385 bytes"), "{message}");

    let env: Vec<String> = (0..=limits::MAX_ENV_VARS)
        .map(|i| format!("V{i}: x"))
        .collect();
    let (path, _, message) =
        parse_failure(&one_step(&format!("    env: {{{}}}\n", env.join(", "))));
    assert_eq!(path, "steps[0].env");
    assert!(message.contains("limit of 64"), "{message}");

    let value = "v".repeat(limits::MAX_ENV_VALUE_BYTES + 1);
    let (path, _, _) = parse_failure(&one_step(&format!("    env: {{A: {value}}}\n")));
    assert_eq!(path, "steps[0].env.A");

    let big = "#".repeat(limits::MAX_PIPELINE_FILE_BYTES + 1);
    assert!(matches!(
        Pipeline::from_yaml(&big),
        Err(PipelineError::TooLarge { max, .. }) if max == limits::MAX_PIPELINE_FILE_BYTES
    ));
}

#[test]
fn pipeline_yaml_aliases_cannot_expand_past_the_text_budget() {
    // One 16 KiB command, then an alias of it in every slot of every step:
    // 30 KiB of YAML that would hold 100 MiB of commands.
    let command = "z".repeat(limits::MAX_COMMAND_BYTES);
    let rest = vec!["*c"; limits::MAX_COMMANDS - 1].join(", ");
    let mut yaml = String::from("steps:\n");
    for i in 0..limits::MAX_STEPS {
        let first = if i == 0 {
            format!("&c {command}")
        } else {
            "*c".into()
        };
        yaml.push_str(&format!("  - {{key: s{i}, commands: [{first}, {rest}]}}\n"));
    }
    assert!(yaml.len() < limits::MAX_PIPELINE_FILE_BYTES);
    let (path, _, message) = parse_failure(&yaml);
    // 1 MiB holds 64 such commands but for the key "s0" beside them: the
    // first step's last command is one too many.
    assert_eq!(path, "steps[0].commands[63]");
    assert!(
        message.contains("more than 1048576 bytes of text"),
        "{message}"
    );
    // The budget is per parse: the same text parses again up to the same point.
    assert_eq!(parse_failure(&yaml).0, "steps[0].commands[63]");
}

#[test]
fn pipeline_numbers_are_within_their_ranges() {
    for (fields, path) in [
        ("    timeout_secs: 0\n", "steps[0].timeout_secs"),
        ("    timeout_secs: 86401\n", "steps[0].timeout_secs"),
        (
            "    retry: {worker_lost: 11}\n",
            "steps[0].retry.worker_lost",
        ),
        (
            "    retry: {exit_codes: {codes: [3], limit: 0}}\n",
            "steps[0].retry.exit_codes.limit",
        ),
        (
            "    retry: {exit_codes: {codes: [0], limit: 1}}\n",
            "steps[0].retry.exit_codes.codes[0]",
        ),
        (
            "    retry: {exit_codes: {codes: [256], limit: 1}}\n",
            "steps[0].retry.exit_codes.codes[0]",
        ),
        (
            "    retry: {exit_codes: {codes: [], limit: 1}}\n",
            "steps[0].retry.exit_codes.codes",
        ),
    ] {
        let (got, line, message) = parse_failure(&one_step(fields));
        assert_eq!(got, path, "{fields}: {message}");
        assert_eq!(line, Some(4), "{fields}: {message}");
    }
    let pipeline = Pipeline::from_yaml(&one_step("    timeout_secs: 86400\n")).unwrap();
    assert_eq!(pipeline.steps()[0].timeout_secs, limits::MAX_TIMEOUT_SECS);
}

#[test]
fn pipeline_env_names_are_checked_and_the_farm_prefix_is_reserved() {
    for (env, needle) in [
        ("{1A: x}", "must be a letter"),
        ("{A-B: x}", "must be a letter"),
        ("{BUILDKUBE_JOB: x}", "set by the farm"),
        ("{A: x, A: y}", "given twice"),
    ] {
        let (path, _, message) = parse_failure(&one_step(&format!("    env: {env}\n")));
        assert!(path.starts_with("steps[0].env"), "{env}: {path}");
        assert!(message.contains(needle), "{env}: {message}");
    }
    let pipeline = Pipeline::from_yaml(&one_step("    env: {_A1: '', b: \"x=y\"}\n")).unwrap();
    assert_eq!(pipeline.steps()[0].env.len(), 2);
}

#[test]
fn pipeline_artifact_globs_stay_relative_and_compile() {
    for (glob, needle) in [
        ("/etc/passwd", "absolute"),
        ("../up/*.tar", "'..'"),
        ("out/../../x", "'..'"),
        ("out//x", "empty path component"),
        ("out/[a", "unclosed character class"),
        ("out/{a,b", "unclosed alternate group"),
    ] {
        let (path, _, message) = parse_failure(&one_step(&format!("    artifacts: ['{glob}']\n")));
        assert_eq!(path, "steps[0].artifacts[0]", "{glob}");
        assert!(message.contains(needle), "{glob}: {message}");
    }
}

#[test]
fn pipeline_artifact_matcher_keeps_star_within_a_directory() {
    let pipeline = Pipeline::from_yaml(&one_step(
        "    artifacts: ['out/*.tar', 'logs/**/*.log', 'report.{xml,json}']\n",
    ))
    .unwrap();
    let matcher = pipeline.steps()[0].artifact_matcher();
    for path in [
        "out/a.tar",
        "logs/x.log",
        "logs/a/b/c.log",
        "report.xml",
        "report.json",
    ] {
        assert!(matcher.is_match(path), "{path}");
    }
    for path in ["out/sub/a.tar", "a.tar", "logs/x.txt", "report.txt"] {
        assert!(!matcher.is_match(path), "{path}");
    }
}

#[test]
fn pipeline_from_bytes_refuses_non_text() {
    let mut bytes = b"steps:\n  - key: a\n    commands: [make]\n".to_vec();
    assert!(Pipeline::from_bytes(&bytes).is_ok());
    bytes.insert(10, 0xff);
    assert_eq!(
        Pipeline::from_bytes(&bytes),
        Err(PipelineError::NotText { offset: 10 })
    );
}

#[test]
fn pipeline_retry_allows_reruns_by_kind_of_failure() {
    let pipeline = Pipeline::from_yaml(EXAMPLE).unwrap();
    let retry = &pipeline.step("build").unwrap().retry;
    assert_eq!(retry.reruns_allowed(AttemptFailure::WorkerLost), 3);
    assert_eq!(retry.reruns_allowed(AttemptFailure::Exited(75)), 2);
    assert_eq!(retry.reruns_allowed(AttemptFailure::Exited(143)), 2);
    assert_eq!(retry.reruns_allowed(AttemptFailure::Exited(1)), 0);
    assert_eq!(retry.reruns_allowed(AttemptFailure::Exited(75 + 256)), 0);
    assert_eq!(retry.reruns_allowed(AttemptFailure::TimedOut), 0);
    assert_eq!(retry.reruns_allowed(AttemptFailure::Cancelled), 0);
    let lint = &pipeline.step("lint").unwrap().retry;
    assert_eq!(lint.reruns_allowed(AttemptFailure::Exited(75)), 0);
    assert_eq!(lint.reruns_allowed(AttemptFailure::WorkerLost), 2);
}

#[test]
fn pipeline_built_in_code_gets_the_same_checks() {
    let step = |key: &str, deps: &[&str]| Step {
        key: StepKey::try_from(key).unwrap(),
        commands: BoundedVec::new(vec![ShellCommand::try_from("make").unwrap()]).unwrap(),
        platform: Default::default(),
        env: Default::default(),
        timeout_secs: 60,
        retry: Retry::default(),
        artifacts: Default::default(),
        depends_on: BoundedVec::new(
            deps.iter()
                .map(|d| StepKey::try_from(*d).unwrap())
                .collect(),
        )
        .unwrap(),
    };
    assert!(Pipeline::new(vec![step("a", &[]), step("b", &["a"])]).is_ok());
    assert!(matches!(
        Pipeline::new(vec![step("a", &["b"]), step("b", &["a"])]),
        Err(PipelineError::Cycle { .. })
    ));
    let mut slow = step("a", &[]);
    slow.timeout_secs = limits::MAX_TIMEOUT_SECS + 1;
    assert_eq!(
        Pipeline::new(vec![slow]),
        Err(PipelineError::Invalid {
            path: "steps[0].timeout_secs".into(),
            message: "86401 is out of range: 1 to 86400".into()
        })
    );
    assert!(matches!(
        Pipeline::new(vec![]),
        Err(PipelineError::Invalid { path, .. }) if path == "steps"
    ));
    assert!(StepKey::try_from("a b").is_err());
    assert!(ArtifactGlob::try_from("../x").is_err());
}
/// What a user reads for each kind of mistake, one line each.
#[test]
fn pipeline_error_messages_snapshot() {
    let cases = [
        one_step("    timeout: 60\n"),
        "steps:\n  - key: a\n    env: {A: b}\n".into(),
        "steps: [\n".into(),
        "- a\n".into(),
        one_step("    timeout_secs: 0\n"),
        one_step("    env: {A: x, A: y}\n"),
        one_step("    env: {BUILDKUBE_TOKEN: x}\n"),
        one_step("    artifacts: ['out/[a']\n"),
        one_step("    artifacts: ['../secrets']\n"),
        one_step("    retry: {exit_codes: {codes: [300], limit: 1}}\n"),
        one_step("    depends_on: [b]\n"),
        "steps:\n  - {key: a, commands: [x], depends_on: [b]}\n  - {key: b, commands: [x], depends_on: [a]}\n".into(),
    ];
    let report: Vec<String> = cases
        .iter()
        .map(|yaml| format!("{yaml}=> {}\n", parse_error(yaml)))
        .collect();
    insta::assert_snapshot!(report.join("\n"));
}
