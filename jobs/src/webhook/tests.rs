use std::io::Write;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::*;

const GITHUB_PUSH: &str = include_str!("testdata/github-push.json");
const GITHUB_PULL_REQUEST: &str = include_str!("testdata/github-pull-request.json");
const GITLAB_PUSH: &str = include_str!("testdata/gitlab-push.json");

fn secrets(list: &[&str]) -> WebhookSecrets {
    WebhookSecrets::new(list.iter().map(|s| s.as_bytes().to_vec()).collect()).unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            )
        })
        .collect()
}

/// Headers of a GitHub delivery of `event` signed with `secret`.
fn github_headers(event: &str, secret: &str, body: &str) -> HeaderMap {
    let signature = secrets(&[secret]).github_signature(body.as_bytes());
    headers(&[
        ("X-GitHub-Event", event),
        ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ("X-Hub-Signature-256", &signature),
        ("Content-Type", "application/json"),
    ])
}

fn run(outcome: Result<WebhookOutcome, WebhookError>) -> Trigger {
    match outcome {
        Ok(WebhookOutcome::Run(trigger)) => trigger,
        other => panic!("no run: {other:?}"),
    }
}

fn ignored_reason(outcome: Result<WebhookOutcome, WebhookError>) -> String {
    match outcome {
        Ok(WebhookOutcome::Ignored { reason, .. }) => reason,
        other => panic!("not ignored: {other:?}"),
    }
}

fn json_with(base: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value: serde_json::Value = serde_json::from_str(base).unwrap();
    edit(&mut value);
    value.to_string()
}

#[test]
fn webhook_signature_matches_githubs_published_test_vector() {
    // From GitHub's "Validating webhook deliveries".
    let secrets = secrets(&["It's a Secret to Everybody"]);
    let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    assert_eq!(secrets.github_signature(b"Hello, World!"), expected);
    let endpoint = GitHubWebhook::new(secrets);
    let outcome = endpoint.receive(
        &headers(&[
            ("X-GitHub-Event", "ping"),
            ("X-Hub-Signature-256", expected),
        ]),
        b"Hello, World!",
    );
    assert_eq!(ignored_reason(outcome), "GitHub's test delivery");
}

#[test]
fn webhook_github_push_runs_the_pushed_commit() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"]));
    let trigger = run(endpoint.receive(
        &github_headers("push", "s3cret", GITHUB_PUSH),
        GITHUB_PUSH.as_bytes(),
    ));
    assert_eq!(
        trigger,
        Trigger {
            provider: Provider::GitHub,
            event: TriggerEvent::Push,
            repository: RepositoryUrls {
                name: "buildkube-test/farm-demo".into(),
                https: "https://github.com/buildkube-test/farm-demo.git".into(),
                ssh: "git@github.com:buildkube-test/farm-demo.git".into(),
            },
            git_ref: GitRef::try_from("refs/heads/main".to_string()).unwrap(),
            commit: CommitSha::try_from("0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c".to_string())
                .unwrap(),
            delivery: Some("72d3162e-cc78-11e3-81ab-4c9367dc0958".into()),
        }
    );
    assert_eq!(trigger.git_ref.branch(), Some("main"));
}

#[test]
fn webhook_github_push_deleting_a_branch_runs_nothing() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"]));
    let body = json_with(GITHUB_PUSH, |v| {
        v["deleted"] = true.into();
        v["after"] = "0000000000000000000000000000000000000000".into();
        v["head_commit"] = serde_json::Value::Null;
    });
    let outcome = endpoint.receive(&github_headers("push", "s3cret", &body), body.as_bytes());
    assert_eq!(ignored_reason(outcome), "the ref was deleted");
}

#[test]
fn webhook_github_pull_request_runs_its_head_from_the_base_repository() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"]));
    let trigger = run(endpoint.receive(
        &github_headers("pull_request", "s3cret", GITHUB_PULL_REQUEST),
        GITHUB_PULL_REQUEST.as_bytes(),
    ));
    assert_eq!(
        trigger.event,
        TriggerEvent::PullRequest {
            number: 7,
            action: "synchronize".into(),
            base_branch: "main".into(),
        }
    );
    // The head is in a fork; the base repository serves it as refs/pull/7/head.
    assert_eq!(trigger.repository.name, "buildkube-test/farm-demo");
    assert_eq!(trigger.git_ref.as_str(), "refs/pull/7/head");
    assert_eq!(trigger.git_ref.branch(), None);
    assert_eq!(
        trigger.commit.as_str(),
        "c4295bd74fb0f4d5b6b2bf8e1c3f1b5b5ad1d43a"
    );

    for action in ["opened", "reopened"] {
        let body = json_with(GITHUB_PULL_REQUEST, |v| v["action"] = action.into());
        let outcome = endpoint.receive(
            &github_headers("pull_request", "s3cret", &body),
            body.as_bytes(),
        );
        assert!(matches!(outcome, Ok(WebhookOutcome::Run(_))), "{action}");
    }
    for action in ["closed", "labeled", "edited"] {
        let body = json_with(GITHUB_PULL_REQUEST, |v| v["action"] = action.into());
        let reason = ignored_reason(endpoint.receive(
            &github_headers("pull_request", "s3cret", &body),
            body.as_bytes(),
        ));
        assert!(reason.contains(action), "{reason}");
    }
}

