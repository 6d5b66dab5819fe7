# shellcheck shell=bash
# What every scenario shares: the target (the local twin, default, or docker compose), service
# control, bounded producer runs, psql and mongosh queries, and the final verification.
#
# A scenario script sources this, calls `scenario_begin`, does its story and ends with `verify`.
#
#   scenarios/s1-consumer-outage              on the local twin (a fresh one, removed afterwards,
#                                             unless one is already up: then that one is used)
#   scenarios/s1-consumer-outage --compose    on `docker compose` (started with up -d --wait)
#
# Environment: SCENARIO_TARGET=local|compose, TWIN_DIR (the twin to use or create),
# VERIFY_TIMEOUT (seconds to wait for the consumer to catch up, default 90),
# TWIN_KEEP_ON_FAILURE=1 (leave a twin this scenario started running when it fails, to look at).

set -euo pipefail

SC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SC_DIR/.." && pwd)
SCENARIO=$(basename "$0")
TARGET=${SCENARIO_TARGET:-local}
export TWIN_DIR=${TWIN_DIR:-$ROOT/.local/twin}
MONGO_DB=${MONGODB_DATABASE:-consumer}
MONGO_COLL=${MONGODB_COLLECTION:-receivedEvents}
VERIFY_TIMEOUT=${VERIFY_TIMEOUT:-90}
OWNED_TWIN=0
BG_PIDS=()
WORK=

for _arg in "$@"; do
    case "$_arg" in
        --compose) TARGET=compose ;;
        --local) TARGET=local ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) printf 'error: unknown argument %s (--local or --compose)\n' "$_arg" >&2; exit 2 ;;
    esac
done
unset _arg
case "$TARGET" in local | compose) ;; *) echo "error: SCENARIO_TARGET must be local or compose" >&2; exit 2 ;; esac

step() { printf '\n[%s %s] %s\n' "$SCENARIO" "$(date +%T)" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() {
    printf '\nFAIL %s: %s\n' "$SCENARIO" "$*" >&2
    exit 1
}
pause() { # seconds reason
    info "waiting $1s ($2)"
    sleep "$1"
}

# --- the target ----------------------------------------------------------------------------------
twin() { "$SC_DIR/local" "$@"; }
# Docker Compose v2 (`docker compose`): the scenarios use `up --wait`, `ps --status`, `logs --since`.
compose() {
    if [ -z "${COMPOSE_CHECKED:-}" ]; then
        docker compose version >/dev/null 2>&1 \
            || fail "the scenarios need Docker Compose v2 ('docker compose'); without Docker, run them on the local twin"
        COMPOSE_CHECKED=1
    fi
    docker compose -f "$ROOT/docker-compose.yml" "$@"
}

mongosh_bin() {
    if [ -x "$ROOT/.tools/node_modules/.bin/mongosh" ]; then echo "$ROOT/.tools/node_modules/.bin/mongosh"
    elif command -v mongosh >/dev/null; then command -v mongosh
    else fail "mongosh not found: npm install --prefix .tools mongosh@2 (./scripts/test does it)"; fi
}

scenario_begin() { # short description
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgevents-scenario.XXXXXX")
    trap scenario_end EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    printf '=== %s: %s (target: %s)\n' "$SCENARIO" "$1" "$TARGET"
    if [ "$TARGET" = local ]; then
        mongosh_bin >/dev/null
        if twin is-up; then
            step "using the local twin in $TWIN_DIR (starting whatever is stopped)"
            twin up >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "could not start the local twin"; }
        else
            step "starting a fresh local twin in $TWIN_DIR"
            OWNED_TWIN=1
            twin up >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "could not start the local twin"; }
        fi
    else
        step "docker compose up -d --wait producer consumer purger"
        compose up -d --wait producer consumer purger
    fi
}

scenario_end() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$rc" != 0 ] && [ "$TARGET" = local ] && twin is-up; then
        local svc
        for svc in consumer producer; do
            printf '\n--- the last lines of the %s log (%s/logs/%s.log)\n' "$svc" "$TWIN_DIR" "$svc" >&2
            tail -n 15 "$TWIN_DIR/logs/$svc.log" >&2 2>/dev/null || true
        done
    fi
    if [ "$OWNED_TWIN" = 1 ]; then
        if [ "$rc" != 0 ] && [ "${TWIN_KEEP_ON_FAILURE:-0}" = 1 ]; then
            printf '\nthe local twin stays up for a look (TWIN_KEEP_ON_FAILURE=1): scenarios/local status; scenarios/local-down\n' >&2
        else
            twin down >/dev/null 2>&1 || twin down || true
        fi
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ "$rc" = 0 ]; then printf '\nPASS %s\n' "$SCENARIO"; else printf '\nFAIL %s (exit %s)\n' "$SCENARIO" "$rc" >&2; fi
    exit "$rc"
}

