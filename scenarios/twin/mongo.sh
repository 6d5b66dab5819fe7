# shellcheck shell=bash
# The twin's MongoDB-wire server: a `mongod` from PATH (as a one-member replica set) or SecantusDB.

mongosh_bin() {
    if [ -x "$root/.tools/node_modules/.bin/mongosh" ]; then echo "$root/.tools/node_modules/.bin/mongosh"
    elif command -v mongosh >/dev/null; then command -v mongosh
    else die "mongosh not found: npm install --prefix .tools mongosh@2 (./scripts/test does it)"; fi
}
mongo_start() {
    if alive mongo; then say "mongo is already running (port $MONGO_PORT)"; return; fi
    port_accepts "$MONGO_PORT" && die "port $MONGO_PORT is taken by another process: the twin's mongo cannot come back on it"
    mkdir -p "$TWIN_DIR/mongo/data"
    case "$MONGO_KIND" in
        secantus)
            # A private HOME keeps ~/.secantus/secantusd.toml out; --sync-on-commit makes
            # acknowledged writes survive kill -9, as mongod's journal does.
            spawn mongo "$TWIN_DIR/mongo/mongo.log" env HOME="$TWIN_DIR/mongo" "$MONGO_PROGRAM" \
                --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$TWIN_DIR/mongo/data" \
                --sync-on-commit --log-level WARNING
            ;;
        mongod)
            spawn mongo "$TWIN_DIR/mongo/mongo.log" "$MONGO_PROGRAM" --dbpath "$TWIN_DIR/mongo/data" \
                --bind_ip 127.0.0.1 --port "$MONGO_PORT" --replSet rs0
            ;;
    esac
    local i
    for ((i = 0; i < 600; i++)); do
        port_accepts "$MONGO_PORT" && break
        alive mongo || { tail -n 20 "$TWIN_DIR/mongo/mongo.log" >&2; die "mongo exited during start-up"; }
        sleep 0.1
    done
    port_accepts "$MONGO_PORT" || die "mongo did not accept connections within 60s (log: $TWIN_DIR/mongo/mongo.log)"
    if [ "$MONGO_KIND" = mongod ]; then
        # Transactions need a replica set: initiate the one-member set once, wait for primary.
        MONGO_REPLICA_SET_MEMBER="127.0.0.1:$MONGO_PORT" "$(mongosh_bin)" --quiet --norc \
            "mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true" \
            --eval "for (let i = 0; i < 120; i++) { try { load('$root/docker/mongo/replica-set.js'); break; } catch (e) { sleep(500); } }" \
            </dev/null >/dev/null 2>&1 || true
    fi
    say "mongo is up on 127.0.0.1:$MONGO_PORT ($MONGO_KIND)"
}
mongo_stop() { # signal
    if alive mongo; then
        stop_pid "$(pid_of mongo)" "${1:-TERM}" 30
        say "mongo stopped"
    else
        say "mongo is not running"
    fi
    rm -f "$TWIN_DIR/run/mongo.pid"
}

