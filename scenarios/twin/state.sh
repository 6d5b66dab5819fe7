# shellcheck shell=bash
# The twin's state: what `up` decided (ports, URLs, paths) in state.env, kept for later commands.
#
# `up` writes .pgevents-twin first and .ready last. A directory with .ready is a complete twin;
# one without it was left half-made by an interrupted or failed `up`, and the next `up` removes it
# (stopping whatever it had started) before starting afresh.

state_file() { echo "$TWIN_DIR/state.env"; }
twin_exists() { [ -e "$TWIN_DIR" ]; }
have_state() { [ -f "$TWIN_DIR/.ready" ] && [ -f "$(state_file)" ]; }
# Whatever was recorded, however little (for `down` of a half-made twin).
read_state() {
    PG_MANAGED=0 PG_BINDIR='' PG_DIR='' PG_SOCK='' PG_PORT='' OWNER_URL='' MONGO_KIND=none
    MONGO_PROGRAM='' MONGO_PORT='' MONGO_URI='' PRODUCER_URL='' CONSUMER_URL='' PURGER_URL=''
    PRODUCER_HTTP_PORT='' CONSUMER_HTTP_PORT='' PURGER_HTTP_PORT='' GATEWAY_HTTP_PORT='' BIN_DIR=''
    NATS_ENABLED=0 NATS_PORTS='' NATS_CLUSTER_PORTS='' NATS_MONITOR_PORTS='' CONSUMER_NATS_HTTP_PORT=''
    # shellcheck disable=SC1090
    [ -f "$(state_file)" ] && . "$(state_file)"
    # shellcheck disable=SC1090,SC1091
    [ -f "$TWIN_DIR/config.env" ] && . "$TWIN_DIR/config.env"
    return 0
}
load_state() {
    have_state || die "no local twin in $TWIN_DIR: start one with scenarios/local-up"
    read_state
}
save_var() { printf '%s=%q\n' "$1" "$2" >>"$(state_file)"; }
# A password for the twin's logins (none has a default).
new_secret() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }
