-- Table-change capture's roles, per database like the stream's (V4).
--
-- V5 created events_capture (owner of the SECURITY DEFINER trigger functions, may only append) and
-- events_capture_admin (may add and remove capture) cluster-wide, so an admin owning tables in two
-- databases could capture in both. From here on they are <prefix>_capture and
-- <prefix>_capture_admin, recorded in event_stream_roles (jobs capture, capture_admin) and
-- granted, exactly, by events_grant_roles(prefix), which `migrate --role-prefix` runs after the
-- migrations. With the default prefix "events" the names stay V5's.
--
-- V4's function keeps doing the stream's roles under the name events_grant_stream_roles; the
-- new events_grant_roles calls it, then does capture's.

ALTER TABLE event_stream_roles DROP CONSTRAINT event_stream_roles_job;
ALTER TABLE event_stream_roles ADD CONSTRAINT event_stream_roles_job
    CHECK (job IN ('producer', 'consumer', 'purger', 'capture', 'capture_admin'));

ALTER FUNCTION events_grant_roles(text) RENAME TO events_grant_stream_roles;

-- The database (other than this one) in which `role` holds privileges or owns objects, if any:
-- such a role would carry them into this database's stream.
CREATE FUNCTION events_role_used_elsewhere(role name) RETURNS name
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT coalesce(d.datname, '?')
      FROM pg_catalog.pg_shdepend s
      LEFT JOIN pg_catalog.pg_database d ON d.oid = CASE WHEN s.dbid = 0 THEN s.objid ELSE s.dbid END
     WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
       AND s.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = role)
       AND ((s.dbid <> 0 AND s.dbid <> (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()))
            OR (s.dbid = 0 AND s.classid = 'pg_catalog.pg_database'::pg_catalog.regclass
                AND s.objid <> (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())))
     LIMIT 1;
END;
REVOKE ALL ON FUNCTION events_role_used_elsewhere(name) FROM PUBLIC;

