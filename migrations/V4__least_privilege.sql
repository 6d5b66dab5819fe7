-- Least privilege, per database.
--
-- V2's group roles are cluster-wide: a login holding events_consumer for one database's stream could
-- read another database's stream, overwrite any consumer's published position, and see every
-- session's query through pg_read_all_stats; the purger could read every payload. From here on:
--
-- * The group roles of this database's stream are <prefix>_producer, <prefix>_consumer and
--   <prefix>_purger, recorded in event_stream_roles. `migrate --role-prefix` chooses the prefix
--   (default "events") and calls events_grant_roles(prefix) after the migrations, on every run, so
--   the grants below are re-applied exactly. The function refuses roles that already hold
--   privileges in another database of the cluster: each database's stream gets its own roles.
-- * A consumer login writes only the position rows it owns (row-level security on `owner`).
-- * The purger reads only id, tx_id, created_at (and ctid) of events, never payloads.
-- * "Who holds the visibility horizon back" is answered by events_horizon_blocker(), a narrow
--   SECURITY DEFINER function, instead of pg_read_all_stats.
-- Connecting is left to the administrator: REVOKE CONNECT ON DATABASE <db> FROM PUBLIC (see the
-- README, Security); the group roles get CONNECT here.

CREATE TABLE event_stream_roles (
    job  text PRIMARY KEY CONSTRAINT event_stream_roles_job CHECK (job IN ('producer', 'consumer', 'purger')),
    role name NOT NULL UNIQUE
);
-- Role names and schema versions only: a service's start-up check compares the schema version
-- with the one it needs, and names the role to grant when its login lacks one.
GRANT SELECT ON event_stream_roles TO PUBLIC;
GRANT SELECT ON refinery_schema_history TO PUBLIC;

-- Each position row belongs to the login that first wrote it. Rows from before V4 have no owner:
-- the first consumer login that publishes under that name claims it.
ALTER TABLE consumer_positions ADD COLUMN owner name DEFAULT current_user;
ALTER TABLE consumer_positions ENABLE ROW LEVEL SECURITY;

-- The open transaction with the oldest id, for a consumer whose delivery it holds back. Runs with
-- its owner's rights (the role that ran migrate; a superuser or a member of pg_read_all_stats sees
-- every session) and returns five columns, never a query text. search_path is pinned and every
-- name qualified, so a caller's objects cannot stand in for the catalog's.
CREATE FUNCTION events_horizon_blocker()
RETURNS TABLE (pid integer, usename text, application_name text, state text, open_for float8)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.pid, a.usename::text, coalesce(a.application_name, ''), a.state,
           extract(epoch FROM pg_catalog.now() OPERATOR(pg_catalog.-) a.xact_start)::float8
      FROM pg_catalog.pg_stat_activity a
     WHERE a.backend_xid IS NOT NULL AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
     ORDER BY pg_catalog.age(a.backend_xid) DESC
     LIMIT 1
$$;
REVOKE ALL ON FUNCTION events_horizon_blocker() FROM PUBLIC;

