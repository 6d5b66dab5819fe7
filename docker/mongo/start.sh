#!/usr/bin/env bash
# The mongo service's command. A replica set with authentication needs a key file for its members
# to authenticate each other (even a set of one); it is made on the first start, inside the config
# volume, readable only by the mongod user (this container runs as that user, never as root).
set -euo pipefail
key=/data/configdb/pgevents-replica.key
if [ ! -s "$key" ]; then
    umask 077
    head -c 756 /dev/urandom | base64 -w 0 >"$key"
fi
chmod 400 "$key"
exec docker-entrypoint.sh mongod --replSet rs0 --keyFile "$key" --bind_ip_all "$@"