#[test]
fn webhook_github_other_events_run_nothing() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"]));
    let body = r#"{"action":"created"}"#;
    let reason = ignored_reason(endpoint.receive(
        &github_headers("issue_comment", "s3cret", body),
        body.as_bytes(),
    ));
    assert!(reason.contains("push and pull_request"), "{reason}");
}

#[test]
fn webhook_github_bad_or_missing_signature_is_unauthenticated_before_parsing() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"]));
    let body = GITHUB_PUSH.as_bytes();
    let good = secrets(&["s3cret"]).github_signature(body);
    let other_secret = secrets(&["guess"]).github_signature(body);
    let other_body = secrets(&["s3cret"]).github_signature(b"{}");
    let cases: [(Option<String>, &str); 7] = [
        (None, "X-Hub-Signature-256 is missing"),
        (
            Some(good.replacen("sha256=", "sha1=", 1)),
            "does not start with sha256=",
        ),
        (Some(good.to_uppercase()), "does not start with sha256="),
        (
            Some(good[..good.len() - 2].to_string()),
            "not 64 hex digits",
        ),
        (
            Some(format!("{}zz", &good[..good.len() - 2])),
            "not 64 hex digits",
        ),
        (Some(other_secret), "matches no webhook secret"),
        (Some(other_body), "matches no webhook secret"),
    ];
    for (signature, message) in cases {
        let mut headers = headers(&[("X-GitHub-Event", "push")]);
        if let Some(signature) = &signature {
            headers.insert("x-hub-signature-256", signature.parse().unwrap());
        }
        let error = endpoint.receive(&headers, body).unwrap_err();
        assert!(error.is_unauthenticated(), "{signature:?}: {error}");
        assert_eq!(error.status(), StatusCode::UNAUTHORIZED, "{signature:?}");
        assert!(
            error.to_string().contains(message),
            "{signature:?}: {error}"
        );
    }
    // A body that is not even JSON is refused for its signature, not its shape.
    let error = endpoint
        .receive(&github_headers("push", "guess", "not json"), b"not json")
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::UNAUTHORIZED, "{error}");
    // The hex digits may be upper case; only the body and secret matter.
    let upper = format!("sha256={}", good["sha256=".len()..].to_uppercase());
    let headers = headers(&[("x-github-event", "push"), ("X-HUB-SIGNATURE-256", &upper)]);
    assert!(matches!(
        endpoint.receive(&headers, body),
        Ok(WebhookOutcome::Run(_))
    ));
}

#[test]
fn webhook_secrets_file_lists_every_accepted_secret_for_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("github-webhook-secret");
    std::fs::write(&path, "new secret with spaces\n\nold-secret\r\n").unwrap();
    let secrets = WebhookSecrets::from_file(&path).unwrap();
    assert_eq!(secrets.len(), 2);
    assert_eq!(format!("{secrets:?}"), "WebhookSecrets(2 redacted)");
    let endpoint = GitHubWebhook::new(secrets);
    for secret in ["new secret with spaces", "old-secret"] {
        let headers = github_headers("push", secret, GITHUB_PUSH);
        assert!(
            matches!(
                endpoint.receive(&headers, GITHUB_PUSH.as_bytes()),
                Ok(WebhookOutcome::Run(_))
            ),
            "{secret}"
        );
    }
    for secret in ["new secret with spaces\n", "old-secret\r", "retired"] {
        let headers = github_headers("push", secret, GITHUB_PUSH);
        let error = endpoint
            .receive(&headers, GITHUB_PUSH.as_bytes())
            .unwrap_err();
        assert!(error.is_unauthenticated(), "{secret:?}");
    }
}

