//! `ac-get`: GetActionResult over entries this run wrote first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::ensure;
use buildkube_proto::reapi::action_cache_client::ActionCacheClient;
use buildkube_proto::reapi::{self, ActionResult, ExecutedActionMetadata};
use buildkube_reapi::{AuthChannel, Digest};
use futures::{StreamExt, TryStreamExt};

use crate::load::{drive, timed, LoadPlan};
use crate::{note, rpc_error, AcGetArgs, Outcome, Target, MAX_MESSAGE};

fn ac_client(channel: AuthChannel) -> ActionCacheClient<AuthChannel> {
    ActionCacheClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Key of entry `index`: the digest of a text unique to this run.
fn entry_digest(nonce: u64, index: u64) -> Digest {
    Digest::of_bytes(format!("reapi-bench ac-get {nonce:016x} {index}").as_bytes())
}

/// Marker stored in the entry's metadata so a lookup can tell it got its own entry.
fn entry_marker(index: u64) -> String {
    format!("reapi-bench entry {index}")
}

/// Whether lookup `index` is one of the `ratio` share meant to miss.
fn is_miss(index: u64, ratio: f64) -> bool {
    ((index + 1) as f64 * ratio).floor() > (index as f64 * ratio).floor()
}

pub(crate) async fn get(
    target: &Target,
    plan: &LoadPlan,
    args: &AcGetArgs,
) -> anyhow::Result<Outcome> {
    ensure!(
        (0.0..=1.0).contains(&args.miss_ratio),
        "--miss-ratio must be between 0 and 1"
    );
    ensure!(args.entries >= 1, "--entries must be at least 1");
    let nonce: u64 = rand::random();
    note(
        plan.quiet,
        format_args!("ac-get: writing {} action cache entries", args.entries),
    );
    futures::stream::iter((0..args.entries).map(|index| {
        let mut client = ac_client(target.channel(index));
        let request = reapi::UpdateActionResultRequest {
            instance_name: target.instance.clone(),
            action_digest: Some(entry_digest(nonce, index).to_proto()),
            action_result: Some(ActionResult {
                exit_code: 0,
                execution_metadata: Some(ExecutedActionMetadata {
                    worker: entry_marker(index),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        async move {
            client
                .update_action_result(request)
                .await
                .map_err(rpc_error(
                    "UpdateActionResult (ac-get seeds the cache with it)",
                ))
        }
    }))
    .buffer_unordered(plan.concurrency)
    .try_for_each(|_| async { Ok(()) })
    .await?;

    let hits = Arc::new(AtomicU64::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    let (hits_op, misses_op) = (hits.clone(), misses.clone());
    let entries = args.entries;
    let miss_ratio = args.miss_ratio;
    let warmup = plan.warmup;
    let target_for_ops = target.clone();
    let measured = drive(
        "ac-get",
        plan,
        move |index| {
            let mut client = ac_client(target_for_ops.channel(index));
            let instance = target_for_ops.instance.clone();
            let (hits, misses) = (hits_op.clone(), misses_op.clone());
            async move {
                let miss = is_miss(index, miss_ratio);
                let entry = index % entries;
                let digest = if miss {
                    Digest::new(rand::random(), 140)
                } else {
                    entry_digest(nonce, entry)
                };
                let request = reapi::GetActionResultRequest {
                    instance_name: instance,
                    action_digest: Some(digest.to_proto()),
                    ..Default::default()
                };
                timed(async move {
                    match client.get_action_result(request).await {
                        Ok(response) if !miss => {
                            let result = response.into_inner();
                            let worker = result.execution_metadata.map(|m| m.worker).unwrap_or_default();
                            ensure!(
                                worker.is_empty() || worker == entry_marker(entry),
                                "GetActionResult of entry {entry} returned another entry's result ({worker})"
                            );
                            if index >= warmup {
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => anyhow::bail!("GetActionResult found {digest}, which was never written"),
                        Err(status) if miss && status.code() == tonic::Code::NotFound => {
                            if index >= warmup {
                                misses.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(status) => {
                            return Err(rpc_error(format!("GetActionResult of {digest}"))(status))
                        }
                    }
                    Ok(0)
                })
                .await
            }
        },
        String::new,
    )
    .await;
    let mut params = BTreeMap::new();
    params.insert("entries".into(), args.entries.into());
    params.insert("miss_ratio".into(), args.miss_ratio.into());
    let mut counters = BTreeMap::new();
    counters.insert("hits".into(), hits.load(Ordering::Relaxed));
    counters.insert("misses".into(), misses.load(Ordering::Relaxed));
    Ok(Outcome {
        measured,
        params,
        counters,
        dispatch_latency: None,
        failures: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miss_ratio_is_exact_over_a_run() {
        for (ratio, expected) in [(0.0, 0), (0.25, 25), (0.5, 50), (1.0, 100)] {
            assert_eq!(
                (0..100).filter(|&i| is_miss(i, ratio)).count(),
                expected,
                "ratio {ratio}"
            );
        }
    }
}
