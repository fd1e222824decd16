//! Validation of a stack spec: everything serde cannot check (names,
//! references between fields, bounds), each problem naming its field.

use super::*;

impl StackSpec {
    /// Checks everything that serde cannot: names, references between
    /// fields, bounds. Returns every problem, each naming its field.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut v = Validator::default();
        if self.instances.is_empty() {
            v.error("instances", "at least one instance name is required");
        }
        for (i, instance) in self.instances.iter().enumerate() {
            v.instance_name(&format!("instances[{i}]"), instance);
            if self.instances[..i].contains(instance) {
                v.error(
                    &format!("instances[{i}]"),
                    format!("`{instance}` is listed twice"),
                );
            }
        }
        if self.runners.is_empty() {
            v.error("runners", "at least one runner is required");
        }
        for (i, runner) in self.runners.iter().enumerate() {
            v.label_value(&format!("runners[{i}]"), runner);
        }

        let server = &self.server;
        let storage = v.quantity_bytes("server.storage_size", &server.storage_size);
        let cas = v.byte_size("server.cas_max_size", &server.cas_max_size);
        if let (Some(storage), Some(cas)) = (storage, cas) {
            if cas > storage {
                v.error(
                    "server.cas_max_size",
                    format!(
                        "{} does not fit in server.storage_size {}",
                        server.cas_max_size, server.storage_size
                    ),
                );
            }
        }
        if server.lease_timeout_secs == 0 {
            v.error("server.lease_timeout_secs", "must be at least 1");
        }
        if server.max_attempts == 0 {
            v.error("server.max_attempts", "must be at least 1");
        }
        if let Some(class) = &server.storage_class {
            v.dns_subdomain("server.storage_class", class);
        }
        v.resources("server.resources", &server.resources);
        v.quantity_bytes("server.tmp_size", &server.tmp_size);

