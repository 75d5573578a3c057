#!/usr/bin/env bash
# A throw-away PostgreSQL server for the distributed-search test (tests/test_search.py).
#
#   .ci/postgres.sh [ENV_FILE]         start a server; write `export TIMM_DCL_TEST_POSTGRES=...` to ENV_FILE
#   . .ci/postgres.sh [ENV_FILE]       the same, and export the variables into the calling shell
#   .ci/postgres.sh --stop [ENV_FILE]  stop the server that ENV_FILE describes and delete its files
#
# ENV_FILE defaults to ${TMPDIR:-/tmp}/timm-dcl-postgres.env. PostgreSQL comes from Debian's
# packages (apt-get install postgresql) when no server binaries are found. The server listens
# on 127.0.0.1 only, on a free port, with its data directory, socket and log in a fresh temp
# directory, and runs as an unprivileged user (postgres refuses to run as root): the `postgres`
# system user when this script runs as root, else the calling user. Exit status 0 means the URL
# in ENV_FILE works; otherwise the test that needs it skips and says why.

# Sourced: run the real work in a child bash so that a failure never exits the caller's shell.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    _timm_dcl_pg_env="${1:-${TMPDIR:-/tmp}/timm-dcl-postgres.env}"
    if bash "${BASH_SOURCE[0]}" "$_timm_dcl_pg_env" >/dev/null; then  # the URL holds a password: not in logs
        # shellcheck disable=SC1090
        . "$_timm_dcl_pg_env"
    else
        echo "postgres.sh: no PostgreSQL server; the PostgreSQL test will be skipped" >&2
    fi
    unset _timm_dcl_pg_env
    return 0
fi

set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

if [[ "${1:-}" == "--stop" ]]; then
    env_file="${2:-${TMPDIR:-/tmp}/timm-dcl-postgres.env}"
    [[ -f "$env_file" ]] || die "no $env_file: nothing to stop"
    # shellcheck disable=SC1090
    . "$env_file"
    : "${TIMM_DCL_TEST_POSTGRES_DIR:?$env_file does not name the server directory}"
    pg_bin="$TIMM_DCL_TEST_POSTGRES_BIN"
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u "$TIMM_DCL_TEST_POSTGRES_USER" -- "$pg_bin/pg_ctl" -D "$TIMM_DCL_TEST_POSTGRES_DIR/data" -m fast -w stop || true
    else
        "$pg_bin/pg_ctl" -D "$TIMM_DCL_TEST_POSTGRES_DIR/data" -m fast -w stop || true
    fi
    rm -rf "$TIMM_DCL_TEST_POSTGRES_DIR" "$env_file"
    log "stopped"
    exit 0
fi

env_file="${1:-${TMPDIR:-/tmp}/timm-dcl-postgres.env}"

find_pg_bin() {
    local d
    # Debian keeps the server binaries out of PATH, one directory per major version: newest first.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && { echo "$d"; return 0; }
    done
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    return 1
}

if ! pg_bin="$(find_pg_bin)"; then
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL is not installed and installing it needs root (apt-get install postgresql)"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get to install it"
    log "installing PostgreSQL from the Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends postgresql postgresql-client >&2 \
        || die "apt-get install postgresql failed"
    pg_bin="$(find_pg_bin)" || die "postgresql is installed but initdb/pg_ctl are not found"
fi

# The server must not run as root: use the `postgres` system user (created by the Debian package).
if [[ "$(id -u)" == 0 ]]; then
    run_user=postgres
    if ! id "$run_user" >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin "$run_user" \
            || die "cannot create the postgres system user"
    fi
    as_server() { runuser -u "$run_user" -- "$@"; }
else
    run_user="$(id -un)"
    as_server() { "$@"; }
fi

base_dir="$(mktemp -d "${TMPDIR:-/tmp}/timm-dcl-pg.XXXXXX")"
chmod 755 "$base_dir"
[[ "$(id -u)" == 0 ]] && chown "$run_user" "$base_dir"
pwfile="$base_dir/pw"
password="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
( umask 077; echo "$password" > "$pwfile" )
[[ "$(id -u)" == 0 ]] && chown "$run_user" "$pwfile"

as_server "$pg_bin/initdb" -D "$base_dir/data" -U timm_dcl --pwfile="$pwfile" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$base_dir/initdb.log" 2>&1 \
    || { cat "$base_dir/initdb.log" >&2; die "initdb failed"; }
rm -f "$pwfile"

free_port() {
    python3 - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

# Another process may take the port between the probe and the start: try a few.
started=0
for _ in 1 2 3 4 5; do
    port="$(free_port)"
    if as_server "$pg_bin/pg_ctl" -D "$base_dir/data" -l "$base_dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $base_dir -c max_connections=100 -c fsync=off" \
        start >/dev/null; then
        started=1
        break
    fi
done
[[ "$started" == 1 ]] || { tail -n 20 "$base_dir/server.log" >&2 || true; die "the server did not start"; }

export PGPASSWORD="$password"
psql_bin="$pg_bin/psql"
[[ -x "$psql_bin" ]] || psql_bin="$(command -v psql)" || die "no psql client"
"$psql_bin" -h 127.0.0.1 -p "$port" -U timm_dcl -d postgres -v ON_ERROR_STOP=1 -qAt \
    -c "CREATE DATABASE timm_dcl_test" >/dev/null || die "cannot create the test database"

url="postgresql://timm_dcl:$password@127.0.0.1:$port/timm_dcl_test"
"$psql_bin" "$url" -qAt -c "SELECT 1" >/dev/null || die "the server does not answer at 127.0.0.1:$port"

umask 077
cat > "$env_file" <<EOF
export TIMM_DCL_TEST_POSTGRES='$url'
export TIMM_DCL_TEST_POSTGRES_DIR='$base_dir'
export TIMM_DCL_TEST_POSTGRES_BIN='$pg_bin'
export TIMM_DCL_TEST_POSTGRES_USER='$run_user'
EOF
log "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, database timm_dcl_test (data in $base_dir, server user $run_user); TIMM_DCL_TEST_POSTGRES in $env_file"
echo "$url"
