# Sourced by bash before every command a worker runs
# (buildkube-worker --env-script=/etc/buildkube/credentials/env.sh).
# Export what build steps need (tokens, proxies); it is stored in the
# `buildkube-worker-credentials` secret, never in an image.
#
# git inside actions: credentials and SSH key from the same secret.
export GIT_CONFIG_GLOBAL=/etc/buildkube/git/gitconfig
export HOME=/home/buildkube
#
# Examples:
# export GITHUB_TOKEN=ghp_...
# export HTTPS_PROXY=http://proxy.internal:3128
