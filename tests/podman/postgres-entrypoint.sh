#!/bin/bash
# The part of the official postgres image's entrypoint that the production
# overlay relies on: a first start initialises PGDATA with POSTGRES_USER
# (password POSTGRES_PASSWORD, required over TCP) and creates POSTGRES_DB.
# The server listens on all addresses, on PGPORT if set (else 5432).
set -euo pipefail
: "${PGDATA:?PGDATA is not set}" "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA"
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
    --auth-local=trust --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
  echo 'host all all all scram-sha-256' >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  psql -v ON_ERROR_STOP=1 --username="$POSTGRES_USER" --dbname=postgres \
    -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