#[test]
fn webhook_secrets_file_that_is_empty_missing_or_huge_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    for text in ["", "\n", "  \n\t\n"] {
        std::fs::write(&path, text).unwrap();
        let error = WebhookSecrets::from_file(&path).unwrap_err();
        assert!(
            matches!(error, SecretsFileError::Empty { .. }),
            "{text:?}: {error}"
        );
        assert!(error.to_string().contains(&path.display().to_string()));
    }
    let error = WebhookSecrets::from_file(&dir.path().join("absent")).unwrap_err();
    assert!(matches!(error, SecretsFileError::Read { .. }), "{error}");
    let mut file = std::fs::File::create(&path).unwrap();
    for i in 0..=MAX_SECRETS {
        writeln!(file, "secret-{i}").unwrap();
    }
    let error = WebhookSecrets::from_file(&path).unwrap_err();
    assert!(
        matches!(error, SecretsFileError::TooLarge { .. }),
        "{error}"
    );
    std::fs::write(&path, "x".repeat(MAX_SECRETS_FILE_BYTES as usize + 1)).unwrap();
    assert!(matches!(
        WebhookSecrets::from_file(&path),
        Err(SecretsFileError::TooLarge { .. })
    ));
    assert!(WebhookSecrets::new(vec![]).is_none());
    assert!(WebhookSecrets::new(vec![b"ok".to_vec(), b" ".to_vec()]).is_none());
}

#[test]
fn webhook_body_over_the_limit_is_refused_before_anything_else() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"])).with_max_body_bytes(1000);
    assert_eq!(endpoint.max_body_bytes(), 1000);
    let body = "x".repeat(1001);
    let error = endpoint
        .receive(&HeaderMap::new(), body.as_bytes())
        .unwrap_err();
    assert_eq!(
        error,
        WebhookError::BodyTooLarge {
            size: 1001,
            max: 1000
        }
    );
    assert_eq!(error.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let endpoint = GitLabWebhook::new(secrets(&["s3cret"])).with_max_body_bytes(1000);
    let error = endpoint
        .receive(&HeaderMap::new(), body.as_bytes())
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        GitLabWebhook::new(secrets(&["s"])).max_body_bytes(),
        DEFAULT_MAX_BODY_BYTES
    );
}

#[test]
fn webhook_payload_errors_name_the_field_and_are_bad_requests() {
    let endpoint = GitHubWebhook::new(secrets(&["s3cret"]));
    let cases: Vec<(String, &str, &str)> = vec![
        (
            json_with(GITHUB_PUSH, |v| {
                v.as_object_mut().unwrap().remove("after");
            }),
            "(top level)",
            "missing field `after`",
        ),
        (
            json_with(GITHUB_PUSH, |v| v["repository"]["clone_url"] = 7.into()),
            "repository.clone_url",
            "invalid type",
        ),
        (
            json_with(GITHUB_PUSH, |v| v["after"] = "HEAD".into()),
            "after",
            "not a commit id",
        ),
        (
            json_with(GITHUB_PUSH, |v| v["ref"] = "main".into()),
            "ref",
            "not a full ref",
        ),
        (
            json_with(GITHUB_PUSH, |v| v["ref"] = "refs/heads/a..b".into()),
            "ref",
            "not a valid git ref",
        ),
        (
            json_with(GITHUB_PUSH, |v| {
                v["repository"]["clone_url"] = "--upload-pack=touch /tmp/x".into()
            }),
            "repository.clone_url",
            "starts with '-'",
        ),
        (
            json_with(GITHUB_PUSH, |v| {
                v["repository"]["ssh_url"] = "https://github.com/a/b.git".into()
            }),
            "repository.ssh_url",
            "not an SSH URL",
        ),
    ];
    for (body, path, message) in cases {
        let error = endpoint
            .receive(&github_headers("push", "s3cret", &body), body.as_bytes())
            .unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{error}");
        assert!(!error.is_unauthenticated());
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("push payload: {path}: ")),
            "{text}"
        );
        assert!(text.contains(message), "{text}");
    }
    let mut headers = github_headers("push", "s3cret", GITHUB_PUSH);
    headers.remove("x-github-event");
    let error = endpoint
        .receive(&headers, GITHUB_PUSH.as_bytes())
        .unwrap_err();
    assert_eq!(error.to_string(), "X-GitHub-Event is missing");
    assert_eq!(error.status(), StatusCode::BAD_REQUEST);
}

fn gitlab_headers(event: &str, token: &str) -> HeaderMap {
    headers(&[
        ("X-Gitlab-Event", event),
        ("X-Gitlab-Token", token),
        (
            "X-Gitlab-Event-UUID",
            "13792a34-cac6-4fda-95a8-c58e00a3954e",
        ),
    ])
}

