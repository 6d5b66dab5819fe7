# shellcheck shell=bash
# Detached processes with pid files: start, check, stop.

pid_of() { cat "$TWIN_DIR/run/$1.pid" 2>/dev/null || true; }
alive() { # service: is its recorded process still running?
    local pid
    pid=$(pid_of "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]
}
live_pid() { if alive "$1"; then pid_of "$1"; else echo -; fi; }
# Sends a signal and waits for the process to go; SIGKILL after the grace period.
stop_pid() { # pid signal grace-seconds
    local pid=$1 sig=$2 grace=$3 i
    kill -"$sig" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    say "  (pid $pid did not stop within ${grace}s: SIGKILL)"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}
# Starts a command detached (own session, no terminal, output to a log) and records its pid.
spawn() { # name log command...
    local name=$1 log=$2
    shift 2
    mkdir -p "$TWIN_DIR/run" "$(dirname "$log")"
    printf '\n=== %s: started %s\n' "$(date -u +%FT%TZ)" "$name" >>"$log"
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$TWIN_DIR/run/$name.pid" "$@" </dev/null >>"$log" 2>&1 &
    local i
    for ((i = 0; i < 50; i++)); do [ -s "$TWIN_DIR/run/$name.pid" ] && break; sleep 0.02; done
}

