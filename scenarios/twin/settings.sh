# shellcheck shell=bash
# The service settings (knobs): which variables go to which binary, compose's defaults, and the
# ones `up` recorded versus those the caller sets now. Sourced by scenarios/local.

APPS=(producer consumer purger gateway capture-watcher)
# Service settings: every PRODUCER_*, CONSUMER_*, PURGER_*, GATEWAY_* and MONGODB_* variable (but the URI and
# the login passwords, which the twin sets itself), WATCH_INTERVAL (the capture watcher's),
# LOG_LEVEL, NOTIFY_CHANNEL and RUST_BACKTRACE go to the binaries; compose's defaults apply where
# it sets one.
is_knob() {
    case "$1" in
        MONGODB_URI | *_DB_PASSWORD | *_DB_USER | *_DATABASE_URL) return 1 ;;
        LOG_LEVEL | NOTIFY_CHANNEL | RUST_BACKTRACE | WATCH_INTERVAL | PRODUCER_* | CONSUMER_* | PURGER_* | GATEWAY_* | MONGODB_*) return 0 ;;
    esac
    return 1
}
declare -A KNOB_DEFAULTS=(
    [LOG_LEVEL]=info [NOTIFY_CHANNEL]=events
    [PRODUCER_TOPICS]='courses,policies' [PRODUCER_RATE]=100 [PRODUCER_BATCH_SIZE]=1
    [PRODUCER_CONCURRENCY]=2 [PRODUCER_PAYLOAD_BYTES]=256
    [MONGODB_DATABASE]=consumer [MONGODB_COLLECTION]=receivedEvents [CONSUMER_NAME]=consumer
    [PURGER_RETENTION]=1h [PURGER_INTERVAL]=1m
    [GATEWAY_OPEN]=true [WATCH_INTERVAL]=1ms
)
# Settings recorded by `up` (config.env) and those set by whoever runs this command now.
declare -A RECORDED_KNOBS=() CALLER_KNOBS=()
while IFS= read -r _k; do
    is_knob "$_k" && CALLER_KNOBS[$_k]=${!_k}
done < <(compgen -e)
unset _k
knob() { # name default: the setting in force
    echo "${CALLER_KNOBS[$1]-${RECORDED_KNOBS[$1]-$2}}"
}
# Knobs that belong to one service only (the others are passed to every service).
knob_for() { # knob service
    case "$1" in
        PRODUCER_*) [ "$2" = producer ] ;;
        MONGODB_* | CONSUMER_*) [ "$2" = consumer ] ;;
        PURGER_*) [ "$2" = purger ] ;;
        GATEWAY_*) [ "$2" = gateway ] ;;
        WATCH_INTERVAL) [ "$2" = capture-watcher ] ;;
        *) true ;;
    esac
}


say() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
