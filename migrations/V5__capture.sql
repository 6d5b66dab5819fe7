-- Table-change capture: row changes of user tables become events in `events`, committed in the same
-- transaction as the change.
--
-- Each captured table gets statement-level AFTER triggers with transition tables (one each for
-- INSERT, UPDATE and DELETE, since a transition-table trigger handles one event, plus a TRUNCATE
-- trigger without them). Each fires once per statement and writes all of the statement's events
-- with one INSERT … SELECT.
--
-- The capture settings live in the triggers' own arguments (topic, key and excluded column numbers,
-- full_old): they belong to the table, go wherever the table goes (pg_dump, rename) and vanish with
-- it, and no settings table can drift from the triggers that use it. Columns are stored by number
-- (attnum), never by name, and names are looked up per statement, so renaming a column neither
-- breaks capture nor lets an excluded column leak under its new name. Rows are turned into JSON with
-- `to_jsonb(row)`, never through a fixed column list, so ADD/DROP/RENAME COLUMN need no refresh:
-- the next statement's events carry the table's new shape.
--
-- Privileges:
-- - `events_capture` (NOLOGIN, never granted to anyone) owns the SECURITY DEFINER trigger
--   functions and may only append to `events`. Writers of a captured table need no privilege on
--   `events` at all.
-- - `events_capture_admin` (NOLOGIN) may add and remove capture. Grant it to the role that owns
--   (and migrates) the tables to capture; `capture_add` additionally requires the caller to own
--   the table. Without it anyone able to create a table could publish events on any topic.
-- Roles are cluster-wide, so they are created only when missing (as in V2).
--
-- Everything below is created in the schema that holds `events`, found at migration time, and
-- every function pins `search_path = pg_catalog, pg_temp` and qualifies what it names: a caller's
-- own objects (a function, operator or table called like ours, in any schema or pg_temp) cannot
-- take over a SECURITY DEFINER function.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'events_capture') THEN
        CREATE ROLE events_capture NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'events_capture_admin') THEN
        CREATE ROLE events_capture_admin NOLOGIN;
    END IF;
END
$$;

-- Append only: the same columns a producer may write, minus event_id (capture never chooses one).
GRANT INSERT (topic, key, type, payload) ON events TO events_capture;
GRANT USAGE ON SEQUENCE events_id_seq TO events_capture;

DO $migration$
DECLARE
    -- The schema that holds `events` (normally public), quoted for splicing into function bodies.
    s text := (SELECT pg_catalog.quote_ident(n.nspname)
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE c.oid = 'events'::regclass);
    body text;
    caller_path text := pg_catalog.current_setting('search_path');
BEGIN
    -- Bodies written as SQL-standard functions (BEGIN ATOMIC) are bound to the objects their names
    -- resolve to now, so resolve them in pg_catalog only (restored at the end of this block).
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    -- A non-superuser migrating role must be able to SET ROLE events_capture to hand it the
    -- trigger functions (ALTER … OWNER TO).
    IF NOT pg_catalog.pg_has_role(current_user, 'events_capture', 'MEMBER') THEN
        EXECUTE pg_catalog.format('GRANT events_capture TO %I', current_user);
    END IF;

    ------------------------------------------------------------------------------------------------
    -- The trigger functions. Per statement they need the topic and the current names of the key
    -- and excluded columns (stored as numbers, so a rename is followed). The names come from the
    -- catalog caches through pg_identify_object_as_address and TG_TABLE_SCHEMA/TG_TABLE_NAME,
    -- plain expressions instead of a catalog query: measured per single-row statement, a query
    -- here cost ~55 µs, as much as writing the event itself; the expressions cost ~5 µs.
    body := $body$
-- Current names of the columns numbered in `attnums` ('1,3'). A dropped column's name is a
-- placeholder that matches no key of a row, so it simply stops mattering.
CREATE FUNCTION @s@.capture_column_names(relid oid, attnums text) RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    names text[] := '{}';
    num int2;