# --- services ------------------------------------------------------------------------------------
svc_stop() { # service...
    info "stop $*"
    if [ "$TARGET" = local ]; then twin stop "$@" 2>&1 | sed 's/^/      /'
    else compose stop "$@"; fi
}
svc_start() { # service...
    info "start $*"
    if [ "$TARGET" = local ]; then twin start "$@" 2>&1 | sed 's/^/      /'
    else compose start "$@"; fi
    # `twin start` fails when a service exits at once; the pipe above hides its status.
    if [ "$TARGET" = local ]; then
        local svc
        for svc in "$@"; do
            [ "$(twin status | awk -v s="$svc" '$1 == s {print $2}')" = running ] || fail "$svc did not start"
        done
    fi
}
# After the verification: leaves a twin or compose project that the scenario did not start as it
# found it (a twin it started is removed anyway).
svc_restore() { # service...
    [ "$OWNED_TWIN" = 1 ] || svc_start "$@"
}
svc_log() { # service: its whole log
    if [ "$TARGET" = local ]; then cat "$TWIN_DIR/logs/$1.log"
    else compose logs --no-color "$1"; fi
}
# A position in a service's log, so that later only what came after can be read.
log_mark() { # service
    if [ "$TARGET" = local ]; then wc -c <"$TWIN_DIR/logs/$1.log"
    else date -u +%Y-%m-%dT%H:%M:%SZ; sleep 1; fi
}
log_since() { # service mark
    if [ "$TARGET" = local ]; then tail -c +"$(($2 + 1))" "$TWIN_DIR/logs/$1.log"
    else compose logs --no-color --since "$2" "$1"; fi
}
consumer_health() { # prints "<http status> <body>"
    local port=8082
    if [ "$TARGET" = local ]; then
        port=$(twin env consumer | sed -n 's/^HTTP_ADDR=.*:\([0-9]*\)$/\1/p')
    fi
    curl -s -m 5 -w ' (HTTP %{http_code})' "http://127.0.0.1:$port/healthz" | tr -d '\n' || echo "(no answer)"
}

# --- producing -----------------------------------------------------------------------------------
# Runs a bounded producer in the foreground (like `docker compose run producer --count N`) and
# prints the total it reports.
produce() { # count [producer args...]
    local count=$1 out
    shift
    out=$WORK/produce.$RANDOM.out
    run_producer "$count" "$@" >"$out" 2>&1 || { tail -n 20 "$out" >&2; fail "producer --count $count $* failed"; }
    produced_total "$out"
}
run_producer() { # count [args...]: raw, output on stdout/stderr
    local count=$1
    shift
    if [ "$TARGET" = local ]; then twin run producer --count "$count" "$@" </dev/null
    else compose run --rm --no-deps -T producer --count "$count" "$@" </dev/null; fi
}
produced_total() { # file: the N of its last `produced N events` line
    local n
    n=$(sed -n 's/.*produced \([0-9][0-9]*\) events.*/\1/p' "$1" | tail -n 1)
    [ -n "$n" ] || { tail -n 20 "$1" >&2; fail "no 'produced N events' line in the producer's output"; }
    echo "$n"
}
# The same in the background; `wait_background` collects the total.
produce_bg() { # name count [args...]
    local name=$1
    shift
    run_producer "$@" >"$WORK/bg.$name.out" 2>&1 &
    BG_PIDS+=($!)
    echo "$!" >"$WORK/bg.$name.pid"
}
# Waits for a background producer (in this shell: `wait` cannot wait from a subshell) and sets
# BG_TOTAL to the total it reported.
wait_background() { # name
    local pid
    pid=$(cat "$WORK/bg.$1.pid")
    wait "$pid" || { tail -n 20 "$WORK/bg.$1.out" >&2; fail "background producer $1 failed"; }
    # shellcheck disable=SC2034 # read by the scenarios
    BG_TOTAL=$(produced_total "$WORK/bg.$1.out")
}
# Prints the lines of a service's log since a mark that match a pattern: how many, and a few.
show_log() { # service mark pattern what
    local lines n
    lines=$(log_since "$1" "$2" | grep -i -E "$3" || true)
    n=$(printf '%s' "$lines" | grep -c . || true)
    info "the $1 logged $n lines about $4"
    [ "$n" = 0 ] || printf '%s\n' "$lines" | sed -n '1p;$p' | uniq | cut -c1-220 | sed 's/^/      | /'
}
# Sum of the `produced N events` lines a service logged since a mark (one per run of the service).
produced_since() { # mark
    log_since producer "$1" | sed -n 's/.*produced \([0-9][0-9]*\) events.*/\1/p' | awk '{s += $1} END {print s + 0}'
}

