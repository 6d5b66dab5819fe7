# shellcheck shell=bash
# `up` (idempotent: starts what is stopped, replaces a half-made twin) and `down` (always cleans).

build() {
    [ "${TWIN_BUILD:-1}" = 0 ] && return
    local -a args=(build --locked --bins -p services -p producer -p consumer -p purger -p gateway -p eventsctl)
    [ "$TWIN_PROFILE" = release ] && args+=(--release)
    say "building the binaries (cargo ${args[*]})"
    (cd "$root" && cargo "${args[@]}" --quiet) || die "cargo build failed"
}

cmd_up() {
    if have_state; then
        load_state
        say "the local twin in $TWIN_DIR exists: starting whatever is stopped"
        start_all
        print_summary
        return
    fi
    if twin_exists; then
        say "$TWIN_DIR was left half-made by an earlier local-up: removing it, then starting afresh"
        cmd_down
    fi
    # Servers and tools, installed when missing (the same script ./scripts/test runs).
    if [ "${TWIN_BOOTSTRAP:-1}" != 0 ]; then
        local -a boot=()
        [ "${NATS:-0}" = 1 ] && boot+=(--nats)
        "$root/scripts/bootstrap" "${boot[@]}" || die "could not install what the twin needs (scripts/bootstrap)"
    fi
    command -v python3 >/dev/null || die "python3 is needed (ports, URLs)"
    TWIN_PROFILE=${TWIN_PROFILE:-debug}
    case "$TWIN_PROFILE" in debug | release) ;; *) die "TWIN_PROFILE must be debug or release" ;; esac
    build
    BIN_DIR=${TWIN_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/$TWIN_PROFILE}
    local b
    for b in migrate producer consumer purger gateway eventsctl; do
        [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: build it (cargo build --bins) or unset TWIN_BUILD"
    done

    mkdir -p "$TWIN_DIR"/{logs,run}
    : >"$TWIN_DIR/.pgevents-twin"
    : >"$(state_file)"
    chmod 600 "$(state_file)" # it holds the generated passwords
    save_var BIN_DIR "$BIN_DIR"
    save_var TWIN_PROFILE "$TWIN_PROFILE"
    # No default passwords: unset ones are generated, and kept in the state file.
    POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-$(new_secret)}
    local used=()

    PG_DIR='' PG_SOCK=''
    if [ -n "${DATABASE_URL:-}" ]; then
        PG_MANAGED=0
        PG_BINDIR=$(dirname "$(command -v psql || die "psql is needed")")
        OWNER_URL=$DATABASE_URL
        PG_PORT=
    else
        PG_MANAGED=1
        PG_BINDIR=$(pg_bindir)
        pg_place
        PG_PORT=$(pick_port "${TWIN_PG_PORT:-5432}")
        used+=("$PG_PORT")
        OWNER_URL="postgres://postgres:$POSTGRES_PASSWORD@127.0.0.1:$PG_PORT/events"
    fi
    if [ -n "${MONGODB_URI:-}" ]; then
        MONGO_KIND=external MONGO_PROGRAM='' MONGO_PORT='' MONGO_URI=$MONGODB_URI
    else
        if command -v mongod >/dev/null; then
            MONGO_KIND=mongod MONGO_PROGRAM=$(command -v mongod)
        elif [ -x "${SECANTUSD:-$root/.venv/bin/secantusd-py}" ]; then
            MONGO_KIND=secantus MONGO_PROGRAM=${SECANTUSD:-$root/.venv/bin/secantusd-py}
        elif command -v secantusd-py >/dev/null; then
            MONGO_KIND=secantus MONGO_PROGRAM=$(command -v secantusd-py)
        else
            die "no MongoDB-wire server: no mongod on PATH and no SecantusDB in .venv (./scripts/test installs it: python3 -m venv .venv && .venv/bin/pip install SecantusDB==0.7.0b3), or set MONGODB_URI"
        fi
        MONGO_PORT=$(pick_port "${TWIN_MONGO_PORT:-27017}" "${used[@]}")
        used+=("$MONGO_PORT")
        MONGO_URI="mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"
    fi
    PRODUCER_HTTP_PORT=$(pick_port 8081 "${used[@]}"); used+=("$PRODUCER_HTTP_PORT")
    CONSUMER_HTTP_PORT=$(pick_port 8082 "${used[@]}"); used+=("$CONSUMER_HTTP_PORT")
    PURGER_HTTP_PORT=$(pick_port 8083 "${used[@]}"); used+=("$PURGER_HTTP_PORT")
    GATEWAY_HTTP_PORT=$(pick_port 8084 "${used[@]}"); used+=("$GATEWAY_HTTP_PORT")
    NATS_ENABLED=0 NATS_PORTS='' NATS_CLUSTER_PORTS='' NATS_MONITOR_PORTS='' CONSUMER_NATS_HTTP_PORT=''
    if [ "${NATS:-0}" = 1 ]; then
        NATS_ENABLED=1
        nats_place "${used[@]}"
    fi

    local -A logins=([producer]=${PRODUCER_DB_PASSWORD:-$(new_secret)}
        [consumer]=${CONSUMER_DB_PASSWORD:-$(new_secret)} [purger]=${PURGER_DB_PASSWORD:-$(new_secret)})
    PRODUCER_URL=$(url_with_user "$OWNER_URL" producer "${logins[producer]}")
    CONSUMER_URL=$(url_with_user "$OWNER_URL" consumer "${logins[consumer]}")
    PURGER_URL=$(url_with_user "$OWNER_URL" purger "${logins[purger]}")

    local v
    for v in PG_MANAGED PG_BINDIR PG_DIR PG_SOCK PG_PORT OWNER_URL MONGO_KIND MONGO_PROGRAM MONGO_PORT MONGO_URI \
        PRODUCER_HTTP_PORT CONSUMER_HTTP_PORT PURGER_HTTP_PORT GATEWAY_HTTP_PORT PRODUCER_URL CONSUMER_URL \
        PURGER_URL NATS_ENABLED NATS_PORTS NATS_CLUSTER_PORTS NATS_MONITOR_PORTS CONSUMER_NATS_HTTP_PORT; do
        save_var "$v" "${!v}"
    done
    # The service settings in force now are kept for later starts.
    : >"$TWIN_DIR/config.env"
    local k
    for k in "${!KNOB_DEFAULTS[@]}"; do RECORDED_KNOBS[$k]=${KNOB_DEFAULTS[$k]}; done
    for k in "${!CALLER_KNOBS[@]}"; do RECORDED_KNOBS[$k]=${CALLER_KNOBS[$k]}; done
    for k in "${!RECORDED_KNOBS[@]}"; do
        printf 'RECORDED_KNOBS[%s]=%q\n' "$k" "${RECORDED_KNOBS[$k]}" >>"$TWIN_DIR/config.env"
    done
    read_state

    if [ "$PG_MANAGED" = 1 ]; then
        say "initialising PostgreSQL in $PG_DIR"
        pg_init
        pg_start
        owner_psql -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres \
            -c "CREATE DATABASE events" </dev/null
    fi
    say "creating the login users producer, consumer, purger"
    owner_psql -d "$OWNER_URL" -f "$root/docker/postgres/logins.sql" \
        -v producer_user=producer -v producer_password="${logins[producer]}" \
        -v consumer_user=consumer -v consumer_password="${logins[consumer]}" \
        -v purger_user=purger -v purger_password="${logins[purger]}" </dev/null \
        || die "could not create the login users (DATABASE_URL must be the database owner with CREATEROLE)"
    say "migrating"
    run_app migrate >>"$TWIN_DIR/logs/migrate.log" 2>&1 || {
        tail -n 20 "$TWIN_DIR/logs/migrate.log" >&2
        die "migrate failed"
    }
    tail -n 1 "$TWIN_DIR/logs/migrate.log" >&2
    [ "$MONGO_KIND" != external ] && mongo_start
    nats_start_all
    local svc
    for svc in consumer purger producer gateway capture-watcher; do app_start "$svc"; done
    if nats_enabled; then app_start consumer-nats; fi
    : >"$TWIN_DIR/.ready"
    print_summary
}