BEGIN
    IF attnums IS NULL OR attnums = '' THEN
        RETURN names;
    END IF;
    FOREACH num IN ARRAY pg_catalog.string_to_array(attnums, ',')::int2[] LOOP
        names := names OPERATOR(pg_catalog.||)
                 (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass, relid, num)).object_names[3];
    END LOOP;
    RETURN names;
END
$f$;

-- For keys of several columns (one-column keys, the common case, are handled inline with no
-- call per row): the key as a JSON object, and as compact JSON text `{"a":1,"b":"x"}` in key
-- order. SQL-standard bodies are bound when created, so no search_path can redirect them.
CREATE FUNCTION @s@.capture_key_object(row_json jsonb, key_names text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT COALESCE(pg_catalog.jsonb_object_agg(u.k, row_json OPERATOR(pg_catalog.->) u.k), '{}')
      FROM pg_catalog.unnest(key_names) AS u(k);
END;

CREATE FUNCTION @s@.capture_key_text(row_json jsonb, key_names text[]) RETURNS text
LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
    SELECT '{' OPERATOR(pg_catalog.||)
           pg_catalog.string_agg(pg_catalog.to_json(u.k)::text OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||)
                                 COALESCE((row_json OPERATOR(pg_catalog.->) u.k)::text, 'null'), ',' ORDER BY u.i)
           OPERATOR(pg_catalog.||) '}'
      FROM pg_catalog.unnest(key_names) WITH ORDINALITY AS u(k, i);
END;

-- Trigger arguments: topic, key column numbers, excluded column numbers, full_old.
CREATE FUNCTION @s@.capture_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    key_names text[] := @s@.capture_column_names(TG_RELID, TG_ARGV[1]);
    excluded text[] := @s@.capture_column_names(TG_RELID, TG_ARGV[2]);
    one_key text := CASE WHEN pg_catalog.cardinality(key_names) = 1 THEN key_names[1] END;
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::text OPERATOR(pg_catalog.||) ':';
BEGIN
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||) COALESCE((r.j OPERATOR(pg_catalog.->) one_key)::text, 'null') OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(r.j, key_names) END,
           'insert',
           pg_catalog.jsonb_build_object(
               'op', 'insert', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
               'key', CASE WHEN one_key IS NOT NULL
                           THEN pg_catalog.jsonb_build_object(one_key, r.j OPERATOR(pg_catalog.->) one_key)
                           ELSE @s@.capture_key_object(r.j, key_names) END,
               'new', r.j)
      FROM (SELECT pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.-) excluded AS j FROM capture_new t OFFSET 0) r;
    RETURN NULL;
END
$f$;

CREATE FUNCTION @s@.capture_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    key_names text[] := @s@.capture_column_names(TG_RELID, TG_ARGV[1]);
    excluded text[] := @s@.capture_column_names(TG_RELID, TG_ARGV[2]);
    one_key text := CASE WHEN pg_catalog.cardinality(key_names) = 1 THEN key_names[1] END;
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::text OPERATOR(pg_catalog.||) ':';
BEGIN
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||) COALESCE((r.j OPERATOR(pg_catalog.->) one_key)::text, 'null') OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(r.j, key_names) END,
           'delete',
           pg_catalog.jsonb_build_object(
               'op', 'delete', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
               'key', CASE WHEN one_key IS NOT NULL
                           THEN pg_catalog.jsonb_build_object(one_key, r.j OPERATOR(pg_catalog.->) one_key)
                           ELSE @s@.capture_key_object(r.j, key_names) END,
               'old', r.j)
      FROM (SELECT pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.-) excluded AS j FROM capture_old t OFFSET 0) r;
    RETURN NULL;
END
$f$;

