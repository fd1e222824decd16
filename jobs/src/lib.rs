//! CI jobs on the farm: what a repository asks to run and what starts it.
//!
//! - [`pipeline`]: `.buildkube/pipeline.yaml` typed and checked (steps,
//!   commands, platform, env, timeouts, retries, artifacts, `depends_on`),
//!   with the bounds that keep a hostile repository from making the server
//!   hold unbounded data, and the order the steps can run in.
//! - [`schema`]: the file's JSON schema for editors, generated from those
//!   types and committed as `jobs/pipeline.schema.json`.
//! - [`logs`]: the live logs of running steps, bounded, with followers.
//! - [`webhook`]: GitHub and GitLab deliveries, authenticated (HMAC
//!   signature or token, against secrets from a file) and turned into a
//!   [`webhook::Trigger`]: repository, ref and commit to run.
//! - [`run`]: the job runner: a job from a trigger or a request, its
//!   pipeline step, its steps queued in the scheduler in dependency order,
//!   retries, cancel, outcome; records kept in the server's durable
//!   record store and resumed after a restart.
//!
//! The crate sits below the server: what it needs of it (CAS reads, farm
//! credentials) are the two small traits of [`run::server_side`].

pub mod logs;
pub mod pipeline;
pub mod run;
pub mod schema;
pub mod webhook;

pub use pipeline::{Pipeline, PipelineError, Step, StepKey};
pub use run::{JobRecord, JobRunner};
pub use webhook::{Trigger, WebhookError, WebhookOutcome};
