#!/usr/bin/env bash
# Builds the images the podman tests play, from this checkout, with no
# daemon and no registry (what .ci/run and the tests run; see README.md):
#   1. localhost/buildkube-debian:bookworm: Debian bookworm made with
#      debootstrap and committed with buildah (built once, then reused);
#   2. `cargo build --release` of buildkube-server and buildkube-worker;
#   3. images/Dockerfile's runtime stages on that base with those binaries
#      (targets server-prebuilt and worker-prebuilt): the images users get
#      from the multi-stage build, but for how the binaries were compiled;
#   4. the test-only images of tests/podman/Containerfile: the worker on a
#      C/C++ toolchain (the fixture compiles C++), PostgreSQL and Redis.
# Everything lives in the project's own container storage under
# target/podman (containers.conf and storage.conf written there), never in
# /etc or /var/lib/containers. Safe to run concurrently: one build at a time.
#
# Usage: bash tests/podman/build-images.sh   (as root; needs buildah, podman,
# runc, debootstrap: apt-get install -y buildah podman runc debootstrap)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
podman_dir="$target_dir/podman"
mirror="${BUILDKUBE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base=localhost/buildkube-debian:bookworm
tag=local

for tool in buildah podman runc debootstrap flock; do
  command -v "$tool" >/dev/null || {
    echo "build-images.sh: \`$tool\` is not installed: apt-get install -y buildah podman runc debootstrap" >&2
    exit 1
  }
done

mkdir -p "$podman_dir"
exec 9>"$podman_dir/build.lock"
flock 9

# The project-local podman configuration (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF).
for conf in containers.conf storage.conf; do
  sed "s|@PODMAN_DIR@|$podman_dir|g" "$repo/tests/podman/$conf.in" >"$podman_dir/$conf"
done
cp "$repo/tests/podman/hosts" "$podman_dir/hosts"
export CONTAINERS_CONF="$podman_dir/containers.conf"
export CONTAINERS_STORAGE_CONF="$podman_dir/storage.conf"

elapsed() { echo "build-images.sh: $1 in $((SECONDS - $2)) s" >&2; }

if ! podman image exists "$base"; then
  started=$SECONDS
  rootfs="$podman_dir/bookworm-rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$podman_dir/debootstrap.log" 2>&1 || {
    tail -20 "$podman_dir/debootstrap.log" >&2
    exit 1
  }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  container="$(buildah from scratch)"
  mount="$(buildah mount "$container")"
  tar -C "$rootfs" -c . | tar -C "$mount" -x
  buildah umount "$container" >/dev/null
  buildah config --cmd /bin/bash "$container"
  buildah commit -q --rm "$container" "$base" >/dev/null
  rm -rf "$rootfs"
  elapsed "made $base with debootstrap" "$started"
fi

# BUILDKUBE_IMAGES_BIN_DIR packages binaries built elsewhere (e.g. a quicker
# debug build while iterating); by default, the release build of this checkout.
bin_dir="${BUILDKUBE_IMAGES_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
  started=$SECONDS
  (cd "$repo" && cargo build --release --locked --bin buildkube-server --bin buildkube-worker)
  elapsed "cargo build --release" "$started"
  bin_dir="$target_dir/release"
fi
dist="$podman_dir/dist"
mkdir -p "$dist"
for bin in buildkube-server buildkube-worker; do
  cp -p "$bin_dir/$bin" "$dist/$bin"
done

# The images are rebuilt only when what goes into them changed: the
# binaries, the Dockerfile, the Containerfile and its files, this script and
# the base. (No per-step layer cache: with the vfs driver every cached step
# is a full copy of the image.)
images=(server worker-debian worker test-toolchain worker-toolchain test-postgres test-redis)
key="$({
  sha256sum "$dist"/* "$repo/images/Dockerfile" "$repo"/tests/podman/{Containerfile,postgres-entrypoint.sh,build-images.sh}
  podman image inspect --format '{{.Id}}' "$base"
} | sha256sum | cut -d' ' -f1)"
key_file="$podman_dir/images.key"
up_to_date=true
for image in "${images[@]}"; do
  podman image exists "localhost/buildkube-$image:$tag" || up_to_date=false
done
if $up_to_date && [ "$(cat "$key_file" 2>/dev/null)" = "$key" ]; then
  echo "build-images.sh: images up to date ($key)" >&2
  exit 0
fi
rm -f "$key_file"

build() { # TARGET IMAGE [buildah args...]
  local target="$1" image="$2"
  shift 2
  local started=$SECONDS
  buildah build --quiet --network host -f "$repo/images/Dockerfile" \
    --build-arg RUNTIME_IMAGE="$base" --build-context dist="$dist" \
    --target "$target" -t "$image" "$@" "$repo" >/dev/null
  elapsed "built $image (--target $target)" "$started"
}
build worker-debian "localhost/buildkube-worker-debian:$tag"
build server-prebuilt "localhost/buildkube-server:$tag"
build worker-prebuilt "localhost/buildkube-worker:$tag" \
  --build-arg WORKER_BASE="localhost/buildkube-worker-debian:$tag"

test_build() { # TARGET IMAGE [buildah args...]
  local target="$1" image="$2"
  shift 2
  local started=$SECONDS
  buildah build --quiet --network host -f "$repo/tests/podman/Containerfile" \
    --build-arg BASE="$base" --target "$target" -t "$image" "$@" "$repo/tests/podman" >/dev/null
  elapsed "built $image (tests/podman/Containerfile --target $target)" "$started"
}
test_build toolchain "localhost/buildkube-test-toolchain:$tag" \
  --build-arg WORKER_DEBIAN="localhost/buildkube-worker-debian:$tag"
build worker-prebuilt "localhost/buildkube-worker-toolchain:$tag" \
  --build-arg WORKER_BASE="localhost/buildkube-test-toolchain:$tag"
test_build postgres "localhost/buildkube-test-postgres:$tag"
test_build redis "localhost/buildkube-test-redis:$tag"

echo "$key" >"$key_file"
# Dangling layers of earlier builds: the vfs driver stores each in full.
buildah rmi --prune >/dev/null 2>&1 || true
podman images --filter reference='localhost/buildkube-*' >&2