start_all() {
    [ "$PG_MANAGED" = 1 ] && pg_start
    [ "$MONGO_KIND" != external ] && mongo_start
    local svc
    for svc in consumer purger producer; do app_start "$svc"; done
    # A twin made before the gateway joined has no port for it.
    if [ -n "$GATEWAY_HTTP_PORT" ]; then app_start gateway; fi
    app_start capture-watcher
    if nats_enabled; then nats_start_all; app_start consumer-nats; fi
}

cmd_down() {
    if ! twin_exists; then
        say "no local twin in $TWIN_DIR: nothing to stop"
        return 0
    fi
    if [ ! -e "$TWIN_DIR/.pgevents-twin" ] && [[ $TWIN_DIR != "$root/.local/"* ]]; then
        die "$TWIN_DIR is not a local twin's directory (no .pgevents-twin): not touching it"
    fi
    read_state
    local f svc
    # The services stop side by side (each finishes its in-flight work), then the servers. Every
    # pid file counts, also those of a twin whose `up` did not finish.
    for f in "$TWIN_DIR"/run/*.pid; do
        [ -e "$f" ] || continue
        svc=$(basename "$f" .pid)
        [ "$svc" = mongo ] || app_stop "$svc" &
    done
    wait
    # The data is deleted next, so there is nothing for a clean MongoDB shutdown to save.
    local signal=KILL
    [ "${TWIN_KEEP:-0}" = 1 ] && signal=TERM
    mongo_stop "$signal"
    if [ "$PG_MANAGED" = 1 ] && [ -d "$PG_DIR/data" ]; then
        pg_stop fast
        # pg_ctl could not stop it (a broken data directory): the postmaster goes anyway.
        local pgpid
        pgpid=$(head -n 1 "$PG_DIR/data/postmaster.pid" 2>/dev/null || true)
        if [ -n "$pgpid" ] && kill -0 "$pgpid" 2>/dev/null; then stop_pid "$pgpid" KILL 10; fi
    fi
    [ "${TWIN_KEEP:-0}" = 1 ] && { say "kept $TWIN_DIR (TWIN_KEEP=1)"; return 0; }
    # The cluster and its socket may live outside the twin's directory (see pg_place).
    case "$PG_DIR" in "" | "$TWIN_DIR"/*) ;; *) [[ $PG_DIR == */pgevents-twin-pg.* ]] && rm -rf "$PG_DIR" ;; esac
    case "$PG_SOCK" in "" | "$PG_DIR"/* | "$TWIN_DIR"/*) ;; *) [[ $PG_SOCK == */pgevents-twin-sock.* ]] && rm -rf "$PG_SOCK" ;; esac
    rm -rf "$TWIN_DIR"
    say "the local twin is down; removed $TWIN_DIR"
}