        if self.worker_pools.is_empty() {
            v.error("worker_pools", "at least one worker pool is required");
        }
        for (i, pool) in self.worker_pools.iter().enumerate() {
            let at = |field: &str| format!("worker_pools[{i}].{field}");
            v.dns_label(&at("name"), &pool.name, "buildkube-worker-".len());
            if self.worker_pools[..i]
                .iter()
                .any(|other| other.name == pool.name)
            {
                v.error(
                    &at("name"),
                    format!("pool `{}` is defined twice", pool.name),
                );
            }
            if !self.instances.contains(&pool.instance) {
                v.error(
                    &at("instance"),
                    format!(
                        "`{}` is not one of the served instances {:?}",
                        pool.instance, self.instances
                    ),
                );
            }
            for (key, value) in &pool.platform {
                v.platform_key(&at(&format!("platform.{key}")), key);
                if value.contains(',') {
                    v.error(
                        &at(&format!("platform.{key}")),
                        "a value must not contain `,`",
                    );
                }
            }
            match pool.platform.get(buildkube_config::PLATFORM_RUNNER_KEY) {
                None => v.error(
                    &at("platform"),
                    format!(
                        "no `{}` property: no runner would serve this pool (runners: {:?})",
                        buildkube_config::PLATFORM_RUNNER_KEY,
                        self.runners
                    ),
                ),
                Some(runner) if !self.runners.contains(runner) => v.error(
                    &at(&format!(
                        "platform.{}",
                        buildkube_config::PLATFORM_RUNNER_KEY
                    )),
                    format!(
                        "no runner serves `{runner}`; the runners are {:?}",
                        self.runners
                    ),
                ),
                Some(_) => {}
            }
            if pool.replicas < 0 {
                v.error(&at("replicas"), "must not be negative");
            }
            v.pool_sizes(&at, pool);
            if pool.max_action_timeout_secs == 0 {
                v.error(&at("max_action_timeout_secs"), "must be at least 1");
            }
            if pool.drain_timeout_secs < pool.max_action_timeout_secs {
                v.error(
                    &at("drain_timeout_secs"),
                    format!(
                        "{} is less than max_action_timeout_secs {}: a scale-down would kill \
                         actions that are within their timeout",
                        pool.drain_timeout_secs, pool.max_action_timeout_secs
                    ),
                );
            }
            // Each platform's load is counted for the first pool that can run
            // it; a pool all of whose platforms an earlier one runs would
            // never be scaled.
            if let Some(earlier) = self.worker_pools[..i].iter().find(|other| {
                other.instance == pool.instance
                    && pool
                        .platform
                        .iter()
                        .all(|(k, v)| other.platform.get(k) == Some(v))
            }) {
                v.error(
                    &at("platform"),
                    format!(
                        "pool `{}`, listed before, offers all of it, so the autoscaler counts \
                         this pool's work for that one; list this pool first or give it a \
                         property of its own",
                        earlier.name
                    ),
                );
            }
            // The queue gauges count steps with actions, by platform, and
            // each platform's load goes to the first pool that can run it;
            // a step asking for no platform is then counted for the first
            // pool of the instance, which must run steps.
            if pool.jobs {
                if let Some(earlier) = self.worker_pools[..i]
                    .iter()
                    .find(|other| other.instance == pool.instance && !other.jobs)
                {
                    v.error(
                        &at("jobs"),
                        format!(
                            "pool `{}`, listed before, does not run steps, so the autoscaler \
                             would count this pool's steps for it (the queue gauges count steps \
                             with actions, by platform); list this pool first",
                            earlier.name
                        ),
                    );
                }
            }
            if pool.platform.len() > MAX_POOL_PROPERTIES {
                v.error(
                    &at("platform"),
                    format!(
                        "{} properties; at most {MAX_POOL_PROPERTIES}: the autoscaler query \
                         lists every subset of them",
                        pool.platform.len()
                    ),
                );
            }
            if pool.termination_grace_margin_secs == 0 {
                v.error(
                    &at("termination_grace_margin_secs"),
                    "must be at least 1 so the pod outlives the drain",
                );
            }
            if pool.max_unavailable < 1 {
                v.error(
                    &at("max_unavailable"),
                    "must be at least 1 or node drains block forever",
                );
            }
            let bounds = &pool.autoscaling;
            if bounds.min_replicas < 0 {
                v.error(&at("autoscaling.min_replicas"), "must not be negative");
            }
            if bounds.max_replicas < 1 {
                v.error(&at("autoscaling.max_replicas"), "must be at least 1");
            }
            if bounds.scale_down_stabilization_secs < 0
                || bounds.scale_down_stabilization_secs > 3600
            {
                v.error(
                    &at("autoscaling.scale_down_stabilization_secs"),
                    "must be 0-3600 (the HPA's limit)",
                );
            }
            if bounds.scale_down_max_pods < 1 {
                v.error(
                    &at("autoscaling.scale_down_max_pods"),
                    "must be at least 1 or the pool never scales down",
                );
            }
            if !(1..=1800).contains(&bounds.scale_down_period_secs) {
                v.error(
                    &at("autoscaling.scale_down_period_secs"),
                    "must be 1-1800 (the HPA's limit)",
                );
            }
            if bounds.min_replicas > bounds.max_replicas {
                v.error(
                    &at("autoscaling.min_replicas"),
                    format!(
                        "{} is greater than max_replicas {}",
                        bounds.min_replicas, bounds.max_replicas
                    ),
                );
            }
        }

        if !self.monitoring.prometheus_url.starts_with("http://")
            && !self.monitoring.prometheus_url.starts_with("https://")
        {
            v.error(
                "monitoring.prometheus_url",
                "must start with http:// or https://",
            );
        }
        if !Regex::new(r"^[0-9]+(ms|s|m|h)$")
            .unwrap()
            .is_match(&self.monitoring.scrape_interval)
        {
            v.error(
                "monitoring.scrape_interval",
                "must be a duration such as 15s or 1m",
            );
        }
        v.dns_subdomain("ingress.host", &self.ingress.host);
        v.dns_subdomain("ingress.class_name", &self.ingress.class_name);
        v.dns_subdomain("ingress.cluster_issuer", &self.ingress.cluster_issuer);
        v.image_reference(
            "external_stores.postgres_image",
            &self.external_stores.postgres_image,
        );
        v.image_reference(
            "external_stores.redis_image",
            &self.external_stores.redis_image,
        );
        v.quantity_bytes(
            "external_stores.postgres_storage_size",
            &self.external_stores.postgres_storage_size,
        );
        if v.quantity_bytes(
            "external_stores.redis_memory",
            &self.external_stores.redis_memory,
        )
        .is_some_and(|bytes| bytes < 64 << 20)
        {
            v.error("external_stores.redis_memory", "must be at least 64Mi");
        }
        if self.monitoring.namespace_labels.is_empty() {
            v.error(
                "monitoring.namespace_labels",
                "at least one label: empty would admit every namespace to the metrics port",
            );
        }
        for (key, value) in &self.monitoring.namespace_labels {
            v.label_value(&format!("monitoring.namespace_labels.{key}"), value);
        }
        for (i, allow) in self.worker_egress.iter().enumerate() {
            if let Err(message) = parse_cidr(&allow.cidr) {
                v.error(&format!("worker_egress[{i}].cidr"), message);
            }
            if allow.ports.contains(&0) {
                v.error(&format!("worker_egress[{i}].ports"), "0 is not a port");
            }
        }

