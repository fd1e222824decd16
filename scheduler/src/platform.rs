//! Platform properties and how actions are matched to workers.
//!
//! Rules (documented in README):
//! - An action runs on a worker only if *every* property `name=value` of the
//!   action's platform is offered by the worker. Names and values compare
//!   exactly (case-sensitive).
//! - A worker may offer several values for one name (e.g. `ISA=x86-64` and
//!   `ISA=x86-64-v2`); any of them satisfies the action.
//! - An action with an empty platform runs on any worker; properties the
//!   worker offers beyond what the action asks are ignored.
//! - The action's platform wins over the command's (REAPI v2.2 moved the
//!   platform from Command to Action); if the action has none, the command's
//!   is used.

use std::fmt;

use buildkube_proto::reapi;

/// A platform in canonical form: properties sorted by name then value, deduplicated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlatformKey(Vec<(String, String)>);

impl PlatformKey {
    /// Canonicalizes a wire platform.
    pub fn from_proto(platform: Option<&reapi::Platform>) -> PlatformKey {
        let mut properties: Vec<(String, String)> = platform
            .map(|p| {
                p.properties
                    .iter()
                    .map(|p| (p.name.clone(), p.value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        properties.sort();
        properties.dedup();
        PlatformKey(properties)
    }

    /// Canonicalizes `name=value` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> PlatformKey {
        let mut properties: Vec<_> = pairs.into_iter().collect();
        properties.sort();
        properties.dedup();
        PlatformKey(properties)
    }

    /// Whether a worker offering `offered` can run an action asking for `self`.
    pub fn satisfied_by(&self, offered: &PlatformKey) -> bool {
        self.0
            .iter()
            .all(|wanted| offered.0.binary_search(wanted).is_ok())
    }

    /// The properties, sorted.
    pub fn properties(&self) -> &[(String, String)] {
        &self.0
    }

    /// The metric label of this platform (shared with the autoscaler queries).
    pub fn label(&self) -> String {
        buildkube_config::platform_label(self.0.iter().map(|(n, v)| (n.as_str(), v.as_str())))
    }

    /// Value of a property (the first one if repeated).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for PlatformKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("default");
        }
        let text: Vec<String> = self.0.iter().map(|(n, v)| format!("{n}={v}")).collect();
        f.write_str(&text.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pairs: &[(&str, &str)]) -> PlatformKey {
        PlatformKey::from_pairs(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())))
    }

    #[test]
    fn empty_platform_runs_anywhere() {
        assert!(key(&[]).satisfied_by(&key(&[])));
        assert!(key(&[]).satisfied_by(&key(&[("OSFamily", "Linux")])));
    }

    #[test]
    fn every_wanted_property_must_be_offered() {
        let worker = key(&[
            ("OSFamily", "Linux"),
            ("ISA", "x86-64"),
            ("ISA", "x86-64-v2"),
        ]);
        assert!(key(&[("OSFamily", "Linux")]).satisfied_by(&worker));
        assert!(key(&[("ISA", "x86-64-v2"), ("OSFamily", "Linux")]).satisfied_by(&worker));
        assert!(!key(&[("OSFamily", "Windows")]).satisfied_by(&worker));
        assert!(
            !key(&[("OSFamily", "linux")]).satisfied_by(&worker),
            "values are case-sensitive"
        );
        assert!(!key(&[("OSFamily", "Linux"), ("gpu", "1")]).satisfied_by(&worker));
    }

    #[test]
    fn canonical_form_ignores_order_and_duplicates() {
        assert_eq!(
            key(&[("b", "1"), ("a", "2"), ("b", "1")]),
            key(&[("a", "2"), ("b", "1")])
        );
        assert_eq!(key(&[("b", "1"), ("a", "2")]).to_string(), "a=2,b=1");
        assert_eq!(key(&[]).to_string(), "default");
    }
}
