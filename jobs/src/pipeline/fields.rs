//! The values a pipeline file is made of, each checked as it is parsed, so
//! that a bad value fails with its field path and its line in the file:
//! text newtypes (step keys, commands, env names, artifact globs) and
//! containers with a maximum length that stop reading at the limit.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::limits;

thread_local! {
    /// Bytes of text the pipeline being parsed may still hold. YAML aliases
    /// repeat a value without repeating its bytes in the file, so the file's
    /// size alone does not bound what parsing it allocates.
    static TEXT_BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `parse` with a budget of `bytes` of text for every value it builds
/// (aliases count each time they are expanded).
pub(super) fn with_text_budget<T>(bytes: usize, parse: impl FnOnce() -> T) -> T {
    struct Reset(Option<usize>);
    impl Drop for Reset {
        fn drop(&mut self) {
            TEXT_BUDGET.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(TEXT_BUDGET.with(|b| b.replace(Some(bytes))));
    parse()
}

fn spend_text_budget(len: usize) -> Result<(), String> {
    TEXT_BUDGET.with(|budget| match budget.get() {
        None => Ok(()),
        Some(left) if len <= left => {
            budget.set(Some(left - len));
            Ok(())
        }
        Some(_) => Err(format!(
            "the pipeline holds more than {} bytes of text in all (a YAML alias counts each time it is used)",
            limits::MAX_PIPELINE_TEXT_BYTES
        )),
    })
}

/// Defines a string newtype checked by `$check` when parsed or built with
/// `TryFrom<String>`, with a JSON schema from `$schema`.
macro_rules! checked_text {
    ($(#[$doc:meta])* $name:ident, $check:path, $schema:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                $check(&text)?;
                spend_text_budget(text.len())?;
                Ok($name(text))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(text: &str) -> Result<Self, String> {
                $name::try_from(text.to_string())
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $name::try_from(String::deserialize(d)?).map_err(de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                $schema
            }
        }
    };
}

fn check_len(text: &str, what: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!(
            "{what} is {} bytes, more than the limit of {max}",
            text.len()
        ));
    }
    if text.contains('\0') {
        return Err(format!("{what} contains a NUL byte"));
    }
    Ok(())
}

fn check_step_key(key: &str) -> Result<(), String> {
    check_len(key, "a step key", limits::MAX_KEY_BYTES)?;
    let mut bytes = key.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!(
            "step key {key:?} must start with a letter or digit and hold only letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

const STEP_KEY_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_-]*$";

checked_text!(
    /// A step's name, unique in its pipeline, used by `depends_on`, in logs
    /// and in URLs: a letter or digit, then letters, digits, `-`, `_`; at
    /// most 64 bytes.
    StepKey,
    check_step_key,
    json_schema!({
        "type": "string",
        "pattern": STEP_KEY_PATTERN,
        "minLength": 1,
        "maxLength": limits::MAX_KEY_BYTES,
        "description": "A step's name, unique in the pipeline: a letter or digit, then letters, digits, '-' and '_'."
    })
);

fn check_command(command: &str) -> Result<(), String> {
    check_len(command, "a command", limits::MAX_COMMAND_BYTES)?;
    if command.trim().is_empty() {
        return Err("a command is empty".to_string());
    }
    Ok(())
}

checked_text!(
    /// One shell command of a step (run by `sh -c`); not blank, no NUL, at
    /// most 16 KiB.
    ShellCommand,
    check_command,
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": limits::MAX_COMMAND_BYTES,
        "pattern": "\\S",
        "description": "A shell command, run by `sh -c` in the step's working tree."
    })
);

/// The prefix of the variables the farm sets for a step itself.
pub const RESERVED_ENV_PREFIX: &str = "BUILDKUBE_";

fn check_env_name(name: &str) -> Result<(), String> {
    check_len(name, "an env name", limits::MAX_ENV_NAME_BYTES)?;
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "env name {name:?} must be a letter or '_', then letters, digits and '_'"
        ));
    }
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "env name {name:?}: names starting with {RESERVED_ENV_PREFIX} are set by the farm"
        ));
    }
    Ok(())
}

checked_text!(
    /// The name of an environment variable: a letter or `_`, then letters,
    /// digits and `_`; names starting with `BUILDKUBE_` are the farm's.
    EnvName,
    check_env_name,
    json_schema!({
        "type": "string",
        "pattern": "^(?!BUILDKUBE_)[A-Za-z_][A-Za-z0-9_]*$",
        "maxLength": limits::MAX_ENV_NAME_BYTES,
        "description": "An environment variable's name; BUILDKUBE_* names are set by the farm."
    })
);

fn check_env_value(value: &str) -> Result<(), String> {
    check_len(value, "an env value", limits::MAX_ENV_VALUE_BYTES)
}

