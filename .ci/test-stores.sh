#!/usr/bin/env bash
# Starts PostgreSQL and Redis on 127.0.0.1 for the storage tests, creates the
# test role and database, and prints the `export` lines of
# BUILDKUBE_TEST_POSTGRES_URL and BUILDKUBE_TEST_REDIS_URL on stdout.
# `stop` stops both again. Needs root and
# `apt-get install -y postgresql redis-server` (Debian 12):
#   eval "$(bash .ci/test-stores.sh)"
#   bash .ci/test-stores.sh stop
#
# The daemons must not inherit this script's stdout: it is the pipe of the
# caller's "$(...)", which would then never reach end-of-file and the caller
# would wait forever. They are started with every inherited descriptor
# pointed at their log file (or closed), and that log is shown on failure.
set -euo pipefail
exec 3>&1 1>&2

_log_dir=${BUILDKUBE_STORES_LOG_DIR:-/tmp/buildkube-test-stores}
mkdir -p "$_log_dir"
_pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
_redis_port=6379

# Runs a command that leaves a daemon behind, detached from our descriptors.
detached() {
  local log=$1
  shift
  if ! "$@" </dev/null >>"$log" 2>&1 3>&-; then
    echo "test-stores: '$*' failed; its log ($log):"
    tail -n 50 "$log"
    return 1
  fi
}

if [ "${1:-start}" = stop ]; then
  redis-cli -h 127.0.0.1 -p "$_redis_port" shutdown nosave >/dev/null 2>&1 || true
  if pg_lsclusters -h | grep -q "^$_pg_version main .* online"; then
    pg_ctlcluster "$_pg_version" main stop </dev/null 3>&- || true
  fi
  exit 0
fi

if ! pg_lsclusters -h | grep -q "^$_pg_version main "; then
  detached "$_log_dir/postgresql.log" pg_createcluster "$_pg_version" main
fi
if ! pg_lsclusters -h | grep -q "^$_pg_version main .* online"; then
  detached "$_log_dir/postgresql.log" pg_ctlcluster "$_pg_version" main start
fi
_pg_port=$(pg_lsclusters -h | awk -v v="$_pg_version" '$1 == v && $2 == "main" { print $3 }')
su postgres -c "psql -p $_pg_port -v ON_ERROR_STOP=1 -q" <<SQL 3>&-
SELECT 'CREATE ROLE buildkube_test LOGIN PASSWORD ''buildkube_test'''
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'buildkube_test') \gexec
SELECT 'CREATE DATABASE buildkube_test OWNER buildkube_test'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'buildkube_test') \gexec
SQL

if ! redis-cli -h 127.0.0.1 -p "$_redis_port" ping >/dev/null 2>&1; then
  detached "$_log_dir/redis.log" redis-server --bind 127.0.0.1 --port "$_redis_port" \
    --save '' --appendonly no --daemonize yes --logfile "$_log_dir/redis.log"
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$_redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -h 127.0.0.1 -p "$_redis_port" ping >/dev/null || {
    echo "test-stores: redis-server did not answer on 127.0.0.1:$_redis_port"
    tail -n 50 "$_log_dir/redis.log"
    exit 1
  }
fi
echo "export BUILDKUBE_TEST_POSTGRES_URL=postgres://buildkube_test:buildkube_test@127.0.0.1:$_pg_port/buildkube_test" >&3
echo "export BUILDKUBE_TEST_REDIS_URL=redis://127.0.0.1:$_redis_port/" >&3
