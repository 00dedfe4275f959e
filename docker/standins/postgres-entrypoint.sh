#!/bin/sh
# Initialise $PGDATA once (UTF-8: MLflow's migrations loop on SQL_ASCII), then run the server.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    chown postgres "$pwfile"
    as_postgres initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        as_postgres pg_ctl --pgdata="$PGDATA" --wait --options="-c listen_addresses=''" start
        as_postgres psql --username="$POSTGRES_USER" --dbname=postgres --set=ON_ERROR_STOP=1 \
            --command="CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\""
        as_postgres pg_ctl --pgdata="$PGDATA" --wait stop
    fi
fi
if [ "${1:-}" = postgres ]; then
    shift
    set -- postgres -c listen_addresses='*' "$@"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"