checked_text!(
    /// The value of an environment variable: at most 4 KiB, no NUL.
    EnvValue,
    check_env_value,
    json_schema!({
        "type": "string",
        "maxLength": limits::MAX_ENV_VALUE_BYTES
    })
);

fn check_property_name(name: &str) -> Result<(), String> {
    check_len(name, "a platform property name", limits::MAX_PROPERTY_BYTES)?;
    if name.is_empty() {
        return Err("a platform property name is empty".to_string());
    }
    Ok(())
}

checked_text!(
    /// The name of a platform property a worker must offer (`OSFamily`,
    /// `runner`, ...): not empty, at most 256 bytes.
    PropertyName,
    check_property_name,
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": limits::MAX_PROPERTY_BYTES
    })
);

fn check_property_value(value: &str) -> Result<(), String> {
    check_len(
        value,
        "a platform property value",
        limits::MAX_PROPERTY_BYTES,
    )
}

checked_text!(
    /// The value a worker must offer for a platform property: at most 256 bytes.
    PropertyValue,
    check_property_value,
    json_schema!({
        "type": "string",
        "maxLength": limits::MAX_PROPERTY_BYTES
    })
);

fn check_artifact_glob(glob: &str) -> Result<(), String> {
    check_len(glob, "an artifact glob", limits::MAX_GLOB_BYTES)?;
    if glob.is_empty() {
        return Err("an artifact glob is empty".to_string());
    }
    if glob.starts_with('/') {
        return Err(format!(
            "artifact glob {glob:?} is absolute: artifacts are relative to the step's working tree"
        ));
    }
    for component in glob.split('/') {
        match component {
            "" => return Err(format!("artifact glob {glob:?} has an empty path component")),
            ".." => {
                return Err(format!(
                    "artifact glob {glob:?} has a '..' component: artifacts stay inside the working tree"
                ))
            }
            _ => {}
        }
    }
    artifact_glob_matcher(glob).map(|_| ())
}

/// The one way an artifact glob is compiled: `*` and `?` never match `/`,
/// `**` matches any number of directories.
pub(super) fn artifact_glob_matcher(glob: &str) -> Result<globset::Glob, String> {
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| format!("artifact glob {glob:?}: {}", e.kind()))
}

checked_text!(
    /// A glob naming files the step leaves behind to keep, relative to its
    /// working tree, without `..`: `*` and `?` stay within a directory, `**`
    /// crosses directories, `{a,b}` and `[ab]` as usual.
    ArtifactGlob,
    check_artifact_glob,
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": limits::MAX_GLOB_BYTES,
        "pattern": "^(?!/)(?!.*(^|/)\\.\\.(/|$))",
        "description": "Files to keep, relative to the working tree: '*' stays in a directory, '**' crosses directories."
    })
);

/// A list of at least `MIN` and at most `MAX` items; parsing stops at the
/// first item past `MAX`, so a long list is refused before it is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedVec<T, const MIN: usize, const MAX: usize>(Vec<T>);

impl<T, const MIN: usize, const MAX: usize> BoundedVec<T, MIN, MAX> {
    /// Wraps `items` if their count is within the bounds.
    pub fn new(items: Vec<T>) -> Result<Self, String> {
        if items.len() < MIN || items.len() > MAX {
            return Err(count_error(items.len(), MIN, MAX));
        }
        Ok(BoundedVec(items))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn count_error(count: usize, min: usize, max: usize) -> String {
    if count < min {
        format!("needs at least {min} entries, has {count}")
    } else {
        format!("has more than the limit of {max} entries")
    }
}

impl<T, const MIN: usize, const MAX: usize> Default for BoundedVec<T, MIN, MAX> {
    /// An empty list (for fields whose `MIN` is 0).
    fn default() -> Self {
        BoundedVec(Vec::new())
    }
}

impl<T, const MIN: usize, const MAX: usize> Deref for BoundedVec<T, MIN, MAX> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Serialize, const MIN: usize, const MAX: usize> Serialize for BoundedVec<T, MIN, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const MIN: usize, const MAX: usize> Deserialize<'de>
    for BoundedVec<T, MIN, MAX>
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SeqVisitor<T, const MIN: usize, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MIN: usize, const MAX: usize> Visitor<'de>
            for SeqVisitor<T, MIN, MAX>
        {
            type Value = BoundedVec<T, MIN, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of {MIN} to {MAX} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                loop {
                    if items.len() == MAX {
                        if seq.next_element::<IgnoredAny>()?.is_some() {
                            return Err(de::Error::custom(count_error(MAX + 1, MIN, MAX)));
                        }
                        break;
                    }
                    match seq.next_element()? {
                        Some(item) => items.push(item),
                        None => break,
                    }
                }
                BoundedVec::new(items).map_err(de::Error::custom)
            }
        }
        d.deserialize_seq(SeqVisitor(PhantomData))
    }
}