# --- queries -------------------------------------------------------------------------------------
psql_q() { # sql: one query as the owner, unaligned output
    if [ "$TARGET" = local ]; then twin psql -q -At -v ON_ERROR_STOP=1 -c "$1" </dev/null
    else compose exec -T postgres psql -X -q -U postgres -d events -At -v ON_ERROR_STOP=1 -c "$1" </dev/null; fi
}
# psql as the producer's login, each argument one command of the same session.
psql_producer() { # sql...
    local -a cmds=()
    local c
    for c in "$@"; do cmds+=(-c "$c"); done
    if [ "$TARGET" = local ]; then twin psql --as producer -q -At -v ON_ERROR_STOP=1 "${cmds[@]}" </dev/null
    else
        # The password is the container's own PRODUCER_DB_PASSWORD (from .env), never spelled here.
        compose exec -T postgres sh -c 'PGPASSWORD=$PRODUCER_DB_PASSWORD exec psql -X -q -At \
            -v ON_ERROR_STOP=1 -h 127.0.0.1 -U producer -d events "$@"' sh "${cmds[@]}" </dev/null
    fi
}
mongo_eval() { # javascript (db = the consumer's database)
    if [ "$TARGET" = local ]; then twin mongosh --quiet --eval "$1" </dev/null
    else compose exec -T mongo sh -c 'exec mongosh --quiet --norc -u "$MONGO_CONSUMER_USER" \
        -p "$MONGO_CONSUMER_PASSWORD" --authenticationDatabase admin \
        "mongodb://127.0.0.1:27017/$0?directConnection=true" --eval "$1"' "$MONGO_DB" "$1" </dev/null; fi
}
max_id() { psql_q "select coalesce(max(id), 0) from events"; }
pg_count() { psql_q "select count(*) from events"; }
mongo_count() { mongo_eval "db.getCollection('$MONGO_COLL').countDocuments()"; }

# Waits until MongoDB holds at least `want` events with ids in [lo, hi]; prints how many it holds.
mongo_wait_range() { # lo hi want timeout-seconds
    mongo_eval "
        const c = db.getCollection('$MONGO_COLL');
        const range = {_id: {\$gte: NumberLong('$1'), \$lte: NumberLong('$2')}};
        const deadline = Date.now() + $4 * 1000;
        let n = c.countDocuments(range);
        while (n < $3 && Date.now() < deadline) { sleep(250); n = c.countDocuments(range); }
        print(n);"
}
# Waits until the consumer has delivered everything PostgreSQL holds now; fails if it does not
# within VERIFY_TIMEOUT (with --no-fail: only says so, and returns 1).
wait_caught_up() { # [--no-fail]
    local timeout=$VERIFY_TIMEOUT count lo hi n
    IFS='|' read -r count lo hi <<<"$(psql_q "select count(*), coalesce(min(id), 0), coalesce(max(id), 0) from events")"
    n=$(mongo_wait_range "$lo" "$hi" "$count" "$timeout")
    if [ "$n" -lt "$count" ]; then
        local what="the consumer did not catch up within ${timeout}s: MongoDB holds $n of the $count events with ids $lo..$hi"
        [ "${1:-}" = --no-fail ] || fail "$what"
        info "$what"
        return 1
    fi
    info "the consumer has all $count events with ids $lo..$hi"
}

