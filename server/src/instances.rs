//! The instance names this server serves.

use std::collections::BTreeSet;

use tonic::Status;

/// Configured instance names; every request names one of them.
#[derive(Debug, Clone)]
pub struct Instances(BTreeSet<String>);

/// Why an instance name is not acceptable in the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--instance `{name}`: {reason}")]
pub struct InstanceNameError {
    name: String,
    reason: String,
}

impl Instances {
    /// Validates and collects instance names.
    pub fn new(names: &[String]) -> Result<Instances, InstanceNameError> {
        let mut set = BTreeSet::new();
        for name in names {
            // The empty instance name is valid in the REAPI (no prefix).
            if !name.is_empty() {
                buildkube_config::check_instance_name(name).map_err(|reason| {
                    InstanceNameError {
                        name: name.clone(),
                        reason,
                    }
                })?;
            }
            set.insert(name.clone());
        }
        if set.is_empty() {
            return Err(InstanceNameError {
                name: String::new(),
                reason: "at least one instance name is required".into(),
            });
        }
        Ok(Instances(set))
    }

    /// Ok if `name` is served; otherwise INVALID_ARGUMENT listing the served names.
    pub fn check(&self, name: &str) -> Result<(), Status> {
        if self.0.contains(name) {
            return Ok(());
        }
        let served: Vec<String> = self.0.iter().map(|n| format!("{n:?}")).collect();
        Err(Status::invalid_argument(format!(
            "unknown instance name {name:?}; this server serves {}",
            served.join(", ")
        )))
    }

    /// The first configured name (used by in-process workers).
    pub fn first(&self) -> &str {
        self.0.iter().next().expect("at least one instance")
    }

    /// All names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names() {
        assert!(Instances::new(&["main".into(), "team/ci".into(), "".into()]).is_ok());
        for bad in ["/main", "main/", "a//b", "x/blobs", "sp ace", "uploads"] {
            assert!(Instances::new(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(Instances::new(&[]).is_err());
    }

    #[test]
    fn unknown_instance_names_the_served_ones() {
        let i = Instances::new(&["main".into()]).unwrap();
        assert!(i.check("main").is_ok());
        let err = i.check("mian").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("\"mian\"") && err.message().contains("\"main\""));
    }
}