#[test]
fn webhook_gitlab_push_runs_the_checkout_sha() {
    let endpoint = GitLabWebhook::new(secrets(&["old-token", "gl-token"]));
    let trigger = run(endpoint.receive(
        &gitlab_headers("Push Hook", "gl-token"),
        GITLAB_PUSH.as_bytes(),
    ));
    assert_eq!(
        trigger,
        Trigger {
            provider: Provider::GitLab,
            event: TriggerEvent::Push,
            repository: RepositoryUrls {
                name: "platform/farm-demo".into(),
                https: "https://gitlab.example.com/platform/farm-demo.git".into(),
                ssh: "git@gitlab.example.com:platform/farm-demo.git".into(),
            },
            git_ref: GitRef::try_from("refs/heads/main".to_string()).unwrap(),
            commit: CommitSha::try_from("da1560886d4f094c3e6c9ef40349f7d38b5d27d7".to_string())
                .unwrap(),
            delivery: Some("13792a34-cac6-4fda-95a8-c58e00a3954e".into()),
        }
    );
    let tag = json_with(GITLAB_PUSH, |v| {
        v["object_kind"] = "tag_push".into();
        v["ref"] = "refs/tags/v1.0".into();
    });
    let trigger = run(endpoint.receive(
        &gitlab_headers("Tag Push Hook", "old-token"),
        tag.as_bytes(),
    ));
    assert_eq!(trigger.git_ref.as_str(), "refs/tags/v1.0");
}

#[test]
fn webhook_gitlab_missing_or_wrong_token_is_unauthenticated() {
    let endpoint = GitLabWebhook::new(secrets(&["gl-token"]));
    let body = GITLAB_PUSH.as_bytes();
    let error = endpoint
        .receive(&headers(&[("X-Gitlab-Event", "Push Hook")]), body)
        .unwrap_err();
    assert_eq!(error.to_string(), "X-Gitlab-Token is missing");
    assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
    for token in ["gl-toke", "gl-token ", "GL-TOKEN", "gl-token-and-more"] {
        let error = endpoint
            .receive(&gitlab_headers("Push Hook", token), body)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "X-Gitlab-Token matches no webhook secret"
        );
        assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
    }
    // Garbage with a wrong token is a 401, not a parse error.
    let error = endpoint
        .receive(&gitlab_headers("Push Hook", "nope"), b"\xff\xfe")
        .unwrap_err();
    assert!(error.is_unauthenticated());
}

#[test]
fn webhook_gitlab_deletions_and_other_hooks_run_nothing() {
    let endpoint = GitLabWebhook::new(secrets(&["gl-token"]));
    let deleted = json_with(GITLAB_PUSH, |v| {
        v["after"] = "0000000000000000000000000000000000000000".into();
        v["checkout_sha"] = serde_json::Value::Null;
    });
    let reason = ignored_reason(
        endpoint.receive(&gitlab_headers("Push Hook", "gl-token"), deleted.as_bytes()),
    );
    assert_eq!(reason, "the ref was deleted");
    let reason = ignored_reason(endpoint.receive(
        &gitlab_headers("Merge Request Hook", "gl-token"),
        br#"{"object_kind":"merge_request"}"#,
    ));
    assert!(reason.contains("push"), "{reason}");
    let mismatch = json_with(GITLAB_PUSH, |v| v["object_kind"] = "note".into());
    let error = endpoint
        .receive(
            &gitlab_headers("Push Hook", "gl-token"),
            mismatch.as_bytes(),
        )
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "Push Hook payload: object_kind: \"note\" is not push or tag_push"
    );
}

#[test]
fn webhook_refs_and_commit_ids_are_checked() {
    for good in [
        "refs/heads/main",
        "refs/tags/v1.2.3",
        "refs/heads/feature/x-y_z",
        "refs/pull/12/head",
    ] {
        assert!(GitRef::try_from(good.to_string()).is_ok(), "{good}");
    }
    for bad in [
        "main",
        "refs/heads/",
        "refs/heads/a..b",
        "refs/heads/.hidden",
        "refs/heads/x.lock",
        "refs/heads/a b",
        "refs/heads/a:b",
        "refs/heads/a@{1}",
        "refs/heads/x.",
        "refs//x",
        "-refs/heads/x",
    ] {
        assert!(GitRef::try_from(bad.to_string()).is_err(), "{bad}");
    }
    assert!(CommitSha::try_from("a".repeat(40)).is_ok());
    assert!(CommitSha::try_from("b".repeat(64)).is_ok());
    for bad in [
        "a".repeat(39),
        "A".repeat(40),
        "g".repeat(40),
        "0".repeat(40),
        String::new(),
    ] {
        assert!(CommitSha::try_from(bad.clone()).is_err(), "{bad}");
    }
}