-- Old and new rows are paired by key. A pair whose captured columns are all equal emits nothing;
-- an old row without a partner is a delete of its key, a new row without one an insert (an UPDATE
-- that changed the key). `changed` lists only the columns whose values differ: one pass over the
-- new row's fields with a keyed lookup into the old row (no join of two field lists per row).
--
-- Cost notes, measured on a 100k-row UPDATE: without the OFFSET 0 fences the planner pulls the
-- subqueries up and evaluates to_jsonb(row) once per reference (sort key, join key, filter,
-- output): 2.7x slower. JIT is off: the join's row estimate over transition tables is wild
-- (millions), so JIT would compile for ~0.3 s on every bulk statement and win nothing back.
CREATE FUNCTION @s@.capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    key_names text[] := @s@.capture_column_names(TG_RELID, TG_ARGV[1]);
    excluded text[] := @s@.capture_column_names(TG_RELID, TG_ARGV[2]);
    full_old boolean := TG_ARGV[3] = 'true';
    one_key text := CASE WHEN pg_catalog.cardinality(key_names) = 1 THEN key_names[1] END;
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::text OPERATOR(pg_catalog.||) ':';
BEGIN
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||) COALESCE((COALESCE(p.nj, p.oj) OPERATOR(pg_catalog.->) one_key)::text, 'null') OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(COALESCE(p.nj, p.oj), key_names) END,
           CASE WHEN p.nj IS NULL THEN 'delete' WHEN p.oj IS NULL THEN 'insert' ELSE 'update' END,
           CASE
           WHEN p.nj IS NULL THEN
               pg_catalog.jsonb_build_object('op', 'delete', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                             'key', p.ok, 'old', p.oj)
           WHEN p.oj IS NULL THEN
               pg_catalog.jsonb_build_object('op', 'insert', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                             'key', p.nk, 'new', p.nj)
           WHEN full_old THEN
               pg_catalog.jsonb_build_object(
                   'op', 'update', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'key', p.nk, 'new', p.nj,
                   'old', p.oj,
                   'changed', (SELECT pg_catalog.jsonb_object_agg(
                                          f.key, pg_catalog.jsonb_build_object('old', p.oj OPERATOR(pg_catalog.->) f.key, 'new', f.value))
                                 FROM pg_catalog.jsonb_each(p.nj) f
                                WHERE f.value IS DISTINCT FROM p.oj OPERATOR(pg_catalog.->) f.key))
           ELSE
               pg_catalog.jsonb_build_object(
                   'op', 'update', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'key', p.nk, 'new', p.nj,
                   'changed', (SELECT pg_catalog.jsonb_object_agg(
                                          f.key, pg_catalog.jsonb_build_object('old', p.oj OPERATOR(pg_catalog.->) f.key, 'new', f.value))
                                 FROM pg_catalog.jsonb_each(p.nj) f
                                WHERE f.value IS DISTINCT FROM p.oj OPERATOR(pg_catalog.->) f.key))
           END
      FROM (SELECT o.j AS oj, o.k AS ok, n.j AS nj, n.k AS nk
              FROM (SELECT x.j,
                           CASE WHEN one_key IS NOT NULL
                                THEN pg_catalog.jsonb_build_object(one_key, x.j OPERATOR(pg_catalog.->) one_key)
                                ELSE @s@.capture_key_object(x.j, key_names) END AS k
                      FROM (SELECT pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.-) excluded AS j
                              FROM capture_old t OFFSET 0) x OFFSET 0) o
              FULL JOIN
                   (SELECT x.j,
                           CASE WHEN one_key IS NOT NULL
                                THEN pg_catalog.jsonb_build_object(one_key, x.j OPERATOR(pg_catalog.->) one_key)
                                ELSE @s@.capture_key_object(x.j, key_names) END AS k
                      FROM (SELECT pg_catalog.to_jsonb(t) OPERATOR(pg_catalog.-) excluded AS j
                              FROM capture_new t OFFSET 0) x OFFSET 0) n
                ON o.k OPERATOR(pg_catalog.=) n.k
            OFFSET 0) p
     WHERE p.oj IS DISTINCT FROM p.nj;
    RETURN NULL;
