//! Who holds a lease, what the scheduler remembers of leases that ended, and
//! how operation names carry their instance.

use std::collections::{HashMap, VecDeque};

/// Ended leases remembered so their holder's late result can be told from a
/// forged one.
const ENDED_LEASES_REMEMBERED: usize = 10_000;

/// Who holds a lease: the worker credential it came with (`open` without
/// auth) and the worker's self-reported id. KeepAlive and Complete for the
/// lease must come from both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// Name of the worker credential.
    pub identity: String,
    /// `WorkerInfo.worker_id`.
    pub worker_id: String,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "worker {} (credential {})",
            self.worker_id, self.identity
        )
    }
}

/// A KeepAlive or Complete that does not come from the lease's holder.
#[derive(Debug, Clone, thiserror::Error)]
#[error("lease {lease_id:?} (operation {operation:?}): {reason}")]
pub struct LeaseRefused {
    /// The lease id the caller named.
    pub lease_id: String,
    /// The operation involved.
    pub operation: String,
    /// Why it is refused.
    pub reason: String,
}

/// Leases that expired or were released, with their holder, oldest
/// forgotten first.
#[derive(Default)]
pub(super) struct EndedLeases {
    by_id: HashMap<String, (LeaseHolder, String)>,
    order: VecDeque<String>,
}

impl EndedLeases {
    pub(super) fn remember(&mut self, lease_id: String, holder: LeaseHolder, operation: String) {
        if self
            .by_id
            .insert(lease_id.clone(), (holder, operation))
            .is_none()
        {
            self.order.push_back(lease_id);
        }
        while self.order.len() > ENDED_LEASES_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    pub(super) fn get(&self, lease_id: &str) -> Option<&(LeaseHolder, String)> {
        self.by_id.get(lease_id)
    }

    pub(super) fn forget(&mut self, lease_id: &str) {
        // The order entry stays until it ages out; `remember` re-adds only unknown ids.
        self.by_id.remove(lease_id);
    }
}

/// The name of a new operation of `instance`: `INSTANCE/operations/UUID`
/// (`operations/UUID` for the empty instance), as the REAPI suggests, so
/// every name says which instance's scope it is under.
pub fn operation_name(instance: &str) -> String {
    let id = uuid::Uuid::new_v4();
    if instance.is_empty() {
        format!("operations/{id}")
    } else {
        format!("{instance}/operations/{id}")
    }
}

/// The instance an operation name belongs to; `None` if it is not one of
/// ours (instance names cannot contain an `operations` segment, so the split
/// is unambiguous).
pub fn instance_of_operation(name: &str) -> Option<&str> {
    let (instance, id) = match name.strip_prefix("operations/") {
        Some(id) => ("", id),
        None => name.rsplit_once("/operations/")?,
    };
    (!id.is_empty() && !id.contains('/')).then_some(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_carry_their_instance() {
        for instance in ["main", "team/ci", ""] {
            let name = operation_name(instance);
            assert_eq!(instance_of_operation(&name), Some(instance), "{name}");
        }
        for bad in ["", "operations/", "main/operations/a/b", "main/x", "nope"] {
            assert_eq!(instance_of_operation(bad), None, "{bad}");
        }
    }

    #[test]
    fn ended_leases_are_bounded() {
        let mut ended = EndedLeases::default();
        let holder = LeaseHolder {
            identity: "open".into(),
            worker_id: "w".into(),
        };
        for i in 0..ENDED_LEASES_REMEMBERED + 5 {
            ended.remember(i.to_string(), holder.clone(), "op".into());
        }
        assert!(ended.get("0").is_none());
        assert!(ended
            .get(&(ENDED_LEASES_REMEMBERED + 4).to_string())
            .is_some());
        assert_eq!(ended.by_id.len(), ENDED_LEASES_REMEMBERED);
    }
}
