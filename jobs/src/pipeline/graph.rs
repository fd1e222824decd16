//! Checks of the steps as a whole (what no single value shows): keys are
//! unique, `depends_on` names other steps of the pipeline, the steps form
//! no cycle; and the order in which they can run.

use std::collections::{BTreeSet, HashMap};

use super::{limits, PipelineError, Step};

/// At most this many keys are listed when a `depends_on` names no step.
const KEYS_LISTED: usize = 10;

/// Checks everything [`super::Pipeline`] promises beyond what parsing
/// checked field by field (numbers are checked again here for steps built
/// in code rather than parsed).
pub(super) fn check(steps: &[Step]) -> Result<(), PipelineError> {
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        if let Some(first) = index_of.insert(step.key.as_str(), i) {
            return Err(invalid(
                format!("steps[{i}].key"),
                format!("{:?} is also the key of steps[{first}]", step.key.as_str()),
            ));
        }
        check_numbers(i, step)?;
    }
    for (i, step) in steps.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (j, dependency) in step.depends_on.iter().enumerate() {
            let path = format!("steps[{i}].depends_on[{j}]");
            if !index_of.contains_key(dependency.as_str()) {
                return Err(invalid(
                    path,
                    format!(
                        "{:?} names no step; the steps are {}",
                        dependency.as_str(),
                        key_list(steps)
                    ),
                ));
            }
            if !seen.insert(dependency.as_str()) {
                return Err(invalid(
                    path,
                    format!("{:?} is listed twice", dependency.as_str()),
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(steps, &index_of) {
        return Err(PipelineError::Cycle {
            cycle: cycle
                .into_iter()
                .map(|i| steps[i].key.to_string())
                .collect(),
        });
    }
    Ok(())
}

fn check_numbers(i: usize, step: &Step) -> Result<(), PipelineError> {
    let out_of_range = |field: &str, value: u64, min: u64, max: u64| {
        (value < min || value > max).then(|| {
            invalid(
                format!("steps[{i}].{field}"),
                format!("{value} is out of range: {min} to {max}"),
            )
        })
    };
    let retry = &step.retry;
    let checks = [
        out_of_range(
            "timeout_secs",
            step.timeout_secs,
            1,
            limits::MAX_TIMEOUT_SECS,
        ),
        out_of_range(
            "retry.worker_lost",
            retry.worker_lost.into(),
            0,
            limits::MAX_RETRIES.into(),
        ),
        retry.exit_codes.as_ref().and_then(|rule| {
            out_of_range(
                "retry.exit_codes.limit",
                rule.limit.into(),
                1,
                limits::MAX_RETRIES.into(),
            )
        }),
    ];
    match checks.into_iter().flatten().next() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn invalid(path: String, message: String) -> PipelineError {
    PipelineError::Invalid { path, message }
}

fn key_list(steps: &[Step]) -> String {
    let mut list: Vec<&str> = steps
        .iter()
        .take(KEYS_LISTED)
        .map(|s| s.key.as_str())
        .collect();
    if steps.len() > KEYS_LISTED {
        list.push("...");
    }
    list.join(", ")
}

/// A cycle as step indices, the first repeated at the end, if there is one.
/// Depth-first over `depends_on`, iteratively (a pipeline is small, but a
/// chain of steps should not be able to exhaust the stack).
fn find_cycle(steps: &[Step], index_of: &HashMap<&str, usize>) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unvisited,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::Unvisited; steps.len()];
    for start in 0..steps.len() {
        if mark[start] != Mark::Unvisited {
            continue;
        }
        // (step, index of the next dependency to follow)
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::OnPath;
        while let Some((step, next)) = path.last_mut() {
            let step = *step;
            let Some(dependency) = steps[step].depends_on.get(*next) else {
                mark[step] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            let d = index_of[dependency.as_str()];
            match mark[d] {
                Mark::Done => {}
                Mark::Unvisited => {
                    mark[d] = Mark::OnPath;
                    path.push((d, 0));
                }
                Mark::OnPath => {
                    let from = path.iter().position(|&(s, _)| s == d).expect("on path");
                    let mut cycle: Vec<usize> = path[from..].iter().map(|&(s, _)| s).collect();
                    cycle.push(d);
                    return Some(cycle);
                }
            }
        }
    }
    None
}

/// Step indices, each after every step it depends on; among the steps free
/// to go, the one earlier in the file first (Kahn's algorithm). The steps
/// must have passed [`check`].
pub(super) fn topological_order(steps: &[Step]) -> Vec<usize> {
    let index_of: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key.as_str(), i))
        .collect();
    let mut waiting_on: Vec<usize> = steps.iter().map(|s| s.depends_on.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        for dependency in step.depends_on.iter() {
            dependents[index_of[dependency.as_str()]].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..steps.len()).filter(|&i| waiting_on[i] == 0).collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &dependents[i] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.insert(d);
            }
        }
    }
    debug_assert_eq!(order.len(), steps.len(), "checked pipelines have no cycle");
    order
}