CREATE FUNCTION events_grant_roles(prefix text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_job   text;
    v_role  name;
    v_old   name;
    v_other name;
    v_roles name[] := '{}';
    v_capture_roles name[] := '{}';  -- the owners of the trigger functions: this one, previous ones
    v_member name;
    v_capture name := prefix || '_capture';
    v_schema  name := (SELECT n.nspname FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'events'::regclass);
    v_admin   name := prefix || '_capture_admin';
    -- The trigger functions (owned by the capture role) and the management functions (executed
    -- by admins); capture_update_statement is only called by capture_update, as its owner.
    v_triggers text := 'capture_insert(), capture_update(), capture_delete(), capture_truncate()';
    v_owned    text := 'capture_column_names(oid, text), capture_key_object(jsonb, text[]), '
                       'capture_key_text(jsonb, text[]), capture_update_statement(oid, text, text, boolean)';
    v_manage   text := 'capture_trigger_name(text), capture_add(regclass, text, text[], text[], text[], boolean), '
                       'capture_add(text, text, text[], text[], text[], boolean), capture_remove(regclass), '
                       'capture_remove(text), capture_table(text), capture_list()';
BEGIN
    PERFORM events_grant_stream_roles(prefix); -- validates the prefix too

    FOREACH v_job IN ARRAY ARRAY['capture', 'capture_admin'] LOOP
        v_role := prefix || '_' || v_job;
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_role) THEN
            EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', v_role);
        END IF;
        v_other := events_role_used_elsewhere(v_role);
        IF v_other IS NOT NULL THEN
            RAISE EXCEPTION 'role % already holds privileges in database % of this cluster', v_role, v_other
                USING ERRCODE = '42501',
                      HINT = 'every database''s event stream needs roles of its own: run migrate with --role-prefix <name> (e.g. the database name)';
        END IF;
        -- The previous role of this job (V5's events_* before any was recorded) loses what it held.
        SELECT r.role INTO v_old FROM event_stream_roles r WHERE r.job = v_job;
        v_old := coalesce(v_old, ('events_' || v_job)::name);
        IF v_old <> v_role AND EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_old) THEN
            v_roles := v_roles || v_old;
        END IF;
        v_roles := v_roles || v_role;
        IF v_job = 'capture' THEN
            v_capture_roles := v_capture_roles || v_role;
            IF v_old <> v_role AND EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_old) THEN
                v_capture_roles := v_capture_roles || v_old;
            END IF;
        END IF;
        INSERT INTO event_stream_roles AS r (job, role) VALUES (v_job, v_role)
        ON CONFLICT ON CONSTRAINT event_stream_roles_pkey DO UPDATE SET role = EXCLUDED.role;
    END LOOP;

    -- Handing the functions over (ALTER FUNCTION … OWNER TO) needs, for a migrating owner that is
    -- not a superuser, membership in the new owner and the new owner's CREATE on the schema; the
    -- latter only for the moment of the handover (taken back below, from every capture role).
    IF NOT pg_catalog.pg_has_role(current_user, v_capture, 'MEMBER') THEN
        EXECUTE pg_catalog.format('GRANT %I TO %I', v_capture, current_user);
    END IF;
    EXECUTE pg_catalog.format('GRANT CREATE ON SCHEMA %I TO %I', v_schema, v_capture);
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION capture_insert() OWNER TO %1$I;
         ALTER FUNCTION capture_update() OWNER TO %1$I;
         ALTER FUNCTION capture_delete() OWNER TO %1$I;
         ALTER FUNCTION capture_truncate() OWNER TO %1$I;
         ALTER FUNCTION capture_column_names(oid, text) OWNER TO %1$I;
         ALTER FUNCTION capture_key_object(jsonb, text[]) OWNER TO %1$I;
         ALTER FUNCTION capture_key_text(jsonb, text[]) OWNER TO %1$I;
         ALTER FUNCTION capture_update_statement(oid, text, text, boolean) OWNER TO %1$I;', v_capture);

    -- Start from nothing, for the new roles and the previous ones alike (CREATE on the schema:
    -- the migrate binary lets V5's owner have it while V5 hands over the functions).
    FOREACH v_role IN ARRAY v_roles LOOP
        EXECUTE pg_catalog.format(
            'REVOKE ALL ON events FROM %1$I;
             REVOKE ALL ON SEQUENCE events_id_seq FROM %1$I;
             REVOKE ALL ON FUNCTION %2$s, %3$s FROM %1$I;
             REVOKE CREATE ON SCHEMA %4$I FROM %1$I;', v_role, v_triggers, v_manage, v_schema);
    END LOOP;
    -- Nobody but the capture role runs the helpers (the trigger functions fire without an EXECUTE
    -- check; admins need EXECUTE on them for CREATE TRIGGER, granted below).
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s, %s, %s FROM PUBLIC', v_triggers, v_owned, v_manage);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_owned, v_capture);

    -- Append only: the columns a producer may write, minus event_id (capture never chooses one).
    EXECUTE pg_catalog.format(
        'GRANT INSERT (topic, key, type, payload) ON events TO %1$I;
         GRANT USAGE ON SEQUENCE events_id_seq TO %1$I;', v_capture);
    -- Admins attach the trigger functions to tables they own, and manage capture.
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s, %s TO %I', v_triggers, v_manage, v_admin);

    -- Nobody is a member of a capture role, this one or a previous one: the migrating owner
    -- needed it only for the handover above, and V5 made every migrating owner, of any database,
    -- a member of events_capture (who could then append to this database's events as that role).
    FOREACH v_role IN ARRAY v_capture_roles LOOP
        FOR v_member IN SELECT m.member::regrole::name FROM pg_catalog.pg_auth_members m
                         WHERE m.roleid = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = v_role) LOOP
            BEGIN
                EXECUTE pg_catalog.format('REVOKE %I FROM %I', v_role, v_member);
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE WARNING 'cannot revoke % from % (run as a superuser: REVOKE % FROM %)',
                              v_role, v_member, v_role, v_member;
            END;
        END LOOP;
    END LOOP;
END
$fn$;
REVOKE ALL ON FUNCTION events_grant_roles(text) FROM PUBLIC;
