//! `execute-noop`, and what it shares with `dispatch`: building distinct
//! no-op actions and following one Execute stream to its result.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use buildkube_proto::longrunning::operation;
use buildkube_proto::reapi::execution_client::ExecutionClient;
use buildkube_proto::reapi::{
    self, command::EnvironmentVariable, platform::Property, Action, Command, Platform,
};
use buildkube_reapi::{AuthChannel, Digest};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use crate::load::{drive, timed, LoadPlan};
use crate::{note, rpc_error, ExecuteArgs, Outcome, Target, MAX_MESSAGE};

/// Action timeout set in every action (the worker's limit, not ours).
const ACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Actions per upload call while preparing.
const UPLOAD_CHUNK: usize = 2000;

pub(crate) fn execution_client(channel: AuthChannel) -> ExecutionClient<AuthChannel> {
    ExecutionClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

pub(crate) fn platform(properties: &[(String, String)]) -> Option<Platform> {
    if properties.is_empty() {
        return None;
    }
    let mut properties: Vec<Property> = properties
        .iter()
        .map(|(name, value)| Property {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    // The REAPI requires properties sorted by name, then value.
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    Some(Platform { properties })
}

/// The no-op command every action of a run shares.
// The platform goes in the Command too: servers before REAPI v2.2 read it there.
#[allow(deprecated)]
fn noop_command(arguments: &[String], properties: &[(String, String)]) -> Command {
    Command {
        arguments: arguments.to_vec(),
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        platform: platform(properties),
        ..Default::default()
    }
}

/// Action `index` of run `nonce`: distinct from every other by its salt, and
/// never cached.
fn noop_action(command: Digest, properties: &[(String, String)], nonce: u64, index: u64) -> Action {
    Action {
        command_digest: Some(command.to_proto()),
        // An empty Directory encodes to zero bytes: the input root is the empty blob.
        input_root_digest: Some(Digest::EMPTY.to_proto()),
        timeout: Some(prost_types::Duration {
            seconds: ACTION_TIMEOUT.as_secs() as i64,
            nanos: 0,
        }),
        do_not_cache: true,
        salt: Bytes::from(format!("reapi-bench {nonce:016x} {index}")),
        platform: platform(properties),
    }
}

/// Uploads the command and `count` distinct actions; returns the actions' digests by index.
pub(crate) async fn upload_noop_actions(
    target: &Target,
    args: &ExecuteArgs,
    count: u64,
    quiet: bool,
) -> anyhow::Result<Vec<Digest>> {
    ensure!(
        !args.command.is_empty(),
        "the command needs at least one --arg"
    );
    let nonce: u64 = rand::random();
    let command = noop_command(&args.command, &args.platform);
    let command_bytes = Bytes::from(command.encode_to_vec());
    let command_digest = Digest::of_bytes(&command_bytes);
    note(
        quiet,
        format_args!("uploading {count} distinct no-op actions"),
    );
    let actions: Vec<(Digest, Bytes)> = (0..count)
        .map(|index| {
            let bytes = Bytes::from(
                noop_action(command_digest, &args.platform, nonce, index).encode_to_vec(),
            );
            (Digest::of_bytes(&bytes), bytes)
        })
        .collect();
    let digests: Vec<Digest> = actions.iter().map(|(d, _)| *d).collect();
    target
        .cas(0)
        .upload_blob(command_digest, command_bytes)
        .await
        .context("uploading the no-op Command")?;
    futures::stream::iter(actions.chunks(UPLOAD_CHUNK).enumerate().map(|(n, chunk)| {
        let cas = target.cas(n as u64);
        let chunk = chunk.to_vec();
        async move {
            cas.upload_blobs(chunk)
                .await
                .context("uploading the no-op Actions")
        }
    }))
    .buffer_unordered(4)
    .try_for_each(|()| async { Ok(()) })
    .await?;
    Ok(digests)
}

/// The end of one Execute stream.
pub(crate) struct Executed {
    /// Name of the operation the server created (or merged into).
    pub(crate) operation_name: String,
    pub(crate) response: reapi::ExecuteResponse,
}

/// Calls Execute for `action` and follows the stream to its end; the result
/// must be a successful ExecuteResponse, and exactly one operation may be done.
pub(crate) async fn execute(
    mut client: ExecutionClient<AuthChannel>,
    instance: &str,
    action: Digest,
    skip_cache_lookup: bool,
) -> anyhow::Result<Executed> {
    let request = reapi::ExecuteRequest {
        instance_name: instance.to_string(),
        skip_cache_lookup,
        action_digest: Some(action.to_proto()),
        inline_stdout: true,
        inline_stderr: true,
        ..Default::default()
    };
    let mut stream = client
        .execute(request)
        .await
        .map_err(rpc_error(format_args!("Execute of action {action}")))?
        .into_inner();
    let mut done: Option<Executed> = None;
    while let Some(operation) = stream.next().await {
        let operation =
            operation.map_err(rpc_error(format_args!("Execute stream of action {action}")))?;
        if !operation.done {
            continue;
        }
        if let Some(first) = &done {
            bail!(
                "Execute stream of action {action} delivered a second finished operation ({} after {})",
                operation.name,
                first.operation_name
            );
        }
        let response = match operation.result {
            Some(operation::Result::Response(any)) => {
                reapi::ExecuteResponse::decode(any.value.as_slice()).with_context(|| {
                    format!(
                        "operation {} of action {action}: undecodable ExecuteResponse",
                        operation.name
                    )
                })?
            }
            Some(operation::Result::Error(status)) => bail!(
                "operation {} of action {action} failed: {:?}: {}",
                operation.name,
                tonic::Code::from(status.code),
                status.message
            ),
            None => bail!(
                "operation {} of action {action} is done without a result",
                operation.name
            ),
        };
        if let Some(status) = response.status.as_ref().filter(|s| s.code != 0) {
            bail!(
                "action {action} (operation {}) failed: {:?}: {}",
                operation.name,
                tonic::Code::from(status.code),
                status.message
            );
        }
        done = Some(Executed {
            operation_name: operation.name,
            response,
        });
    }
    done.with_context(|| {
        format!("Execute stream of action {action} ended before its operation was done")
    })
}

/// `execute-noop`: Execute distinct no-op actions on the endpoint's own workers.
pub(crate) async fn noop(
    target: &Target,
    plan: &LoadPlan,
    args: &ExecuteArgs,
) -> anyhow::Result<Outcome> {
    let actions = Arc::new(upload_noop_actions(target, args, plan.total(), plan.quiet).await?);
    let cached = Arc::new(AtomicU64::new(0));
    let cached_op = cached.clone();
    let target_for_ops = target.clone();
    let skip_cache_lookup = args.skip_cache_lookup;
    let timeout = Duration::from_secs_f64(args.action_timeout);
    let measured = drive(
        "execute-noop",
        plan,
        move |index| {
            let client = execution_client(target_for_ops.channel(index));
            let instance = target_for_ops.instance.clone();
            let action = actions[index as usize];
            let cached = cached_op.clone();
            timed(async move {
                let executed = tokio::time::timeout(
                    timeout,
                    execute(client, &instance, action, skip_cache_lookup),
                )
                .await
                .map_err(|_| {
                    anyhow::anyhow!("action {action}: no result within {timeout:?} (lost)")
                })??;
                if executed.response.cached_result {
                    cached.fetch_add(1, Ordering::Relaxed);
                }
                let exit_code = executed.response.result.as_ref().map(|r| r.exit_code);
                ensure!(
                    exit_code == Some(0),
                    "action {action} (operation {}) exited with {exit_code:?}: {}",
                    executed.operation_name,
                    executed.response.message
                );
                Ok(0)
            })
        },
        String::new,
    )
    .await;
    let mut params = BTreeMap::new();
    params.insert("command".into(), args.command.join(" ").into());
    params.insert("skip_cache_lookup".into(), args.skip_cache_lookup.into());
    let mut counters = BTreeMap::new();
    let cached = cached.load(Ordering::Relaxed);
    counters.insert("cached_results".into(), cached);
    let failures = if cached > 0 {
        vec![format!("{cached} no-op actions came from the cache although each was distinct and do_not_cache")]
    } else {
        Vec::new()
    };
    Ok(Outcome {
        measured,
        params,
        counters,
        dispatch_latency: None,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_distinct_and_uncached_with_sorted_platform() {
        let props = vec![
            ("b".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ];
        let command = noop_command(&["true".to_string()], &props);
        let command_digest = Digest::of_message(&command);
        let a = noop_action(command_digest, &props, 7, 1);
        let b = noop_action(command_digest, &props, 7, 2);
        assert_ne!(Digest::of_message(&a), Digest::of_message(&b));
        assert!(a.do_not_cache);
        assert_eq!(
            a.input_root_digest,
            Some(Digest::of_message(&reapi::Directory::default()).to_proto())
        );
        let names: Vec<&str> = a
            .platform
            .as_ref()
            .unwrap()
            .properties
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