END
$f$;

CREATE FUNCTION @s@.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $f$
BEGIN
    INSERT INTO @s@.events (topic, key, type, payload)
    VALUES (TG_ARGV[0], NULL, 'truncate',
            pg_catalog.jsonb_build_object('op', 'truncate', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME));
    RETURN NULL;
END
$f$;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);

    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_column_names(oid, text) OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_key_object(jsonb, text[]) OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_key_text(jsonb, text[]) OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_insert() OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_update() OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_delete() OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_truncate() OWNER TO events_capture', s);

    ------------------------------------------------------------------------------------------------
    -- Management, called by the table owner (a member of events_capture_admin), e.g. from the
    -- owner's own migrations. SECURITY INVOKER: the triggers are created with the caller's rights,
    -- so nobody gains a right over a table through these functions.
    body := $body$
-- The triggers capture uses, by operation.
CREATE FUNCTION @s@.capture_trigger_name(op text) RETURNS name
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
RETURN ('events_capture_' OPERATOR(pg_catalog.||) op)::name;

-- A table name as text → regclass, with an error that names the table when it does not exist.
-- No pinned search_path here: the name resolves as it would in the caller's own SQL.
CREATE FUNCTION @s@.capture_table(name text) RETURNS regclass
LANGUAGE plpgsql STABLE
AS $f$
DECLARE
    tab regclass := pg_catalog.to_regclass(name);
BEGIN
    IF tab IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', pg_catalog.quote_literal(name)
            USING ERRCODE = 'undefined_table',
                  HINT = 'quote names that need it, e.g. ''sales."Order Items"''';
    END IF;
    RETURN tab;
END
$f$;

