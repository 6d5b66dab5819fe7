# shellcheck shell=bash
# The twin's NATS JetStream cluster (with `NATS=1` at `up`): three nats-server nodes on loopback
# (nats1, nats2, nats3; one cluster, JetStream on file storage in the twin's directory) and the
# service consumer-nats, a second consumer (name consumer-nats) publishing the same events to the
# stream EVENTS with three replicas. A node can be stopped, killed and started like any service.

NATS_NODES=(nats1 nats2 nats3)

nats_enabled() { [ "${NATS_ENABLED:-0}" = 1 ]; }
is_nats_node() { case "$1" in nats1 | nats2 | nats3) return 0 ;; esac; return 1; }
nats_index() { echo "${1#nats}"; }
nats_client_port() { local ports=($NATS_PORTS); echo "${ports[$(($(nats_index "$1") - 1))]}"; }
nats_cluster_port() { local ports=($NATS_CLUSTER_PORTS); echo "${ports[$(($(nats_index "$1") - 1))]}"; }
nats_monitor_port() { local ports=($NATS_MONITOR_PORTS); echo "${ports[$(($(nats_index "$1") - 1))]}"; }
# The URL list the consumer gets: every node, so it fails over when one goes.
nats_urls() {
    local p urls=()
    for p in $NATS_PORTS; do urls+=("nats://127.0.0.1:$p"); done
    (IFS=,; echo "${urls[*]}")
}

# At `up`: ports for the nodes and the consumer's /healthz; none used by anything else.
nats_place() { # used-ports...
    command -v nats-server >/dev/null \
        || die "NATS=1 needs nats-server on PATH (scripts/bootstrap --nats installs it)"
    local used=("$@") n p client=() cluster=() monitor=()
    for n in "${NATS_NODES[@]}"; do
        p=$(pick_port "$((4221 + $(nats_index "$n")))" "${used[@]}"); used+=("$p"); client+=("$p")
        p=$(pick_port "$((6221 + $(nats_index "$n")))" "${used[@]}"); used+=("$p"); cluster+=("$p")
        p=$(pick_port "$((8221 + $(nats_index "$n")))" "${used[@]}"); used+=("$p"); monitor+=("$p")
    done
    NATS_PORTS=${client[*]} NATS_CLUSTER_PORTS=${cluster[*]} NATS_MONITOR_PORTS=${monitor[*]}
    CONSUMER_NATS_HTTP_PORT=$(pick_port 8085 "${used[@]}")
}

nats_start() { # node
    local node=$1
    if alive "$node"; then say "$node is already running (port $(nats_client_port "$node"))"; return; fi
    local port cport routes=() other
    port=$(nats_client_port "$node")
    cport=$(nats_cluster_port "$node")
    port_accepts "$port" && die "port $port is taken by another process: $node cannot come back on it"
    for other in "${NATS_NODES[@]}"; do
        [ "$other" = "$node" ] || routes+=("nats://127.0.0.1:$(nats_cluster_port "$other")")
    done
    mkdir -p "$TWIN_DIR/nats/$node"
    spawn "$node" "$TWIN_DIR/nats/$node.log" "$(command -v nats-server)" -a 127.0.0.1 -p "$port" \
        -m "$(nats_monitor_port "$node")" -n "$node" -js -sd "$TWIN_DIR/nats/$node" --cluster_name pgevents \
        --cluster "nats://127.0.0.1:$cport" --routes "$(IFS=,; echo "${routes[*]}")"
    local i
    for ((i = 0; i < 100; i++)); do
        port_accepts "$port" && break
        alive "$node" || { tail -n 20 "$TWIN_DIR/nats/$node.log" >&2; die "$node exited during start-up"; }
        sleep 0.1
    done
    port_accepts "$port" || die "$node did not accept connections within 10s (log: $TWIN_DIR/nats/$node.log)"
    say "$node is up on 127.0.0.1:$port"
}
nats_stop() { # node signal
    if alive "$1"; then
        stop_pid "$(pid_of "$1")" "${2:-TERM}" 30
        say "$1 stopped"
    else
        say "$1 is not running"
    fi
    rm -f "$TWIN_DIR/run/$1.pid"
}
# JetStream answers once the cluster has elected its meta leader: the node's /healthz says so.
nats_wait_ready() { # node
    local i url
    url="http://127.0.0.1:$(nats_monitor_port "$1")/healthz"
    for ((i = 0; i < 300; i++)); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" \
            2>/dev/null && return 0
        sleep 0.1
    done
    die "$1: JetStream not ready within 30s (log: $TWIN_DIR/nats/$1.log)"
}
# All three first (a node alone waits for its peers), then JetStream ready on each.
nats_start_all() {
    nats_enabled || return 0
    local n
    for n in "${NATS_NODES[@]}"; do nats_start "$n"; done
    for n in "${NATS_NODES[@]}"; do nats_wait_ready "$n"; done
}
