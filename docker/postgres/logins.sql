-- Login users for the services, each holding exactly one of the group roles the migrations grant
-- privileges to. Idempotent: safe to run before or after `migrate`, and again.
--
--   psql -v ON_ERROR_STOP=1 \
--        -v producer_user=producer -v producer_password=... \
--        -v consumer_user=consumer -v consumer_password=... \
--        -v purger_user=purger     -v purger_password=... \
--        -f docker/postgres/logins.sql
--
-- Used by the postgres container's first start (docker/postgres/initdb.sh) and by the local twin
-- (scenarios/local). Run it as a superuser or a role with CREATEROLE.

-- The group roles (the V2 migration creates them the same way when they are missing).
SELECT format('CREATE ROLE %I NOLOGIN', r)
  FROM unnest(ARRAY['events_producer', 'events_consumer', 'events_purger']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r)
\gexec

CREATE TEMPORARY TABLE pgevents_logins (login text, password text, grp text);
INSERT INTO pgevents_logins VALUES
    (:'producer_user', :'producer_password', 'events_producer'),
    (:'consumer_user', :'consumer_password', 'events_consumer'),
    (:'purger_user',   :'purger_password',   'events_purger');

SELECT format('CREATE ROLE %I LOGIN', login)
  FROM pgevents_logins
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = login)
\gexec

-- NOINHERIT is not used: a login acts with its group's privileges directly.
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              login, password)
  FROM pgevents_logins
\gexec

SELECT format('GRANT %I TO %I', grp, login)
  FROM pgevents_logins
\gexec

DROP TABLE pgevents_logins;

-- Nobody else connects to this database: CONNECT is revoked from PUBLIC and granted to the group
-- roles (migrate grants it too, so the order of the two does not matter). The owner and
-- superusers keep connecting.
SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', current_database())
\gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r)
  FROM unnest(ARRAY['events_producer', 'events_consumer', 'events_purger']) AS r
\gexec
