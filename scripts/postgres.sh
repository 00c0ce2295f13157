#!/usr/bin/env bash
# A throw-away PostgreSQL for tests and local trials, from Debian's packages.
#
#   scripts/postgres.sh install               # apt-get install postgresql when initdb is missing (root)
#   scripts/postgres.sh start DIR PORT [DB]   # new cluster in DIR, on 127.0.0.1:PORT, database DB (default mlflow)
#   scripts/postgres.sh stop DIR              # stop it (DIR is then safe to delete)
#   scripts/postgres.sh bindir                # where initdb / pg_ctl live (exit 1 if not installed)
#
# start prints the connection URI (postgresql://postgres@127.0.0.1:PORT/DB). Authentication is "trust" and
# the server listens on 127.0.0.1 only, with its socket inside DIR: fine for a test cluster, never for a
# shared one (compose.yaml's PostgreSQL has a password). Run as root, the cluster belongs to the "postgres"
# user that Debian's package creates (initdb refuses root), so DIR must be reachable by that user.
set -euo pipefail

bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$d/initdb" ]] && { echo "$d"; return 0; }
    done
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

as_owner() {  # run a PostgreSQL binary as the cluster owner
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd=${1:-}
case "$cmd" in
install)
    if bindir >/dev/null; then
        echo "PostgreSQL already installed: $(bindir)"; exit 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "PostgreSQL is not installed and installing it needs root: apt-get install postgresql" >&2; exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Debian's postinst would create and start a system cluster; we only want the binaries.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/gkd-no-main-cluster.conf
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    echo "PostgreSQL installed: $(bindir)"
    ;;
start)
    dir=${2:?usage: postgres.sh start DIR PORT [DB]}; port=${3:?usage: postgres.sh start DIR PORT [DB]}
    db=${4:-mlflow}
    bin=$(bindir) || { echo "PostgreSQL is not installed (scripts/postgres.sh install)" >&2; exit 1; }
    mkdir -p "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$dir" && chmod 700 "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
    echo "postgresql://postgres@127.0.0.1:$port/$db"
    ;;
stop)
    dir=${2:?usage: postgres.sh stop DIR}
    bin=$(bindir)
    [[ -f "$dir/data/postmaster.pid" ]] || exit 0
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    ;;
bindir)
    bindir
    ;;
*)
    sed -n '2,12p' "$0" >&2; exit 2
    ;;
esac