        if self.overlays.is_empty() {
            v.error("overlays", "at least one overlay is required");
        }
        let registry_re =
            Regex::new(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
                .unwrap();
        let tag_re = Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$").unwrap();
        for (name, overlay) in &self.overlays {
            let at = |field: &str| format!("overlays.{name}.{field}");
            if RESERVED_OVERLAY_NAMES.contains(&name.as_str()) {
                v.error(
                    &format!("overlays.{name}"),
                    format!("`{name}` is reserved for the generated tree"),
                );
            }
            v.dns_label(&format!("overlays.{name}"), name, 0);
            v.dns_label(&at("namespace"), &overlay.namespace, 0);
            if let Some(registry) = &overlay.images.registry {
                if !registry_re.is_match(registry) {
                    v.error(
                        &at("images.registry"),
                        format!("`{registry}` is not a registry/path prefix (lowercase, e.g. ghcr.io/acme)"),
                    );
                }
            }
            if !tag_re.is_match(&overlay.images.tag) {
                v.error(
                    &at("images.tag"),
                    format!("`{}` is not an image tag", overlay.images.tag),
                );
            } else if overlay.images.tag == "latest" {
                v.error(
                    &at("images.tag"),
                    "pin a version: `latest` changes under a running stack",
                );
            }
            if let ExposeSpec::NodePort { node_port } = overlay.expose {
                if !(30000..=32767).contains(&node_port) {
                    v.error(
                        &at("expose.node_port"),
                        format!("{node_port} is outside 30000-32767"),
                    );
                }
            }
            if overlay.kind_cluster.is_some()
                && !matches!(overlay.expose, ExposeSpec::NodePort { .. })
            {
                v.error(
                    &at("kind_cluster"),
                    "needs `expose: {type: node-port}` to reach the server from the host",
                );
            }
            if let Some(kind) = &overlay.kind_cluster {
                v.dns_label(&at("kind_cluster.name"), &kind.name, 0);
                if !(1..=65535).contains(&kind.host_port) {
                    v.error(
                        &at("kind_cluster.host_port"),
                        format!("{} is not a port", kind.host_port),
                    );
                }
            }
            if overlay.autoscaling != AutoscalingKind::None && !overlay.worker_replicas.is_empty() {
                v.error(
                    &at("worker_replicas"),
                    "the autoscaler sets the replicas; set worker_pools[].autoscaling bounds instead",
                );
            }
            if overlay.worker_credentials && !self.worker_pools.iter().any(|p| p.git_credentials) {
                v.error(
                    &at("worker_credentials"),
                    "no worker pool sets git_credentials, so the credentials would reach nothing",
                );
            }
            if overlay.webhooks.any() {
                v.webhooks(self, overlay, &at("webhooks"));
            }
            if let Some(resources) = &overlay.server_resources {
                v.resources(&at("server_resources"), resources);
            }
            for name in overlay.pool_sizes.keys() {
                let field = |f: &str| at(&format!("pool_sizes.{name}.{f}"));
                match self.overlay_pool(overlay, name) {
                    None => v.error(
                        &at(&format!("pool_sizes.{name}")),
                        format!("no worker pool is named `{name}`"),
                    ),
                    Some(pool) => v.pool_sizes(&field, &pool),
                }
            }
            for (pool, replicas) in &overlay.worker_replicas {
                match self.pool(pool) {
                    None => v.error(
                        &at(&format!("worker_replicas.{pool}")),
                        format!("no worker pool is named `{pool}`"),
                    ),
                    Some(_) if *replicas < 0 => v.error(
                        &at(&format!("worker_replicas.{pool}")),
                        "must not be negative",
                    ),
                    Some(_) => {}
                }
            }
        }
        v.finish()
    }
}

