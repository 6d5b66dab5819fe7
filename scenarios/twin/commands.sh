# shellcheck shell=bash
# The everyday commands: start, stop, status, run, psql, mongosh, logs, env.

check_service() {
    case "$1" in
        postgres)
            [ "$PG_MANAGED" = 1 ] || die "postgres is not managed by the twin (DATABASE_URL was given)" ;;
        mongo)
            [ "$MONGO_KIND" != external ] || die "mongo is not managed by the twin (MONGODB_URI was given)" ;;
        producer | consumer | purger | gateway | capture-watcher) ;;
        # Members of the consumer group `orders-group` (16 partitions), started on demand.
        group-member-[1-9]) ;;
        nats1 | nats2 | nats3 | consumer-nats)
            nats_enabled || die "$1: this twin has no NATS (start it with NATS=1 scenarios/local-up)" ;;
        *) die "unknown service '$1' (postgres, mongo, producer, consumer, purger, gateway, capture-watcher, group-member-1…9)" ;;
    esac
}
cmd_start() {
    [ $# -gt 0 ] || die "usage: scenarios/local start SERVICE..."
    load_state
    local svc
    for svc in "$@"; do check_service "$svc"; done
    for svc in "$@"; do
        case "$svc" in
            postgres) pg_start ;; mongo) mongo_start ;; nats[123]) nats_start "$svc" ;; *) app_start "$svc" ;;
        esac
    done
}
cmd_stop() { # kill=1 for SIGKILL
    local how=$1
    shift
    [ $# -gt 0 ] || die "usage: scenarios/local stop SERVICE..."
    load_state
    local svc
    for svc in "$@"; do check_service "$svc"; done
    for svc in "$@"; do
        case "$svc:$how" in
            postgres:clean) pg_stop fast ;;
            postgres:kill) pg_stop immediate ;;
            mongo:clean) mongo_stop TERM ;;
            mongo:kill) mongo_stop KILL ;;
            nats[123]:clean) nats_stop "$svc" TERM ;;
            nats[123]:kill) nats_stop "$svc" KILL ;;
            *:clean) app_stop "$svc" TERM ;;
            *:kill) app_stop "$svc" KILL ;;
        esac
    done
}

service_state() {
    case "$1" in
        postgres)
            if [ "$PG_MANAGED" != 1 ]; then echo "external"
            elif pg_running; then echo "running"; else echo "stopped"; fi ;;
        mongo)
            if [ "$MONGO_KIND" = external ]; then echo "external"
            elif alive mongo; then echo "running"; else echo "stopped"; fi ;;
        *) if alive "$1"; then echo "running"; else echo "stopped"; fi ;;
    esac
}
cmd_status() {
    load_state
    printf '%-15s %-9s %-8s %s\n' SERVICE STATE PID ADDRESS
    local pgpid=
    [ "$PG_MANAGED" = 1 ] && pgpid=$(head -n 1 "$PG_DIR/data/postmaster.pid" 2>/dev/null || true)
    printf '%-15s %-9s %-8s %s\n' postgres "$(service_state postgres)" "${pgpid:--}" "${PG_PORT:+127.0.0.1:$PG_PORT}"
    printf '%-15s %-9s %-8s %s\n' mongo "$(service_state mongo)" "$(live_pid mongo)" "${MONGO_PORT:+127.0.0.1:$MONGO_PORT ($MONGO_KIND)}"
    local svc
    local port
    for svc in "${APPS[@]}"; do
        port=$(http_port "$svc")
        printf '%-15s %-9s %-8s %s\n' "$svc" "$(service_state "$svc")" "$(live_pid "$svc")" \
            "${port:+http://127.0.0.1:$port/healthz}"
    done
    # Group members, once started (scenarios/local start group-member-1 …).
    for svc in group-member-{1..9}; do
        [ -f "$TWIN_DIR/run/$svc.pid" ] || continue
        printf '%-15s %-9s %-8s %s
' "$svc" "$(service_state "$svc")" "$(live_pid "$svc")" \
            "group orders-group (16 partitions)"
    done
    nats_enabled || return 0
    for svc in "${NATS_NODES[@]}"; do
        printf '%-15s %-9s %-8s %s\n' "$svc" "$(service_state "$svc")" "$(live_pid "$svc")" \
            "nats://127.0.0.1:$(nats_client_port "$svc")"
    done
    printf '%-15s %-9s %-8s %s\n' consumer-nats "$(service_state consumer-nats)" "$(live_pid consumer-nats)" \
        "http://127.0.0.1:$CONSUMER_NATS_HTTP_PORT/healthz (stream EVENTS)"
}

