# shellcheck shell=bash
# producer, consumer, purger, gateway, capture-watcher, consumer-nats (NATS=1), group-member-N (on
# demand) and migrate: their environment (the names
# docker-compose.yml uses), start, stop, and one-off runs in the foreground.

bin_path() { echo "$BIN_DIR/$1"; }
# The command line of a service: its binary, except the capture watcher, an eventsctl command
# (as in compose).
service_cmd() { # service
    case "$1" in
        capture-watcher) echo "$(bin_path eventsctl)"; echo capture; echo watch ;;
        consumer-nats | group-member-*) bin_path consumer ;;
        *) bin_path "$1" ;;
    esac
}
# The environment a service gets: the same variable names as docker-compose.yml.
service_env() { # service
    local svc=$1 k v
    echo "PATH=$PATH"
    echo "HOME=${HOME:-/}"
    case "$svc" in
        migrate) echo "DATABASE_URL=$OWNER_URL" ;;
        producer) echo "DATABASE_URL=$PRODUCER_URL"; echo "HTTP_ADDR=127.0.0.1:$PRODUCER_HTTP_PORT" ;;
        consumer)
            echo "DATABASE_URL=$CONSUMER_URL"
            echo "MONGODB_URI=$MONGO_URI"
            echo "HTTP_ADDR=127.0.0.1:$CONSUMER_HTTP_PORT"
            ;;
        purger) echo "DATABASE_URL=$PURGER_URL"; echo "HTTP_ADDR=127.0.0.1:$PURGER_HTTP_PORT" ;;
        # The same login as the MongoDB consumer, its own name and checkpoint, a 3-replica stream.
        consumer-nats)
            echo "DATABASE_URL=$CONSUMER_URL"
            echo "HTTP_ADDR=127.0.0.1:$CONSUMER_NATS_HTTP_PORT"
            echo "CONSUMER_NAME=consumer-nats"
            echo "CONSUMER_SINK=nats"
            echo "CONSUMER_NATS_URL=$(nats_urls)"
            echo "CONSUMER_NATS_STREAM=EVENTS"
            ;;
        # Members of one consumer group (scenario s10): the consumer's login, 16 partitions, a
        # collection of their own.
        group-member-*)
            echo "DATABASE_URL=$CONSUMER_URL"
            echo "MONGODB_URI=$MONGO_URI"
            echo "MONGODB_COLLECTION=groupEvents"
            echo "CONSUMER_NAME=orders-group"
            echo "CONSUMER_PARTITIONS=16"
            echo "CONSUMER_LEASE_TIMEOUT=${GROUP_LEASE_TIMEOUT:-10s}"
            ;;
        # Read-only use of the consumer's login, as in compose.
        gateway) echo "DATABASE_URL=$CONSUMER_URL"; echo "HTTP_ADDR=127.0.0.1:$GATEWAY_HTTP_PORT" ;;
        # Wakes consumers for captured changes (it needs only what a consumer may read).
        capture-watcher) echo "DATABASE_URL=$CONSUMER_URL" ;;
    esac
    # The caller's environment wins over what `up` recorded.
    local -A knobs=()
    for k in "${!RECORDED_KNOBS[@]}"; do knobs[$k]=${RECORDED_KNOBS[$k]}; done
    for k in "${!CALLER_KNOBS[@]}"; do knobs[$k]=${CALLER_KNOBS[$k]}; done
    for k in "${!knobs[@]}"; do
        knob_for "$k" "$svc" || continue
        v=${knobs[$k]}
        [ -n "$v" ] && echo "$k=$v"
    done
    return 0
}
app_start() { # service
    local svc=$1
    if alive "$svc"; then say "$svc is already running (pid $(pid_of "$svc"))"; return; fi
    local -a envs cmd
    mapfile -t envs < <(service_env "$svc")
    mapfile -t cmd < <(service_cmd "$svc")
    # NO_COLOR: plain log files.
    spawn "$svc" "$TWIN_DIR/logs/$svc.log" env -i NO_COLOR=1 "${envs[@]}" "${cmd[@]}"
    # A service that exits at once has a configuration problem: show why.
    sleep 0.3
    if ! alive "$svc"; then
        tail -n 20 "$TWIN_DIR/logs/$svc.log" >&2
        die "$svc exited at start-up (log: $TWIN_DIR/logs/$svc.log)"
    fi
    if [ -n "$(http_port "$svc")" ]; then
        say "$svc is up (pid $(pid_of "$svc"), /healthz on 127.0.0.1:$(http_port "$svc"))"
    else
        say "$svc is up (pid $(pid_of "$svc"))"
    fi
}
app_stop() { # service signal
    local svc=$1
    if alive "$svc"; then
        stop_pid "$(pid_of "$svc")" "${2:-TERM}" 30
        say "$svc stopped"
    else
        say "$svc is not running"
    fi
    rm -f "$TWIN_DIR/run/$svc.pid"
}
http_port() {
    case "$1" in
        producer) echo "$PRODUCER_HTTP_PORT" ;; consumer) echo "$CONSUMER_HTTP_PORT" ;;
        purger) echo "$PURGER_HTTP_PORT" ;; gateway) echo "$GATEWAY_HTTP_PORT" ;;
        consumer-nats) echo "$CONSUMER_NATS_HTTP_PORT" ;;
    esac
}


# Runs a binary in the foreground with its service's environment (the twin's `docker compose run`).
run_app() { # service args...
    local svc=$1
    shift
    case "$svc" in migrate | producer | consumer | purger) ;; *) die "run: migrate, producer, consumer or purger" ;; esac
    local -a envs
    mapfile -t envs < <(service_env "$svc")
    # The one-off run has no HTTP endpoint unless asked for: it would clash with the service's.
    local -a filtered=()
    local e
    for e in "${envs[@]}"; do [[ $e == HTTP_ADDR=* ]] || filtered+=("$e"); done
    [ -t 2 ] || filtered+=(NO_COLOR=1)
    # `scenarios/local run` becomes the process itself, so a signal to it reaches the binary.
    if [ "${RUN_EXEC:-0}" = 1 ]; then exec env -i "${filtered[@]}" "$(bin_path "$svc")" "$@"; fi
    env -i "${filtered[@]}" "$(bin_path "$svc")" "$@"
}