/// Parses `ADDRESS/PREFIX` (IPv4 or IPv6) into the address and prefix length.
pub fn parse_cidr(cidr: &str) -> Result<(std::net::IpAddr, u8), String> {
    let bad = || format!("`{cidr}` is not a CIDR such as 10.0.0.0/8 or fd00::/8");
    let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let address: std::net::IpAddr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((address, prefix))
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn finish(self) -> Result<(), SpecErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(self.errors))
        }
    }

    /// A DNS-1123 label; `prefix_len` counts a prefix the name will get.
    fn dns_label(&mut self, field: &str, value: &str, prefix_len: usize) {
        let re = Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").unwrap();
        if !re.is_match(value) {
            self.error(
                field,
                format!("`{value}` is not a DNS label (lowercase letters, digits, `-`)"),
            );
        } else if value.len() + prefix_len > 63 {
            self.error(
                field,
                format!("`{value}` is too long: names are at most 63 characters with their prefix"),
            );
        }
    }

    fn dns_subdomain(&mut self, field: &str, value: &str) {
        let re = Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
            .unwrap();
        if !re.is_match(value) || value.len() > 253 {
            self.error(field, format!("`{value}` is not a DNS name"));
        }
    }

    fn label_value(&mut self, field: &str, value: &str) {
        let re = Regex::new(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$").unwrap();
        if !re.is_match(value) {
            self.error(
                field,
                format!("`{value}` must be letters, digits, `-_.`, at most 63"),
            );
        }
    }

    fn platform_key(&mut self, field: &str, key: &str) {
        let re = Regex::new(r"^[A-Za-z][A-Za-z0-9_.-]*$").unwrap();
        if !re.is_match(key) {
            self.error(field, format!("`{key}` is not a platform property name"));
        }
    }

    fn instance_name(&mut self, field: &str, name: &str) {
        if let Err(message) = buildkube_config::check_instance_name(name) {
            self.error(field, message);
        }
    }

    fn image_reference(&mut self, field: &str, reference: &str) {
        let re = Regex::new(
            r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$",
        )
        .unwrap();
        if !re.is_match(reference) {
            self.error(field, format!("`{reference}` is not an image reference"));
        } else if !reference.contains(':') || reference.ends_with(":latest") {
            self.error(
                field,
                format!("`{reference}` must pin a tag other than latest"),
            );
        }
    }

    fn byte_size(&mut self, field: &str, value: &str) -> Option<u64> {
        match buildkube_config::parse_byte_size(value) {
            Ok(bytes) => Some(bytes),
            Err(message) => {
                self.error(field, message);
                None
            }
        }
    }

    fn quantity_bytes(&mut self, field: &str, value: &str) -> Option<u64> {
        match quantity_to_bytes(value) {
            Some(bytes) => Some(bytes),
            None => {
                self.error(
                    field,
                    format!("`{value}` is not a Kubernetes quantity of bytes (e.g. 512Mi, 20Gi)"),
                );
                None
            }
        }
    }

    /// Webhook jobs run on the first instance, in a pool that runs steps;
    /// cloning over SSH needs the workers' SSH key there.
    fn webhooks(&mut self, spec: &StackSpec, overlay: &OverlaySpec, at: &str) {
        // No instance at all is reported on its own.
        let Some(instance) = spec.instances.first() else {
            return;
        };
        let pools: Vec<&WorkerPoolSpec> = spec
            .worker_pools
            .iter()
            .filter(|pool| pool.jobs && &pool.instance == instance)
            .collect();
        if pools.is_empty() {
            self.error(
                at,
                format!(
                    "webhook jobs run on instance `{instance}` (the first), and no worker pool \
                     of it sets `jobs`: their steps would never run"
                ),
            );
        } else if overlay.webhooks.clone_url == CloneUrlSpec::Ssh
            && !(overlay.worker_credentials && pools.iter().any(|pool| pool.git_credentials))
        {
            self.error(
                &format!("{at}.clone_url"),
                "`ssh` needs the workers' SSH key: set this overlay's worker_credentials and \
                 git_credentials on a pool with `jobs`, or clone over `https`",
            );
        }
    }

    /// A pool's sizes: the work directory holds the cache and, for each
    /// running action, its outputs, stdout and stderr.
    fn pool_sizes(&mut self, at: &dyn Fn(&str) -> String, pool: &WorkerPoolSpec) {
        if pool.concurrency == 0 {
            self.error(&at("concurrency"), "must be at least 1");
        }
        let cache = self.byte_size(&at("cache_max_size"), &pool.cache_max_size);
        let work = self.quantity_bytes(&at("work_dir_size"), &pool.work_dir_size);
        let output = self.byte_size(&at("max_output_size"), &pool.max_output_size);
        let stdio = self.byte_size(&at("max_stdio_size"), &pool.max_stdio_size);
        if stdio == Some(0) {
            self.error(&at("max_stdio_size"), "must be at least 1 byte");
        }
        self.quantity_bytes(&at("tmp_size"), &pool.tmp_size);
        self.quantity_bytes(&at("home_size"), &pool.home_size);
        if let (Some(cache), Some(work), Some(output), Some(stdio)) = (cache, work, output, stdio) {
            let needed = (pool.concurrency as u64)
                .checked_mul(output.saturating_add(stdio.saturating_mul(2)))
                .and_then(|actions| actions.checked_add(cache));
            if needed.is_none_or(|needed| needed > work) {
                self.error(
                    &at("work_dir_size"),
                    format!(
                        "{} is less than cache_max_size {} + concurrency {} × (max_output_size {} \
                         + 2 × max_stdio_size {}) = {}: a full work directory would get the pod \
                         evicted with every action on it",
                        pool.work_dir_size,
                        pool.cache_max_size,
                        pool.concurrency,
                        pool.max_output_size,
                        pool.max_stdio_size,
                        needed.map_or("more than 16 EiB".into(), human_bytes),
                    ),
                );
            }
        }
        self.resources(&at("resources"), &pool.resources);
    }

    fn cpu(&mut self, field: &str, value: &str) {
        if !Regex::new(r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$")
            .unwrap()
            .is_match(value)
            || cpu_millis(value) == Some(0)
        {
            self.error(
                field,
                format!("`{value}` is not a CPU quantity (e.g. 500m, 2)"),
            );
        }
    }

    fn resources(&mut self, at: &str, resources: &ResourcesSpec) {
        self.cpu(&format!("{at}.cpu_request"), &resources.cpu_request);
        let request =
            self.quantity_bytes(&format!("{at}.memory_request"), &resources.memory_request);
        let limit = self.quantity_bytes(&format!("{at}.memory_limit"), &resources.memory_limit);
        if let (Some(request), Some(limit)) = (request, limit) {
            if request > limit {
                self.error(
                    &format!("{at}.memory_request"),
                    format!(
                        "{} exceeds memory_limit {}",
                        resources.memory_request, resources.memory_limit
                    ),
                );
            }
        }
        if let Some(cpu_limit) = &resources.cpu_limit {
            self.cpu(&format!("{at}.cpu_limit"), cpu_limit);
            if let (Some(request), Some(limit)) =
                (cpu_millis(&resources.cpu_request), cpu_millis(cpu_limit))
            {
                if request > limit {
                    self.error(
                        &format!("{at}.cpu_request"),
                        format!("{} exceeds cpu_limit {cpu_limit}", resources.cpu_request),
                    );
                }
            }
        }
    }
}

/// Bytes of a Kubernetes quantity such as `20Gi`, `500M` or `1024`.
pub fn quantity_to_bytes(value: &str) -> Option<u64> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Bytes in binary units, e.g. `36GiB`, `1536MiB`, `100B`.
pub fn human_bytes(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

fn cpu_millis(value: &str) -> Option<u64> {
    if let Some(millis) = value.strip_suffix('m') {
        return millis.parse().ok();
    }
    let cores: f64 = value.parse().ok()?;
    Some((cores * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_valid() {
        StackSpec::default().validate().unwrap();
    }

    #[test]
    fn default_spec_round_trips_through_yaml() {
        let spec = StackSpec::default();
        let text = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(StackSpec::from_yaml("default.yaml", &text).unwrap(), spec);
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_to_bytes("20Gi"), Some(20 << 30));
        assert_eq!(quantity_to_bytes("5G"), Some(5_000_000_000));
        assert_eq!(quantity_to_bytes("1.5Gi"), None);
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("2"), Some(2000));
    }
}
