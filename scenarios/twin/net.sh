# shellcheck shell=bash
# Ports and connection strings.

pick_port() { # preferred-port used-ports...: the preferred one if free, else a free one
    python3 - "$@" <<'EOF'
import socket, sys
want, used = int(sys.argv[1]), {int(p) for p in sys.argv[2:]}
def free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()
if want and want not in used and free(want):
    print(want)
else:
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in used:
            print(port)
            break
EOF
}
# The same MongoDB URI with another database in its path.
uri_with_db() { # uri db
    local uri=$1 base query=
    if [[ $uri == *\?* ]]; then base=${uri%%\?*} query="?${uri#*\?}"; else base=$uri; fi
    local rest=${base#*://}
    echo "${base%%://*}://${rest%%/*}/$2$query"
}
port_accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A URL for another user of the same server: swaps the user and password of the owner's URL.
url_with_user() { # url user password
    python3 - "$@" <<'EOF'
import sys
from urllib.parse import quote, urlsplit, urlunsplit
url, user, password = sys.argv[1:4]
parts = urlsplit(url)
if parts.scheme not in ("postgres", "postgresql"):
    sys.exit("DATABASE_URL must be a postgres:// URL here, so that the services' logins can be derived from it")
host = parts.netloc.rsplit("@", 1)[-1]
print(urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}")))
EOF
}