-- Starts capturing `tab`'s row changes as events on `topic`.
--   ops:             any of insert, update, delete, truncate (default: all four)
--   exclude_columns: columns that never appear in any event (stored by number: a rename keeps them out)
--   key_columns:     the row key (default: the primary key; required when there is none)
--   full_old:        updates also carry the whole old row under "old"
-- Adding capture to a table that already has it is an error (remove it first): a silent replace
-- would hide a conflicting second configuration, e.g. from two migrations.
CREATE FUNCTION @s@.capture_add(
    tab regclass, topic text,
    ops text[] DEFAULT ARRAY['insert', 'update', 'delete', 'truncate'],
    exclude_columns text[] DEFAULT '{}',
    key_columns text[] DEFAULT NULL,
    full_old boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    rel record;
    keys int2[];
    excl int2[] := '{}';
    col text;
    num int2;
    op text;
    args text;
BEGIN
    IF tab IS NULL OR topic IS NULL THEN
        RAISE EXCEPTION 'capture_add needs a table and a topic' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.oid, c.relkind, c.relowner, n.nspname, c.relname INTO rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tab;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table: only ordinary and partitioned tables can be captured', tab
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF rel.nspname IN ('pg_catalog', 'information_schema') OR rel.nspname LIKE 'pg\_%' THEN
        RAISE EXCEPTION 'system table % cannot be captured', tab USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF tab = '@s@.events'::regclass THEN
        RAISE EXCEPTION 'the events table itself cannot be captured' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_catalog.pg_has_role(current_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to capture it (its owner is %)',
                        tab, pg_catalog.pg_get_userbyid(rel.relowner)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'run capture_add as the table''s owner, who must be a member of events_capture_admin';
    END IF;
    IF topic !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'bad topic %: 1 to 128 letters, digits, ''_'', ''.'' or ''-'', starting with a letter or digit',
                        pg_catalog.quote_literal(topic) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ops IS NULL OR pg_catalog.cardinality(ops) = 0 THEN
        RAISE EXCEPTION 'capture_add needs at least one operation (insert, update, delete, truncate)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH op IN ARRAY ops LOOP
        IF op IS NULL OR op NOT IN ('insert', 'update', 'delete', 'truncate') THEN
            RAISE EXCEPTION 'unknown operation %: use insert, update, delete or truncate', pg_catalog.quote_nullable(op)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF EXISTS (SELECT FROM pg_catalog.pg_trigger t
                WHERE t.tgrelid = tab AND t.tgname LIKE 'events\_capture\_%') THEN
        RAISE EXCEPTION 'table % is already captured', tab
            USING ERRCODE = 'duplicate_object',
                  HINT = 'call capture_remove first to change its settings';
    END IF;

    -- Columns by number, validated against the table as it is now.
    FOREACH col IN ARRAY COALESCE(exclude_columns, '{}') LOOP
        SELECT a.attnum INTO num FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = tab AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF num IS NULL THEN
            RAISE EXCEPTION 'table % has no column %', tab, pg_catalog.quote_ident(col) USING ERRCODE = 'undefined_column';
        END IF;
        excl := excl OPERATOR(pg_catalog.||) num;
    END LOOP;
    IF key_columns IS NULL OR pg_catalog.cardinality(key_columns) = 0 THEN
        SELECT i.indkey::int2[] INTO keys FROM pg_catalog.pg_index i
         WHERE i.indrelid = tab AND i.indisprimary;
        IF keys IS NULL THEN
            RAISE EXCEPTION 'table % has no primary key: name the columns that identify a row', tab
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'pass key_columns => ARRAY[''col'', …] (eventsctl: --key-columns)';
        END IF;
    ELSE
        keys := '{}';
        FOREACH col IN ARRAY key_columns LOOP
            SELECT a.attnum INTO num FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = tab AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
            IF num IS NULL THEN
                RAISE EXCEPTION 'table % has no column %', tab, pg_catalog.quote_ident(col) USING ERRCODE = 'undefined_column';
            END IF;
            IF num OPERATOR(pg_catalog.=) ANY (keys) THEN
                RAISE EXCEPTION 'key column % is named twice', pg_catalog.quote_ident(col) USING ERRCODE = 'invalid_parameter_value';
            END IF;
            keys := keys OPERATOR(pg_catalog.||) num;
        END LOOP;
    END IF;
    IF keys OPERATOR(pg_catalog.&&) excl THEN
        RAISE EXCEPTION 'a key column cannot be excluded: every event carries its key'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    args := pg_catalog.format('%L, %L, %L, %L', topic, pg_catalog.array_to_string(keys, ','),
                              pg_catalog.array_to_string(excl, ','), COALESCE(full_old, false)::text);
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
        CONTINUE WHEN NOT op OPERATOR(pg_catalog.=) ANY (ops);
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION @s@.%I(%s)',
            @s@.capture_trigger_name(op), pg_catalog.upper(op), tab,
            CASE op WHEN 'insert' THEN 'REFERENCING NEW TABLE AS capture_new'
                    WHEN 'update' THEN 'REFERENCING OLD TABLE AS capture_old NEW TABLE AS capture_new'
                    WHEN 'delete' THEN 'REFERENCING OLD TABLE AS capture_old'
                    ELSE '' END,
            'capture_' OPERATOR(pg_catalog.||) op, args);
    END LOOP;
END
$f$;

-- The same, with the table as text (`'sales."Order Items"'`), for callers that hold a name.
CREATE FUNCTION @s@.capture_add(
    tab text, topic text,
    ops text[] DEFAULT ARRAY['insert', 'update', 'delete', 'truncate'],
    exclude_columns text[] DEFAULT '{}',
    key_columns text[] DEFAULT NULL,
    full_old boolean DEFAULT false)
RETURNS void
LANGUAGE sql
BEGIN ATOMIC
    SELECT @s@.capture_add(@s@.capture_table(tab), topic, ops, exclude_columns, key_columns, full_old);
END;

-- Stops capturing `tab`: drops its capture triggers and nothing else. Returns whether it was
-- captured. Dropping a trigger needs the table's ownership, which PostgreSQL checks itself.
CREATE FUNCTION @s@.capture_remove(tab regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    trig name;
    found boolean := false;
BEGIN
    FOR trig IN SELECT t.tgname FROM pg_catalog.pg_trigger t
                 WHERE t.tgrelid = tab AND t.tgname LIKE 'events\_capture\_%' LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', trig, tab);
        found := true;
    END LOOP;
    RETURN found;
END
$f$;

CREATE FUNCTION @s@.capture_remove(tab text) RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
    SELECT @s@.capture_remove(@s@.capture_table(tab));
END;

-- Every captured table with its settings, read back from the triggers themselves.
CREATE FUNCTION @s@.capture_list()
RETURNS TABLE (schema_name text, table_name text, topic text, ops text[],
               key_columns text[], exclude_columns text[], full_old boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT n.nspname::text, c.relname::text, g.args[1], g.ops,
           (SELECT pg_catalog.array_agg(a.attname::text ORDER BY pg_catalog.array_position(g.keys, a.attnum))
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND NOT a.attisdropped AND a.attnum = ANY (g.keys)),
           COALESCE((SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND NOT a.attisdropped AND a.attnum = ANY (g.excl)), '{}'),
           g.args[4] = 'true'
      FROM (SELECT t.tgrelid, t.ops, t.args,
                   pg_catalog.string_to_array(t.args[2], ',')::int2[] AS keys,
                   pg_catalog.string_to_array(NULLIF(t.args[3], ''), ',')::int2[] AS excl
              FROM (SELECT t.tgrelid,
                           pg_catalog.array_agg(pg_catalog.substr(t.tgname, 16)::text ORDER BY
                               pg_catalog.array_position(ARRAY['insert', 'update', 'delete', 'truncate'], pg_catalog.substr(t.tgname, 16)::text)) AS ops,
                           -- tgargs: the arguments, each ended by a NUL byte (\000 once escaped).
                           pg_catalog.string_to_array(pg_catalog.min(pg_catalog.encode(t.tgargs, 'escape')), '\000') AS args
                      FROM pg_catalog.pg_trigger t
                     WHERE t.tgname LIKE 'events\_capture\_%'
                       AND t.tgfoid IN ('@s@.capture_insert()'::regprocedure, '@s@.capture_update()'::regprocedure,
                                        '@s@.capture_delete()'::regprocedure, '@s@.capture_truncate()'::regprocedure)
                     GROUP BY t.tgrelid) t) g
      JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     ORDER BY 1, 2;
END;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);

    -- New functions are executable by PUBLIC. Trigger functions cannot be called directly, but a
    -- role able to attach them to a table it owns could publish events on any topic, so only
    -- capture admins may; the management functions likewise.
    body := $body$
REVOKE EXECUTE ON FUNCTION @s@.capture_column_names(oid, text), @s@.capture_key_object(jsonb, text[]), @s@.capture_key_text(jsonb, text[]),
    @s@.capture_insert(), @s@.capture_update(), @s@.capture_delete(), @s@.capture_truncate(),
    @s@.capture_trigger_name(text), @s@.capture_add(regclass, text, text[], text[], text[], boolean),
    @s@.capture_add(text, text, text[], text[], text[], boolean), @s@.capture_remove(regclass),
    @s@.capture_remove(text), @s@.capture_table(text), @s@.capture_list()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @s@.capture_insert(), @s@.capture_update(), @s@.capture_delete(),
    @s@.capture_truncate(), @s@.capture_trigger_name(text),
    @s@.capture_add(regclass, text, text[], text[], text[], boolean),
    @s@.capture_add(text, text, text[], text[], text[], boolean), @s@.capture_remove(regclass),
    @s@.capture_remove(text), @s@.capture_table(text), @s@.capture_list()
    TO events_capture_admin;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);
    PERFORM pg_catalog.set_config('search_path', caller_path, true);
END
$migration$;
