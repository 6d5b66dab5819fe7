# shellcheck shell=bash
# The twin's PostgreSQL cluster (initdb, pg_ctl), run as the `postgres` OS user when we are root.

pg_bindir() {
    if [ -n "${TEST_PG_BINDIR:-}" ]; then echo "$TEST_PG_BINDIR"; return; fi
    local dir
    if command -v pg_config >/dev/null; then
        dir=$(pg_config --bindir)
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return; fi
    fi
    dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && { echo "$dir"; return; }
    die "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install -y postgresql (./scripts/test does it), or set DATABASE_URL"
}
# The PostgreSQL server must not run as root: when we are root it runs as the `postgres` OS user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
pg_owns() {
    if [ "$(id -u)" = 0 ]; then chown postgres: "$@"; fi
}

pg_ctl_do() { as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" "$@"; }
pg_running() {
    [ "$PG_MANAGED" = 1 ] && pg_ctl_do status >/dev/null 2>&1
}
# Where the cluster lives: in the twin's directory, unless the server's OS user cannot reach it
# (a checkout under /root, say) or the socket path would be too long for Unix sockets.
pg_place() {
    PG_DIR=$TWIN_DIR/pg
    if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$TWIN_DIR" 2>/dev/null; then
        PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pgevents-twin-pg.XXXXXX")
    fi
    mkdir -p "$PG_DIR"
    PG_SOCK=$PG_DIR/sock
    if [ ${#PG_SOCK} -gt 80 ]; then PG_SOCK=$(mktemp -d "${TMPDIR:-/tmp}/pgevents-twin-sock.XXXXXX"); fi
}
pg_sock_dir() {
    mkdir -p "$PG_SOCK"
    chmod 700 "$PG_SOCK"
    pg_owns "$PG_SOCK"
}
pg_init() {
    pg_sock_dir
    printf '%s\n' "$POSTGRES_PASSWORD" >"$PG_DIR/pwfile"
    chmod 600 "$PG_DIR/pwfile"
    pg_owns "$PG_DIR" "$PG_DIR/pwfile"
    if ! as_pg env LC_ALL=C "$PG_BINDIR/initdb" -D "$PG_DIR/data" -U postgres \
        --pwfile="$PG_DIR/pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C --no-sync >"$PG_DIR/initdb.log" 2>&1; then
        cat "$PG_DIR/initdb.log" >&2
        die "initdb failed"
    fi
    rm -f "$PG_DIR/pwfile"
}
pg_start() {
    if pg_running; then say "postgres is already running (port $PG_PORT)"; return; fi
    port_accepts "$PG_PORT" && die "port $PG_PORT is taken by another process: the twin's postgres cannot come back on it"
    pg_sock_dir
    # pg_ctl detaches the server; its output goes to postgres.log.
    if ! pg_ctl_do -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-p $PG_PORT -k $PG_SOCK -c listen_addresses=127.0.0.1 -c max_connections=200" \
        start </dev/null >"$PG_DIR/pg_ctl.log" 2>&1; then
        tail -n 20 "$PG_DIR/postgres.log" >&2 || true
        die "postgres did not start (log: $PG_DIR/postgres.log)"
    fi
    say "postgres is up on 127.0.0.1:$PG_PORT"
}
pg_stop() { # mode: fast (clean) or immediate (crash)
    if pg_running; then
        pg_ctl_do -m "${1:-fast}" -w -t 60 stop </dev/null >"$PG_DIR/pg_ctl.log" 2>&1 || true
        say "postgres stopped"
    else
        say "postgres is not running"
    fi
}
owner_psql() { "$PG_BINDIR/psql" -X -v ON_ERROR_STOP=1 -q "$@"; }

