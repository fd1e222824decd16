#!/usr/bin/env bash
# Starts PostgreSQL and Redis on 127.0.0.1 for the storage tests, creates the
# test role and database, and prints the `export` lines of
# BUILDKUBE_TEST_POSTGRES_URL and BUILDKUBE_TEST_REDIS_URL on stdout.
# Needs root and `apt-get install -y postgresql redis-server` (Debian 12):
#   eval "$(bash .ci/test-stores.sh)"
set -euo pipefail
exec 3>&1 1>&2
_pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^$_pg_version main "; then
  pg_createcluster "$_pg_version" main
fi
if ! pg_lsclusters -h | grep -q "^$_pg_version main .* online"; then
  pg_ctlcluster "$_pg_version" main start
fi
_pg_port=$(pg_lsclusters -h | awk -v v="$_pg_version" '$1 == v && $2 == "main" { print $3 }')
su postgres -c "psql -p $_pg_port -v ON_ERROR_STOP=1 -q" <<SQL
SELECT 'CREATE ROLE buildkube_test LOGIN PASSWORD ''buildkube_test'''
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'buildkube_test') \gexec
SELECT 'CREATE DATABASE buildkube_test OWNER buildkube_test'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'buildkube_test') \gexec
SQL
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
echo "export BUILDKUBE_TEST_POSTGRES_URL=postgres://buildkube_test:buildkube_test@127.0.0.1:$_pg_port/buildkube_test" >&3
echo "export BUILDKUBE_TEST_REDIS_URL=redis://127.0.0.1:6379/" >&3
