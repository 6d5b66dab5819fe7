#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume (mounted into
# /docker-entrypoint-initdb.d). Creates the services' login users; `migrate` then creates the
# schema and grants the group roles their privileges.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -X -q \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v producer_user="${PRODUCER_DB_USER:-producer}" -v producer_password="$PRODUCER_DB_PASSWORD" \
     -v consumer_user="${CONSUMER_DB_USER:-consumer}" -v consumer_password="$CONSUMER_DB_PASSWORD" \
     -v purger_user="${PURGER_DB_USER:-purger}"       -v purger_password="$PURGER_DB_PASSWORD" \
     -f /etc/pgevents/logins.sql
echo "pgevents: login users ${PRODUCER_DB_USER:-producer}, ${CONSUMER_DB_USER:-consumer}, ${PURGER_DB_USER:-purger} ready"