# --- the verification every scenario ends with ---------------------------------------------------
# Producers must be stopped. Waits for the consumer to catch up, then compares the ids:
#  - every event in PostgreSQL is in MongoDB (a missing one is a gap);
#  - MongoDB holds no id PostgreSQL does not, unless the purger has deleted events (the
#    purge_watermark table has its row): then those are events delivered and since purged;
#  - no event twice (MongoDB `_id` = events.id is unique; also no event_id under two ids);
#  - unless something was purged, the two counts are equal.
verify() {
    local purged=0
    [ "$(psql_q "select count(*) from purge_watermark")" = 0 ] || purged=1
    step "verifying: PostgreSQL events vs MongoDB $MONGO_DB.$MONGO_COLL"
    # Not caught up in time: the comparison below names what is missing.
    wait_caught_up --no-fail || true
    psql_q "select id from events order by id" >"$WORK/pg.ids"
    mongo_eval "db.getCollection('$MONGO_COLL').find({}, {_id: 1}).toArray().map(d => d._id.toString()).join('\n')" \
        | sed '/^$/d' >"$WORK/mongo.ids"
    local pg_n mongo_n dup_ids dup_events
    pg_n=$(pg_count)
    mongo_n=$(mongo_count)
    printf '    %-60s -> %s\n' "psql:    select count(*) from events" "$pg_n"
    printf '    %-60s -> %s\n' "mongosh: db.$MONGO_COLL.countDocuments()  (database $MONGO_DB)" "$mongo_n"

    sort "$WORK/pg.ids" >"$WORK/pg.sorted"
    sort "$WORK/mongo.ids" >"$WORK/mongo.sorted"
    comm -23 "$WORK/pg.sorted" "$WORK/mongo.sorted" | sort -n >"$WORK/missing"
    comm -13 "$WORK/pg.sorted" "$WORK/mongo.sorted" | sort -n >"$WORK/extra"
    dup_ids=$(uniq -d "$WORK/mongo.sorted" | wc -l)
    dup_events=$(mongo_eval "
        const d = db.getCollection('$MONGO_COLL').aggregate([
            {\$match: {event_id: {\$exists: true}}},
            {\$group: {_id: '\$event_id', n: {\$sum: 1}}},
            {\$match: {n: {\$gt: 1}}}]).toArray();
        print(d.length);")
    local problems=0
    if [ -s "$WORK/missing" ]; then
        info "GAP: $(wc -l <"$WORK/missing") events in PostgreSQL are not in MongoDB, e.g. ids $(head -n 10 "$WORK/missing" | paste -sd ' ')"
        problems=1
    fi
    if [ -s "$WORK/extra" ]; then
        if [ "$purged" = 1 ]; then
            info "$(wc -l <"$WORK/extra") events in MongoDB were delivered and since purged from PostgreSQL (ids $(head -n 1 "$WORK/extra")..$(tail -n 1 "$WORK/extra"))"
        else
            info "MongoDB holds $(wc -l <"$WORK/extra") ids that PostgreSQL does not, e.g. $(head -n 10 "$WORK/extra" | paste -sd ' ')"
            problems=1
        fi
    fi
    if [ "$dup_ids" != 0 ] || [ "$dup_events" != 0 ]; then
        info "DUPLICATES: $dup_ids repeated ids, $dup_events event_ids stored under more than one id"
        problems=1
    fi
    if [ "$purged" = 0 ] && [ "$pg_n" != "$mongo_n" ]; then
        info "MISMATCH: $pg_n events in PostgreSQL, $mongo_n in MongoDB"
        problems=1
    fi
    [ "$problems" = 0 ] || fail "PostgreSQL and MongoDB disagree (see above)"
    if [ "$purged" = 1 ]; then
        info "OK: every event still in PostgreSQL is in MongoDB, exactly once; no duplicates"
    else
        info "OK: every event in PostgreSQL is in MongoDB, exactly once; no duplicates, no gaps"
    fi
}

# The producers' own totals must match the rows they added.
check_produced() { # base-id expected
    local rows
    rows=$(psql_q "select count(*) from events where id > $1")
    info "the producers reported $2 committed events; PostgreSQL holds $rows events with id > $1"
    [ "$rows" = "$2" ] || fail "the producers reported $2 events but PostgreSQL holds $rows"
}

svc_running() { # service: is it up?
    if [ "$TARGET" = local ]; then [ "$(twin status | awk -v s="$1" '$1 == s {print $2}')" = running ]
    else compose ps --status running --services | grep -qx "$1"; fi
}

# One pass of the purger (like `docker compose run purger --once ...`); prints its output.
purge_once() { # purger args...
    local out=$WORK/purge.$RANDOM.out
    info "purger --once $*"
    if [ "$TARGET" = local ]; then twin run purger --once "$@" </dev/null >"$out" 2>&1
    else compose run --rm --no-deps -T purger --once "$@" </dev/null >"$out" 2>&1; fi \
        || { cat "$out" >&2; fail "purger --once $* failed"; }
    sed 's/^/      | /' "$out"
}