impl<T: JsonSchema, const MIN: usize, const MAX: usize> JsonSchema for BoundedVec<T, MIN, MAX> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        format!("List_of_{}", T::schema_name()).into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = json_schema!({
            "type": "array",
            "items": generator.subschema_for::<T>(),
            "maxItems": MAX,
        });
        if MIN > 0 {
            schema.insert("minItems".into(), MIN.into());
        }
        schema
    }
}

/// A map with at most `MAX` entries, sorted by key; parsing stops at the
/// first entry past `MAX` and refuses a key given twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedMap<K, V, const MAX: usize>(BTreeMap<K, V>);

impl<K: Ord, V, const MAX: usize> BoundedMap<K, V, MAX> {
    /// Wraps `map` if it has at most `MAX` entries.
    pub fn new(map: BTreeMap<K, V>) -> Result<Self, String> {
        if map.len() > MAX {
            return Err(count_error(map.len(), 0, MAX));
        }
        Ok(BoundedMap(map))
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K, V, const MAX: usize> Default for BoundedMap<K, V, MAX> {
    fn default() -> Self {
        BoundedMap(BTreeMap::new())
    }
}

impl<K, V, const MAX: usize> Deref for BoundedMap<K, V, MAX> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.0
    }
}

impl<K: Serialize, V: Serialize, const MAX: usize> Serialize for BoundedMap<K, V, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, K, V, const MAX: usize> Deserialize<'de> for BoundedMap<K, V, MAX>
where
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V, const MAX: usize>(PhantomData<(K, V)>);
        impl<'de, K, V, const MAX: usize> Visitor<'de> for MapVisitor<K, V, MAX>
        where
            K: Deserialize<'de> + Ord + fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = BoundedMap<K, V, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a map of at most {MAX} entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some(key) = map.next_key::<K>()? {
                    if entries.len() == MAX {
                        return Err(de::Error::custom(count_error(MAX + 1, 0, MAX)));
                    }
                    if entries.contains_key(&key) {
                        return Err(de::Error::custom(format!("\"{key}\" is given twice")));
                    }
                    let value = map.next_value()?;
                    entries.insert(key, value);
                }
                Ok(BoundedMap(entries))
            }
        }
        d.deserialize_map(MapVisitor(PhantomData))
    }
}

impl<K: JsonSchema, V: JsonSchema, const MAX: usize> JsonSchema for BoundedMap<K, V, MAX> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        format!("Map_of_{}_to_{}", K::schema_name(), V::schema_name()).into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "propertyNames": generator.subschema_for::<K>(),
            "additionalProperties": generator.subschema_for::<V>(),
            "maxProperties": MAX,
        })
    }
}

/// Reads an unsigned integer and refuses it outside `min..=max` from inside
/// the parser's visit, so the error carries the value's line and path.
fn int_in_range<'de, D: Deserializer<'de>>(d: D, min: u64, max: u64) -> Result<u64, D::Error> {
    struct RangeVisitor(u64, u64);
    impl Visitor<'_> for RangeVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an integer from {} to {}", self.0, self.1)
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
            if value < self.0 || value > self.1 {
                return Err(E::custom(format!(
                    "{value} is out of range: {} to {}",
                    self.0, self.1
                )));
            }
            Ok(value)
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
            match u64::try_from(value) {
                Ok(value) => self.visit_u64(value),
                Err(_) => Err(E::custom(format!(
                    "{value} is out of range: {} to {}",
                    self.0, self.1
                ))),
            }
        }
    }
    d.deserialize_u64(RangeVisitor(min, max))
}

pub(super) fn timeout_secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    int_in_range(d, 1, limits::MAX_TIMEOUT_SECS)
}

pub(super) fn retries<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    int_in_range(d, 0, limits::MAX_RETRIES.into()).map(|n| n as u32)
}

pub(super) fn retry_limit<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    int_in_range(d, 1, limits::MAX_RETRIES.into()).map(|n| n as u32)
}

/// A process exit code a step may be rerun on: 1 to 255 (0 is success).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitCode(u8);

impl ExitCode {
    /// The code.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for ExitCode {
    type Error = String;
    fn try_from(code: u8) -> Result<ExitCode, String> {
        if code == 0 {
            return Err("0 is success, not an exit code to rerun on".into());
        }
        Ok(ExitCode(code))
    }
}

impl Serialize for ExitCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.0)
    }
}

impl<'de> Deserialize<'de> for ExitCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_in_range(d, 1, 255).map(|code| ExitCode(code as u8))
    }
}

impl JsonSchema for ExitCode {
    fn schema_name() -> Cow<'static, str> {
        "ExitCode".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "integer",
            "minimum": 1,
            "maximum": 255,
            "description": "A process exit code, 1 to 255."
        })
    }
}