print_summary() {
    local mongosh_cmd=mongosh
    [ -x "$root/.tools/node_modules/.bin/mongosh" ] && mongosh_cmd=.tools/node_modules/.bin/mongosh
    cat >&2 <<EOF

The local twin is up (state, data and logs in ${TWIN_DIR#"$root"/}).
  $(cmd_status | sed '1!s/^/  /')

Connect:
  psql "$(printf '%s' "$OWNER_URL" | sed -E 's#^([a-z]+://[^:/@]*):[^@]*@#\1:<password>@#')"   (the password: grep OWNER_URL ${TWIN_DIR#"$root"/}/state.env)
  $mongosh_cmd "$(uri_with_db "$MONGO_URI" "$(knob MONGODB_DATABASE consumer)")"
  (or: scenarios/local psql   /   scenarios/local mongosh)
Next, try:
  scenarios/local eventsctl status                 # consumers, lag, the table, what holds purging back
  scenarios/local psql -c 'select count(*) from events'
  scenarios/local mongosh --quiet --eval 'db.receivedEvents.countDocuments()'
  scenarios/local stop consumer; scenarios/local eventsctl lag; scenarios/local start consumer
  scenarios/local eventsctl tail --from latest --follow
  scenarios/local start group-member-1 group-member-2   # a consumer group (collection groupEvents)
Live push: http://127.0.0.1:${GATEWAY_HTTP_PORT:-8084}/?topic=courses (the gateway's demo page)
Logs: scenarios/local logs consumer [-f]      Everything down: scenarios/local-down
EOF
    if nats_enabled; then
        cat >&2 <<EOF
NATS JetStream (NATS=1): consumer-nats publishes every event to the stream EVENTS on $(nats_urls)
  scenarios/local kill nats2; scenarios/local start nats2     # a node goes and comes back
  scenarios/local eventsctl lag                               # consumer and consumer-nats side by side
EOF
    fi
}

cmd_run() {
    [ $# -gt 0 ] || die "usage: scenarios/local run SERVICE [ARGS]"
    load_state
    RUN_EXEC=1 run_app "$@"
}

cmd_psql() {
    load_state
    local url=$OWNER_URL
    if [ "${1:-}" = --as ]; then
        case "${2:-}" in
            producer) url=$PRODUCER_URL ;; consumer) url=$CONSUMER_URL ;; purger) url=$PURGER_URL ;;
            *) die "psql --as producer|consumer|purger" ;;
        esac
        shift 2
    fi
    exec "$PG_BINDIR/psql" -X "$url" "$@"
}
cmd_mongosh() {
    load_state
    local db
    db=$(knob MONGODB_DATABASE consumer)
    exec "$(mongosh_bin)" --norc "$(uri_with_db "$MONGO_URI" "$db")" "$@"
}
# eventsctl with the owner's URL and the twin's MongoDB (the consumer's database).
cmd_eventsctl() {
    load_state
    [ -x "$BIN_DIR/eventsctl" ] || die "$BIN_DIR/eventsctl is missing: cargo build --bins -p eventsctl"
    DATABASE_URL=$OWNER_URL MONGODB_URI=$MONGO_URI MONGODB_DATABASE=$(knob MONGODB_DATABASE consumer) \
        exec "$BIN_DIR/eventsctl" "$@"
}
cmd_logs() {
    [ $# -ge 1 ] || die "usage: scenarios/local logs SERVICE [-f]"
    load_state
    local log
    case "$1" in
        postgres) log=$PG_DIR/postgres.log ;;
        mongo) log=$TWIN_DIR/mongo/mongo.log ;;
        producer | consumer | purger | gateway | capture-watcher | consumer-nats | group-member-[1-9] | migrate) log=$TWIN_DIR/logs/$1.log ;;
        nats1 | nats2 | nats3) log=$TWIN_DIR/nats/$1.log ;;
        *) die "unknown service '$1'" ;;
    esac
    [ -f "$log" ] || die "no log yet: $log"
    if [ "${2:-}" = -f ]; then exec tail -n 40 -f "$log"; else tail -n 40 "$log"; fi
}
cmd_env() {
    [ $# -eq 1 ] || die "usage: scenarios/local env SERVICE"
    load_state
    local line
    service_env "$1" | grep -v -e '^PATH=' -e '^HOME=' | while IFS= read -r line; do
        printf '%s=%q\n' "${line%%=*}" "${line#*=}"
    done
}

