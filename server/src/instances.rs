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
    reason: &'static str,
}

/// Path segments the REAPI reserves; an instance name may not contain them.
const RESERVED: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

impl Instances {
    /// Validates and collects instance names.
    pub fn new(names: &[String]) -> Result<Instances, InstanceNameError> {
        let mut set = BTreeSet::new();
        for name in names {
            let error = |reason| InstanceNameError {
                name: name.clone(),
                reason,
            };
            if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
                return Err(error("must not start or end with '/' or contain '//'"));
            }
            if name.split('/').any(|s| RESERVED.contains(&s)) && !name.is_empty() {
                return Err(error("contains a path segment the REAPI reserves (blobs, uploads, actions, operations, ...)"));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                return Err(error(
                    "may contain only ASCII letters, digits, '-', '_', '.' and '/'",
                ));
            }
            set.insert(name.clone());
        }
        if set.is_empty() {
            return Err(InstanceNameError {
                name: String::new(),
                reason: "at least one instance name is required",
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