-- Creates (when missing) and grants the group roles <prefix>_producer, _consumer, _purger of this
-- database's stream, exactly: everything is revoked first, so running it again changes nothing,
-- and roles of a previous prefix (V2's events_* included) lose what they held here. Run by
-- `migrate` as the database owner; not callable by anyone else.
CREATE FUNCTION events_grant_roles(prefix text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    db      name := pg_catalog.current_database();
    db_oid  oid  := (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database());
    v_job   text;
    v_role  name;
    v_old   name;
    v_other text;
    v_olds  name[];
BEGIN
    IF prefix IS NULL OR prefix !~ '^[a-z_][a-z0-9_]{0,45}$' THEN
        RAISE EXCEPTION 'invalid role prefix %', pg_catalog.quote_literal(prefix)
            USING ERRCODE = '22023',
                  HINT = 'use lower-case letters, digits and _ (at most 46 characters), e.g. the database name';
    END IF;
    FOREACH v_job IN ARRAY ARRAY['producer', 'consumer', 'purger'] LOOP
        v_role := prefix || '_' || v_job;
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_role) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
        -- A role that holds privileges or objects in another database would carry them here.
        SELECT coalesce(d.datname, '?') INTO v_other
          FROM pg_catalog.pg_shdepend s
          LEFT JOIN pg_catalog.pg_database d
                 ON d.oid = CASE WHEN s.dbid = 0 THEN s.objid ELSE s.dbid END
         WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
           AND s.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = v_role)
           AND ((s.dbid <> 0 AND s.dbid <> db_oid)
                OR (s.dbid = 0 AND s.classid = 'pg_catalog.pg_database'::pg_catalog.regclass
                    AND s.objid <> db_oid))
         LIMIT 1;
        IF v_other IS NOT NULL THEN
            RAISE EXCEPTION 'role % already holds privileges in database % of this cluster', v_role, v_other
                USING ERRCODE = '42501',
                      HINT = 'every database''s event stream needs roles of its own: run migrate with --role-prefix <name> (e.g. the database name)';
        END IF;
        SELECT r.role INTO v_old FROM event_stream_roles r WHERE r.job = v_job;
        IF v_old IS NULL AND v_role <> 'events_' || v_job THEN
            v_old := 'events_' || v_job; -- V2's role
        END IF;
        IF v_old IS NOT NULL AND v_old <> v_role THEN
            v_olds := v_olds || v_old;
        END IF;
        INSERT INTO event_stream_roles AS r (job, role) VALUES (v_job, v_role)
        ON CONFLICT ON CONSTRAINT event_stream_roles_pkey DO UPDATE SET role = EXCLUDED.role;
        v_olds := v_olds || v_role;
    END LOOP;

    -- Start from nothing, for the new roles and the previous ones alike.
    FOREACH v_role IN ARRAY v_olds LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_role);
        EXECUTE pg_catalog.format(
            'REVOKE ALL ON events, consumer_positions, purge_watermark, refinery_schema_history FROM %1$I;
             REVOKE ALL ON SEQUENCE events_id_seq FROM %1$I;
             REVOKE ALL ON FUNCTION events_horizon_blocker() FROM %1$I;
             REVOKE CONNECT ON DATABASE %2$I FROM %1$I;
             DROP POLICY IF EXISTS %3$I ON consumer_positions;
             DROP POLICY IF EXISTS %4$I ON consumer_positions;',
            v_role, db, v_role || '_own_position', v_role || '_reads_positions');
    END LOOP;

    -- Producers append. They may choose event_id (idempotency keys) but never id, tx_id or
    -- created_at, which the reading order and the retention depend on. RETURNING and the look-up
    -- after an unknown COMMIT read id and event_id.
    v_role := prefix || '_producer';
    EXECUTE pg_catalog.format(
        'GRANT CONNECT ON DATABASE %2$I TO %1$I;
         GRANT INSERT (event_id, topic, key, type, payload, headers) ON events TO %1$I;
         GRANT SELECT (id, event_id) ON events TO %1$I;
         GRANT USAGE ON SEQUENCE events_id_seq TO %1$I;', v_role, db);

    -- Consumers read events and the watermark, write the position rows they own, and ask who
    -- holds the horizon back.
    v_role := prefix || '_consumer';
    EXECUTE pg_catalog.format(
        'GRANT CONNECT ON DATABASE %2$I TO %1$I;
         GRANT SELECT ON events TO %1$I;
         GRANT SELECT, INSERT, UPDATE ON consumer_positions TO %1$I;
         GRANT SELECT ON purge_watermark TO %1$I;
         GRANT EXECUTE ON FUNCTION events_horizon_blocker() TO %1$I;
         CREATE POLICY %3$I ON consumer_positions FOR ALL TO %1$I
             USING (owner = current_user OR owner IS NULL)
             WITH CHECK (owner = current_user);', v_role, db, v_role || '_own_position');

    -- The purger deletes old events, reading only the columns that select them (ctid: a purge
    -- batch picks its rows by it); it reads every position to know what it must keep, and raises
    -- the watermark.
    v_role := prefix || '_purger';
    EXECUTE pg_catalog.format(
        'GRANT CONNECT ON DATABASE %2$I TO %1$I;
         GRANT SELECT (ctid, id, tx_id, created_at), DELETE ON events TO %1$I;
         GRANT SELECT ON consumer_positions TO %1$I;
         GRANT SELECT, INSERT, UPDATE ON purge_watermark TO %1$I;
         CREATE POLICY %3$I ON consumer_positions FOR SELECT TO %1$I USING (true);',
        v_role, db, v_role || '_reads_positions');
END
$fn$;
REVOKE ALL ON FUNCTION events_grant_roles(text) FROM PUBLIC;

-- V2 gave consumers pg_read_all_stats (every session's query text); the function above replaces
-- it. Revoking a built-in role's membership needs the grantor or a superuser: otherwise say so.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'events_consumer')
       AND pg_catalog.pg_has_role('events_consumer', 'pg_read_all_stats', 'MEMBER') THEN
        BEGIN
            REVOKE pg_read_all_stats FROM events_consumer;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'cannot revoke pg_read_all_stats from events_consumer (run as a superuser: REVOKE pg_read_all_stats FROM events_consumer)';
        END;
    END IF;
END
$$;
