-- Table-change capture, hardened: the SECURITY DEFINER trigger functions never evaluate code a
-- table owner (or any role but a superuser) controls, and their state is checked.
--
-- The hole (issue 25): the triggers turn rows into JSON with to_jsonb, and to_jsonb consults a
-- CAST to json for any type created after initdb — also inside domains, arrays and composites.
-- Whoever owns a type may create such a cast, so a table owner could run any SQL as the capture
-- role (which owns the trigger functions) and from there forge events, re-grant or alter the
-- functions and wait for a superuser to write a captured table.
--
-- What is serialised how, by the type a column's value reaches (through domains to their base
-- type, through arrays to their elements, through composites owned by a superuser to their
-- fields):
-- * built-in types, and types owned by a superuser (extensions such as PostGIS or hstore, and
--   their casts to json): to_jsonb, as before. Nobody but a superuser can create a cast from
--   them.
-- * enums, ranges, multiranges, base types and composites owned by any other role, a domain
--   over one, an array of one, a superuser's composite containing one: the value's text output
--   (PostgreSQL's own output function, through format('%s'), which never consults a cast), as a
--   JSON string. For an enum or a range that is exactly what to_jsonb gave without a cast; an
--   array or composite of them arrives as one string in PostgreSQL's text form ('{a,b}',
--   '(1,ok)'). Those tables run a statement generated from their current columns.
-- Nothing is refused: a write never fails because of a type, and a cast created later changes
-- nothing, since the choice depends on who owns a type (only a superuser can give a type to or
-- take it from a superuser), never on which casts exist at the moment (a check for casts would
-- race with CREATE CAST).
--
-- Catalog queries read the transaction's snapshot, while a statement sees the table as it is.
-- Under READ COMMITTED the trigger's snapshot is taken after the statement's rows were written,
-- so it knows every column they have; under REPEATABLE READ or SERIALIZABLE a column added or
-- retyped after the snapshot would go unseen, so there the trigger first compares the columns
-- it knows with the statement's own and fails with SQLSTATE 40001 (retry) when they differ.
--
-- Also:
-- * Every operator and function in the trigger bodies and in the statements they generate is
--   schema-qualified (OPERATOR(pg_catalog.=), pg_catalog.to_jsonb, …); search_path stays pinned
--   to pg_catalog, pg_temp. IS DISTINCT FROM (which has no qualified form) compares jsonb values
--   only, through pg_catalog's operator: pg_temp is never searched for operators.
-- * The capture role owns the four trigger functions and nothing else: the helpers they call
--   belong to the owner of `events` (SECURITY INVOKER, so they still run as the capture role).
-- * capture_functions records what every capture function must look like (owner, SECURITY
--   DEFINER or not, settings, who may execute it, the trigger functions' source); capture_check()
--   lists every difference, and what the capture role owns or is granted beyond it. `migrate`
--   and every service run it and refuse to go on when it finds something. A later migration
--   that changes a capture function updates its row here.
-- * Consumer positions (issue 25, part 5): a position row is written only by a role that can log
--   in (a row created under SET ROLE <prefix>_consumer belonged to the group, so every member
--   could move it), and once the database owner ties names to logins in consumer_names, a login
--   may create or claim only the names registered to it (no squatting a name another login needs,
--   no rows for names it will never use). With consumer_names empty, names are first come, first
--   served, as in V4.

DO $migration$
DECLARE
    s text := (SELECT pg_catalog.quote_ident(n.nspname)
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE c.oid = 'events'::regclass);
    events_owner name := (SELECT c.relowner::regrole::name FROM pg_catalog.pg_class c WHERE c.oid = 'events'::regclass);
    capture_owner name := (SELECT p.proowner::regrole::name FROM pg_catalog.pg_proc p
                            WHERE p.oid = 'capture_insert()'::regprocedure);
    body text;
    caller_path text := pg_catalog.current_setting('search_path');
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    -- Replacing the trigger functions needs the rights of their owner; events_grant_roles (run by
    -- migrate right after the migrations) takes the membership back.
    IF NOT pg_catalog.pg_has_role(current_user, capture_owner, 'USAGE') THEN
        EXECUTE pg_catalog.format('GRANT %I TO %I', capture_owner, current_user);
    END IF;
    -- The helpers move to the owner of events: the capture role keeps only what needs its rights.
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION %1$s.capture_column_names(oid, text) OWNER TO %2$I;
         ALTER FUNCTION %1$s.capture_key_object(jsonb, text[]) OWNER TO %2$I;
         ALTER FUNCTION %1$s.capture_key_text(jsonb, text[]) OWNER TO %2$I;
         DROP FUNCTION %1$s.capture_update_statement(oid, text, text, boolean);', s, events_owner);

    body := $body$
-- The columns of `relid` whose values are serialised by their text output (see the top of this
-- file): by attnum, in order; empty for almost every table. Catalog look-ups only.
--
-- PL/pgSQL rather than SQL: its plans are kept for the session (a SQL function's recursive query
-- was planned again on every statement, 0.8 ms), and a table without a column of a type created
-- after initdb, the common case, costs one index look-up.
CREATE FUNCTION @s@.capture_text_columns(relid oid) RETURNS int2[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid OPERATOR(pg_catalog.=) relid AND a.attnum OPERATOR(pg_catalog.>) 0
                      AND NOT a.attisdropped AND a.atttypid OPERATOR(pg_catalog.>=) 16384::oid) THEN
        RETURN '{}';
    END IF;
    RETURN (WITH RECURSIVE walk(attnum, typ) AS (
        SELECT a.attnum, a.atttypid
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) relid AND a.attnum OPERATOR(pg_catalog.>) 0
           AND NOT a.attisdropped AND a.atttypid OPERATOR(pg_catalog.>=) 16384::oid
        UNION
        SELECT w.attnum, x.typ
          FROM walk w
          JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) w.typ
          LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) t.typowner
         CROSS JOIN LATERAL (
               SELECT t.typbasetype WHERE t.typtype OPERATOR(pg_catalog.=) 'd'
               UNION ALL
               SELECT t.typelem WHERE t.typtype OPERATOR(pg_catalog.<>) 'd'
                                  AND t.typsubscript OPERATOR(pg_catalog.=) 'pg_catalog.array_subscript_handler'::pg_catalog.regproc
                                  AND t.typelem OPERATOR(pg_catalog.<>) 0::oid
               UNION ALL
               SELECT f.atttypid FROM pg_catalog.pg_attribute f
                WHERE t.typtype OPERATOR(pg_catalog.=) 'c' AND r.rolsuper
                  AND f.attrelid OPERATOR(pg_catalog.=) t.typrelid AND f.attnum OPERATOR(pg_catalog.>) 0
                  AND NOT f.attisdropped) x(typ)
         WHERE x.typ OPERATOR(pg_catalog.>=) 16384::oid
    )
    SELECT COALESCE(pg_catalog.array_agg(DISTINCT w.attnum ORDER BY w.attnum), '{}')
      FROM walk w
      LEFT JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) w.typ
      LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) t.typowner
     WHERE t.oid IS NULL
        OR (t.typtype OPERATOR(pg_catalog.<>) 'd'
            AND NOT (t.typsubscript OPERATOR(pg_catalog.=) 'pg_catalog.array_subscript_handler'::pg_catalog.regproc
                     AND t.typelem OPERATOR(pg_catalog.<>) 0::oid)
            AND r.rolsuper IS NOT TRUE));
END
$f$;

-- Under REPEATABLE READ or SERIALIZABLE: a statement (run by the trigger, which alone sees the
-- transition table `transition`) that answers whether the columns this transaction's snapshot
-- knows for `relid` are the columns, and types, of the statement's rows. The types come from
-- parsing that statement, which sees the table as it is.
CREATE FUNCTION @s@.capture_columns_probe(relid oid, transition text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    natts int2;
    known oid[];
    probes text;
BEGIN
    SELECT c.relnatts INTO natts FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) relid;
    -- A column added after the snapshot: the catalog caches know its name.
    IF (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass, relid,
                                                  (natts OPERATOR(pg_catalog.+) 1)::pg_catalog.int4)).object_names IS NOT NULL THEN
        RETURN 'SELECT false';
    END IF;
    SELECT pg_catalog.array_agg(a.atttypid ORDER BY a.attnum),
           pg_catalog.string_agg(pg_catalog.format('pg_catalog.pg_typeof(t.%I)::pg_catalog.oid', a.attname), ', ' ORDER BY a.attnum)
      INTO known, probes
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) relid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
    RETURN pg_catalog.format(
        'SELECT ARRAY[%s]::pg_catalog.oid[] OPERATOR(pg_catalog.=) %L::pg_catalog.oid[] FROM (SELECT) AS one LEFT JOIN %I AS t ON false',
        COALESCE(probes, ''), COALESCE(known, '{}'), transition);
END
$f$;

-- A JSON expression for value `v` (SQL text) of a column: to_jsonb, or for a column in
-- capture_text_columns its text output as a JSON string (NULL stays NULL; num_nulls looks at
-- the datum only, so a composite with null fields is still a value).
CREATE FUNCTION @s@.capture_json_expression(v text, as_text boolean) RETURNS text
LANGUAGE sql IMMUTABLE
RETURN CASE WHEN as_text
            THEN 'CASE WHEN pg_catalog.num_nulls(' OPERATOR(pg_catalog.||) v OPERATOR(pg_catalog.||)
                 ') OPERATOR(pg_catalog.=) 0 THEN pg_catalog.to_jsonb(pg_catalog.format(''%s'', '
                 OPERATOR(pg_catalog.||) v OPERATOR(pg_catalog.||) ')) END'
            ELSE 'pg_catalog.to_jsonb(' OPERATOR(pg_catalog.||) v OPERATOR(pg_catalog.||) ')' END;

-- The row as JSON, built column by column from alias `t` (never to_jsonb of the row, which would
-- meet every column's type): the captured columns only.
CREATE FUNCTION @s@.capture_row_expression(relid oid, excluded_attnums text, text_cols int2[]) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    excl int4[] := COALESCE(pg_catalog.string_to_array(NULLIF(excluded_attnums, ''), ',')::int4[], '{}');
    pairs text[] := '{}';
    col record;
    k int;
    out text := '';
BEGIN
    FOR col IN SELECT a.attnum, a.attname FROM pg_catalog.pg_attribute a
                WHERE a.attrelid OPERATOR(pg_catalog.=) relid AND a.attnum OPERATOR(pg_catalog.>) 0
                  AND NOT a.attisdropped AND a.attnum OPERATOR(pg_catalog.<>) ALL (excl)
                ORDER BY a.attnum LOOP
        pairs := pairs OPERATOR(pg_catalog.||) pg_catalog.format('%L, %s', col.attname,
                     @s@.capture_json_expression(pg_catalog.format('t.%I', col.attname),
                                                 col.attnum OPERATOR(pg_catalog.=) ANY (text_cols)));
    END LOOP;
    IF pg_catalog.cardinality(pairs) OPERATOR(pg_catalog.=) 0 THEN
        RETURN '''{}''::pg_catalog.jsonb';
    END IF;
    -- jsonb_build_object takes at most 100 arguments: 50 columns per call.
    FOR k IN 0 .. (pg_catalog.cardinality(pairs) OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 50 LOOP
        out := out OPERATOR(pg_catalog.||) CASE WHEN k OPERATOR(pg_catalog.>) 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
               OPERATOR(pg_catalog.||) 'pg_catalog.jsonb_build_object('
               OPERATOR(pg_catalog.||) pg_catalog.array_to_string(pairs[k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 1 : k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 50], ', ')
               OPERATOR(pg_catalog.||) ')';
    END LOOP;
    RETURN out;
END
$f$;

-- The INSERT or DELETE statement of a table with columns in capture_text_columns: the generic
-- statement with the row built by capture_row_expression. Parameters when executed: $1 topic,
-- $2 schema, $3 table, $4 the key columns' current names.
CREATE FUNCTION @s@.capture_rows_statement(relid oid, excluded_attnums text, text_cols int2[], op text) RETURNS text
LANGUAGE sql STABLE
RETURN pg_catalog.format($q$
INSERT INTO @s@.events (topic, key, type, payload)
SELECT $1, @s@.capture_key_text(r.j, $4), %1$L,
       pg_catalog.jsonb_build_object('op', %1$L, 'schema', $2, 'table', $3,
                                     'key', @s@.capture_key_object(r.j, $4), %2$L, r.j)
  FROM (SELECT %3$s AS j FROM %4$I t OFFSET 0) r
$q$, op, CASE WHEN op OPERATOR(pg_catalog.=) 'insert' THEN 'new' ELSE 'old' END,
     @s@.capture_row_expression(relid, excluded_attnums, text_cols),
     CASE WHEN op OPERATOR(pg_catalog.=) 'insert' THEN 'capture_new' ELSE 'capture_old' END);

-- The UPDATE statement for a statement of many rows (V6), or of any size for a table with
-- columns in capture_text_columns, generated from the table's current columns. Parameters when
-- executed: $1 topic, $2 schema, $3 table, $4 the excluded columns' current names.
--
-- Columns of types whose equality is exactly the equality of their JSON form are compared as they
-- are (text and varchar byte for byte, as JSON strings compare); any other type through its JSON
-- form. Text columns (capture_text_columns) are compared, keyed and shown by their text output.
CREATE FUNCTION @s@.capture_update_statement(relid oid, key_attnums text, excluded_attnums text, full_old boolean,
                                             text_cols int2[])
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    keys int4[] := pg_catalog.string_to_array(key_attnums, ',')::int4[];
    excl int4[] := COALESCE(pg_catalog.string_to_array(NULLIF(excluded_attnums, ''), ',')::int4[], '{}');
    -- Floats are not here: their JSON text depends on the writer's extra_float_digits.
    as_is regtype[] := ARRAY['pg_catalog.bool', 'pg_catalog.int2', 'pg_catalog.int4', 'pg_catalog.int8',
                             'pg_catalog.numeric', 'pg_catalog.uuid', 'pg_catalog.date', 'pg_catalog.timestamp',
                             'pg_catalog.timestamptz', 'pg_catalog.bytea', 'pg_catalog.jsonb']::pg_catalog.regtype[];
    col record;
    n int := 0;
    cols text := '';            -- ", t.<name> AS cN, …": the captured columns of a row
    differs text;
    js_old text;
    js_new text;
    changed text := '';
    row_pairs text[] := '{}';   -- per captured column: "'name', <JSON of o.cN>" (the old row as JSON)
    old_row text := '';
    column_of int[] := '{}';    -- by attnum: N of the captured column cN
    differs_of text[] := '{}';  -- by attnum: its comparison
    text_of boolean[] := '{}';  -- by attnum: serialised by its text output
    k int;
    c int;
    name text;
    sep text := '';
    key_differs text := 'false';
    key_cols text := '';        -- the key columns of both rows, carried out of the join
    pairs_old text[] := '{}';   -- per key column, in key order: "'name', <JSON of e.ocN>"
    pairs_new text[] := '{}';
    key_old text := '';
    key_new text := '';
    text_old text := '''{''';   -- the key as text: '{' || '"name":' || COALESCE(<JSON of e.ocN>::text, 'null') || … || '}'
    text_new text := '''{''';
    new_row text;
BEGIN
    FOR col IN SELECT a.attnum, a.attname, a.atttypid
                 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid OPERATOR(pg_catalog.=) relid AND a.attnum OPERATOR(pg_catalog.>) 0
                  AND NOT a.attisdropped AND a.attnum OPERATOR(pg_catalog.<>) ALL (excl)
                ORDER BY a.attnum LOOP
        n := n OPERATOR(pg_catalog.+) 1;
        cols := cols OPERATOR(pg_catalog.||) pg_catalog.format(', t.%I AS c%s', col.attname, n);
        text_of[col.attnum] := col.attnum OPERATOR(pg_catalog.=) ANY (text_cols);
        js_old := @s@.capture_json_expression(pg_catalog.format('o.c%s', n), text_of[col.attnum]);
        js_new := @s@.capture_json_expression(pg_catalog.format('n.c%s', n), text_of[col.attnum]);
        differs := CASE
                   WHEN text_of[col.attnum] THEN pg_catalog.format('%s IS DISTINCT FROM %s', js_old, js_new)
                   WHEN col.atttypid OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog.text', 'pg_catalog.varchar']::pg_catalog.regtype[])
                       THEN pg_catalog.format(
                           '(CASE WHEN o.c%1$s IS NULL THEN n.c%1$s IS NOT NULL WHEN n.c%1$s IS NULL THEN true
                                  ELSE o.c%1$s COLLATE "C" OPERATOR(pg_catalog.<>) n.c%1$s COLLATE "C" END)', n)
                   WHEN col.atttypid OPERATOR(pg_catalog.=) ANY (as_is) THEN pg_catalog.format(
                           '(CASE WHEN o.c%1$s IS NULL THEN n.c%1$s IS NOT NULL WHEN n.c%1$s IS NULL THEN true
                                  ELSE o.c%1$s OPERATOR(pg_catalog.<>) n.c%1$s END)', n)
                   ELSE pg_catalog.format('%s IS DISTINCT FROM %s', js_old, js_new) END;
        changed := changed OPERATOR(pg_catalog.||) pg_catalog.format(
            E'\n OPERATOR(pg_catalog.||) CASE WHEN %s THEN pg_catalog.jsonb_build_object(%L, pg_catalog.jsonb_build_object(''old'', %s, ''new'', %s)) ELSE ''{}''::pg_catalog.jsonb END',
            differs, col.attname, js_old, js_new);
        row_pairs := row_pairs OPERATOR(pg_catalog.||) pg_catalog.format('%L, %s', col.attname, js_old);
        column_of[col.attnum] := n;
        differs_of[col.attnum] := differs;
    END LOOP;

    -- The key in key order, named as the generic statement names it: a dropped key column keeps
    -- its placeholder name and has no value.
    FOREACH k IN ARRAY keys LOOP
        name := (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass, relid, k)).object_names[3];
        c := column_of[k];
        IF c IS NULL THEN
            pairs_old := pairs_old OPERATOR(pg_catalog.||) pg_catalog.format('%L, NULL::pg_catalog.jsonb', name);
            pairs_new := pairs_new OPERATOR(pg_catalog.||) pg_catalog.format('%L, NULL::pg_catalog.jsonb', name);
            text_old := text_old OPERATOR(pg_catalog.||) pg_catalog.format(' OPERATOR(pg_catalog.||) %L', sep OPERATOR(pg_catalog.||) pg_catalog.to_json(name)::text OPERATOR(pg_catalog.||) ':null');
            text_new := text_new OPERATOR(pg_catalog.||) pg_catalog.format(' OPERATOR(pg_catalog.||) %L', sep OPERATOR(pg_catalog.||) pg_catalog.to_json(name)::text OPERATOR(pg_catalog.||) ':null');
        ELSE
            key_differs := key_differs OPERATOR(pg_catalog.||) ' OR ' OPERATOR(pg_catalog.||) differs_of[k];
            key_cols := key_cols OPERATOR(pg_catalog.||) pg_catalog.format(', o.c%1$s AS oc%1$s, n.c%1$s AS nc%1$s', c);
            js_old := @s@.capture_json_expression(pg_catalog.format('e.oc%s', c), text_of[k]);
            js_new := @s@.capture_json_expression(pg_catalog.format('e.nc%s', c), text_of[k]);
            pairs_old := pairs_old OPERATOR(pg_catalog.||) pg_catalog.format('%L, %s', name, js_old);
            pairs_new := pairs_new OPERATOR(pg_catalog.||) pg_catalog.format('%L, %s', name, js_new);
            text_old := text_old OPERATOR(pg_catalog.||) pg_catalog.format(' OPERATOR(pg_catalog.||) %L OPERATOR(pg_catalog.||) COALESCE((%s)::pg_catalog.text, ''null'')',
                                                         sep OPERATOR(pg_catalog.||) pg_catalog.to_json(name)::text OPERATOR(pg_catalog.||) ':', js_old);
            text_new := text_new OPERATOR(pg_catalog.||) pg_catalog.format(' OPERATOR(pg_catalog.||) %L OPERATOR(pg_catalog.||) COALESCE((%s)::pg_catalog.text, ''null'')',
                                                         sep OPERATOR(pg_catalog.||) pg_catalog.to_json(name)::text OPERATOR(pg_catalog.||) ':', js_new);
        END IF;
        sep := ',';
    END LOOP;
    text_old := text_old OPERATOR(pg_catalog.||) ' OPERATOR(pg_catalog.||) ''}''';
    text_new := text_new OPERATOR(pg_catalog.||) ' OPERATOR(pg_catalog.||) ''}''';
    FOR k IN 0 .. (pg_catalog.cardinality(row_pairs) OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 50 LOOP
        old_row := old_row OPERATOR(pg_catalog.||) CASE WHEN k OPERATOR(pg_catalog.>) 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
                   OPERATOR(pg_catalog.||) 'pg_catalog.jsonb_build_object('
                   OPERATOR(pg_catalog.||) pg_catalog.array_to_string(row_pairs[k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 1 : k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 50], ', ')
                   OPERATOR(pg_catalog.||) ')';
    END LOOP;
    IF old_row OPERATOR(pg_catalog.=) '' THEN
        old_row := '''{}''::pg_catalog.jsonb';
    END IF;
    FOR k IN 0 .. (pg_catalog.cardinality(pairs_old) OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 50 LOOP
        key_old := key_old OPERATOR(pg_catalog.||) CASE WHEN k OPERATOR(pg_catalog.>) 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
                   OPERATOR(pg_catalog.||) 'pg_catalog.jsonb_build_object('
                   OPERATOR(pg_catalog.||) pg_catalog.array_to_string(pairs_old[k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 1 : k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 50], ', ')
                   OPERATOR(pg_catalog.||) ')';
        key_new := key_new OPERATOR(pg_catalog.||) CASE WHEN k OPERATOR(pg_catalog.>) 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
                   OPERATOR(pg_catalog.||) 'pg_catalog.jsonb_build_object('
                   OPERATOR(pg_catalog.||) pg_catalog.array_to_string(pairs_new[k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 1 : k OPERATOR(pg_catalog.*) 50 OPERATOR(pg_catalog.+) 50], ', ')
                   OPERATOR(pg_catalog.||) ')';
    END LOOP;
    -- The new row: to_jsonb of the row when no column needs its text output (`t.*`, never a
    -- bare `t`: a column named t would win over the row), else built column by column.
    new_row := CASE WHEN pg_catalog.cardinality(text_cols) OPERATOR(pg_catalog.=) 0
                    THEN 'pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) $4'
                    ELSE @s@.capture_row_expression(relid, excluded_attnums, text_cols) END;

    RETURN pg_catalog.format($q$
INSERT INTO @s@.events (topic, key, type, payload)
SELECT $1, CASE e.op WHEN 'delete' THEN %s ELSE %s END, e.op,
       CASE e.op
       WHEN 'delete' THEN pg_catalog.jsonb_build_object('op', 'delete', 'schema', $2, 'table', $3, 'key', %s,
                                                        'old', e.oj)
       WHEN 'insert' THEN pg_catalog.jsonb_build_object('op', 'insert', 'schema', $2, 'table', $3, 'key', %s,
                                                        'new', e.j)
       ELSE pg_catalog.jsonb_build_object('op', 'update', 'schema', $2, 'table', $3, 'key', %s,
                                          'new', e.j, %s'changed', e.ch)
       END
  FROM (SELECT p.*, pg_catalog.unnest(CASE WHEN p.oi IS NULL THEN '{insert}'::pg_catalog.text[]
                                           WHEN p.ni IS NULL THEN '{delete}'::pg_catalog.text[]
                                           WHEN p.kd THEN '{delete,insert}'::pg_catalog.text[]
                                           WHEN p.ch OPERATOR(pg_catalog.=) '{}'::pg_catalog.jsonb THEN '{}'::pg_catalog.text[]
                                           ELSE '{update}'::pg_catalog.text[] END) AS op
          FROM (SELECT o.i AS oi, n.i AS ni, n.j%s,
                       (%s) AS kd,
                       CASE WHEN n.i IS NULL OR (%s) OR %s THEN %s END AS oj,
                       '{}'::pg_catalog.jsonb %s AS ch
                  FROM (SELECT pg_catalog.row_number() OVER () AS i%s FROM capture_old t OFFSET 0) o
                  FULL JOIN (SELECT pg_catalog.row_number() OVER () AS i, %s AS j%s
                               FROM capture_new t OFFSET 0) n
                    ON o.i OPERATOR(pg_catalog.=) n.i
                OFFSET 0) p) e
$q$,
        -- Keys are built in the outer projection, for the operation at hand only.
        text_old, text_new, key_old, key_new, key_new,
        CASE WHEN full_old THEN '''old'', e.oj, ' ELSE '' END,
        key_cols, key_differs, key_differs, CASE WHEN full_old THEN 'true' ELSE 'false' END, old_row,
        changed, cols, new_row, cols);
END
$f$;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);

    -- The trigger functions. Each statement first asks which columns need their text output
    -- (a catalog look-up); tables without any keep V6's statements, qualified throughout.
    body := $body$
-- Trigger arguments: topic, key column numbers, excluded column numbers, full_old.
CREATE OR REPLACE FUNCTION @s@.capture_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    one_key text := CASE WHEN pg_catalog.strpos(TG_ARGV[1], ',') OPERATOR(pg_catalog.=) 0
                         THEN (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass,
                                                                        TG_RELID, TG_ARGV[1]::pg_catalog.int4)).object_names[3] END;
    key_names text[] := CASE WHEN one_key IS NULL THEN @s@.capture_column_names(TG_RELID, TG_ARGV[1]) END;
    excluded text[] := CASE WHEN TG_ARGV[2] OPERATOR(pg_catalog.=) '' THEN '{}'::pg_catalog.text[]
                            ELSE @s@.capture_column_names(TG_RELID, TG_ARGV[2]) END;
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::pg_catalog.text OPERATOR(pg_catalog.||) ':';
    text_cols int2[];
    current_columns boolean;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
        BEGIN
            EXECUTE @s@.capture_columns_probe(TG_RELID, 'capture_new') INTO current_columns;
        EXCEPTION WHEN undefined_column THEN
            current_columns := false;
        END;
        IF NOT current_columns THEN
            RAISE EXCEPTION 'table %.% changed after this transaction took its snapshot: capture cannot tell its columns',
                            pg_catalog.quote_ident(TG_TABLE_SCHEMA), pg_catalog.quote_ident(TG_TABLE_NAME)
                USING ERRCODE = 'serialization_failure', HINT = 'retry the transaction';
        END IF;
    END IF;
    text_cols := @s@.capture_text_columns(TG_RELID);
    IF pg_catalog.cardinality(text_cols) OPERATOR(pg_catalog.>) 0 THEN
        EXECUTE @s@.capture_rows_statement(TG_RELID, TG_ARGV[2], text_cols, 'insert')
          USING TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME, COALESCE(key_names, ARRAY[one_key]);
        RETURN NULL;
    END IF;
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||) COALESCE((r.j OPERATOR(pg_catalog.->) one_key)::pg_catalog.text, 'null') OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(r.j, key_names) END,
           'insert',
           pg_catalog.jsonb_build_object(
               'op', 'insert', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
               'key', CASE WHEN one_key IS NOT NULL
                           THEN pg_catalog.jsonb_build_object(one_key, r.j OPERATOR(pg_catalog.->) one_key)
                           ELSE @s@.capture_key_object(r.j, key_names) END,
               'new', r.j)
      FROM (SELECT pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) excluded AS j FROM capture_new t OFFSET 0) r;
    RETURN NULL;
END
$f$;

CREATE OR REPLACE FUNCTION @s@.capture_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    one_key text := CASE WHEN pg_catalog.strpos(TG_ARGV[1], ',') OPERATOR(pg_catalog.=) 0
                         THEN (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass,
                                                                        TG_RELID, TG_ARGV[1]::pg_catalog.int4)).object_names[3] END;
    key_names text[] := CASE WHEN one_key IS NULL THEN @s@.capture_column_names(TG_RELID, TG_ARGV[1]) END;
    excluded text[] := CASE WHEN TG_ARGV[2] OPERATOR(pg_catalog.=) '' THEN '{}'::pg_catalog.text[]
                            ELSE @s@.capture_column_names(TG_RELID, TG_ARGV[2]) END;
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::pg_catalog.text OPERATOR(pg_catalog.||) ':';
    text_cols int2[];
    current_columns boolean;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
        BEGIN
            EXECUTE @s@.capture_columns_probe(TG_RELID, 'capture_old') INTO current_columns;
        EXCEPTION WHEN undefined_column THEN
            current_columns := false;
        END;
        IF NOT current_columns THEN
            RAISE EXCEPTION 'table %.% changed after this transaction took its snapshot: capture cannot tell its columns',
                            pg_catalog.quote_ident(TG_TABLE_SCHEMA), pg_catalog.quote_ident(TG_TABLE_NAME)
                USING ERRCODE = 'serialization_failure', HINT = 'retry the transaction';
        END IF;
    END IF;
    text_cols := @s@.capture_text_columns(TG_RELID);
    IF pg_catalog.cardinality(text_cols) OPERATOR(pg_catalog.>) 0 THEN
        EXECUTE @s@.capture_rows_statement(TG_RELID, TG_ARGV[2], text_cols, 'delete')
          USING TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME, COALESCE(key_names, ARRAY[one_key]);
        RETURN NULL;
    END IF;
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||) COALESCE((r.j OPERATOR(pg_catalog.->) one_key)::pg_catalog.text, 'null') OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(r.j, key_names) END,
           'delete',
           pg_catalog.jsonb_build_object(
               'op', 'delete', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
               'key', CASE WHEN one_key IS NOT NULL
                           THEN pg_catalog.jsonb_build_object(one_key, r.j OPERATOR(pg_catalog.->) one_key)
                           ELSE @s@.capture_key_object(r.j, key_names) END,
               'old', r.j)
      FROM (SELECT pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) excluded AS j FROM capture_old t OFFSET 0) r;
    RETURN NULL;
END
$f$;

-- Old and new rows are paired by position (V6). A table with columns that need their text output
-- always runs the generated statement, or (rows that do not pair) the delete then the insert one.
CREATE OR REPLACE FUNCTION @s@.capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    one_key text := CASE WHEN pg_catalog.strpos(TG_ARGV[1], ',') OPERATOR(pg_catalog.=) 0
                         THEN (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass,
                                                                        TG_RELID, TG_ARGV[1]::pg_catalog.int4)).object_names[3] END;
    key_names text[] := CASE WHEN one_key IS NULL THEN @s@.capture_column_names(TG_RELID, TG_ARGV[1]) END;
    excluded text[] := CASE WHEN TG_ARGV[2] OPERATOR(pg_catalog.=) '' THEN '{}'::pg_catalog.text[]
                            ELSE @s@.capture_column_names(TG_RELID, TG_ARGV[2]) END;
    full_old boolean := TG_ARGV[3] OPERATOR(pg_catalog.=) 'true';
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::pg_catalog.text OPERATOR(pg_catalog.||) ':';
    -- A malformed setting must not fail the user's write: anything but digits means the default.
    bulk_setting text := pg_catalog.current_setting('pgevents.capture_bulk_rows', true);
    bulk_rows int := CASE WHEN bulk_setting OPERATOR(pg_catalog.~) '^[0-9]{1,9}$' THEN bulk_setting::pg_catalog.int4 ELSE 100 END;
    old_rows bigint;
    new_rows bigint;
    paired boolean;
    pass text;
    text_cols int2[];
    current_columns boolean;
BEGIN
    SELECT (SELECT pg_catalog.count(*) FROM capture_old), (SELECT pg_catalog.count(*) FROM capture_new)
      INTO old_rows, new_rows;
    IF old_rows OPERATOR(pg_catalog.=) 0 AND new_rows OPERATOR(pg_catalog.=) 0 THEN
        RETURN NULL;
    END IF;
    IF pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
        BEGIN
            EXECUTE @s@.capture_columns_probe(TG_RELID, 'capture_new') INTO current_columns;
        EXCEPTION WHEN undefined_column THEN
            current_columns := false;
        END;
        IF NOT current_columns THEN
            RAISE EXCEPTION 'table %.% changed after this transaction took its snapshot: capture cannot tell its columns',
                            pg_catalog.quote_ident(TG_TABLE_SCHEMA), pg_catalog.quote_ident(TG_TABLE_NAME)
                USING ERRCODE = 'serialization_failure', HINT = 'retry the transaction';
        END IF;
    END IF;
    text_cols := @s@.capture_text_columns(TG_RELID);
    -- PostgreSQL puts the old and new version of each updated row into the two tables together,
    -- except when a row moved to another partition and a BEFORE INSERT trigger there suppressed
    -- its insert: then positions do not pair, and the statement is reported as deletes of all
    -- old rows followed by inserts of all new rows.
    paired := old_rows OPERATOR(pg_catalog.=) new_rows;
    IF pg_catalog.cardinality(text_cols) OPERATOR(pg_catalog.>) 0 AND NOT paired THEN
        EXECUTE @s@.capture_rows_statement(TG_RELID, TG_ARGV[2], text_cols, 'delete')
          USING TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME, COALESCE(key_names, ARRAY[one_key]);
        EXECUTE @s@.capture_rows_statement(TG_RELID, TG_ARGV[2], text_cols, 'insert')
          USING TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME, COALESCE(key_names, ARRAY[one_key]);
        RETURN NULL;
    END IF;
    IF paired AND (new_rows OPERATOR(pg_catalog.>=) bulk_rows OR pg_catalog.cardinality(text_cols) OPERATOR(pg_catalog.>) 0) THEN
        EXECUTE @s@.capture_update_statement(TG_RELID, TG_ARGV[1], TG_ARGV[2], full_old, text_cols)
          USING TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME, excluded;
        RETURN NULL;
    END IF;

    FOREACH pass IN ARRAY CASE WHEN paired THEN '{all}'::pg_catalog.text[] ELSE '{delete,insert}'::pg_catalog.text[] END LOOP
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||)
                     COALESCE((CASE e.op WHEN 'delete' THEN e.oj ELSE e.nj END OPERATOR(pg_catalog.->) one_key)::pg_catalog.text, 'null')
                     OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(CASE e.op WHEN 'delete' THEN e.oj ELSE e.nj END, key_names) END,
           e.op,
           CASE
           WHEN e.op OPERATOR(pg_catalog.=) 'delete' THEN
               pg_catalog.jsonb_build_object('op', 'delete', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                             'key', e.ok, 'old', e.oj)
           WHEN e.op OPERATOR(pg_catalog.=) 'insert' THEN
               pg_catalog.jsonb_build_object('op', 'insert', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                             'key', e.nk, 'new', e.nj)
           WHEN full_old THEN
               pg_catalog.jsonb_build_object(
                   'op', 'update', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'key', e.nk, 'new', e.nj,
                   'old', e.oj,
                   'changed', (SELECT pg_catalog.jsonb_object_agg(
                                          f.key, pg_catalog.jsonb_build_object('old', e.oj OPERATOR(pg_catalog.->) f.key, 'new', f.value))
                                 FROM pg_catalog.jsonb_each(e.nj) f
                                WHERE f.value IS DISTINCT FROM e.oj OPERATOR(pg_catalog.->) f.key))
           ELSE
               pg_catalog.jsonb_build_object(
                   'op', 'update', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'key', e.nk, 'new', e.nj,
                   'changed', (SELECT pg_catalog.jsonb_object_agg(
                                          f.key, pg_catalog.jsonb_build_object('old', e.oj OPERATOR(pg_catalog.->) f.key, 'new', f.value))
                                 FROM pg_catalog.jsonb_each(e.nj) f
                                WHERE f.value IS DISTINCT FROM e.oj OPERATOR(pg_catalog.->) f.key))
           END
      FROM (SELECT p.*,
                   pg_catalog.unnest(CASE WHEN p.oj IS NULL THEN '{insert}'::pg_catalog.text[]
                                          WHEN p.nj IS NULL THEN '{delete}'::pg_catalog.text[]
                                          WHEN p.ok IS DISTINCT FROM p.nk THEN '{delete,insert}'::pg_catalog.text[]
                                          ELSE '{update}'::pg_catalog.text[] END) AS op
              FROM (SELECT o.j AS oj, n.j AS nj,
                           CASE WHEN one_key IS NOT NULL
                                THEN pg_catalog.jsonb_build_object(one_key, o.j OPERATOR(pg_catalog.->) one_key)
                                ELSE @s@.capture_key_object(o.j, key_names) END AS ok,
                           CASE WHEN one_key IS NOT NULL
                                THEN pg_catalog.jsonb_build_object(one_key, n.j OPERATOR(pg_catalog.->) one_key)
                                ELSE @s@.capture_key_object(n.j, key_names) END AS nk
                      FROM (SELECT pg_catalog.row_number() OVER () AS i,
                                   pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) excluded AS j
                              FROM capture_old t OFFSET 0) o
                      FULL JOIN
                           (SELECT pg_catalog.row_number() OVER () AS i,
                                   pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) excluded AS j
                              FROM capture_new t OFFSET 0) n
                        ON o.i OPERATOR(pg_catalog.=) n.i AND paired
                    OFFSET 0) p
             WHERE p.oj IS DISTINCT FROM p.nj) e
     WHERE pass OPERATOR(pg_catalog.=) 'all' OR e.op OPERATOR(pg_catalog.=) pass;
    END LOOP;
    RETURN NULL;
END
$f$;

-- Unchanged but for the settings list it is checked against (capture_functions).
CREATE OR REPLACE FUNCTION @s@.capture_truncate() RETURNS trigger
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

-- What every capture function must look like. `owned_by`: capture (this database's capture
-- role) or events (the owner of the events table); `executors`: who besides the owner may
-- execute it; `source_md5`: md5 of the trigger functions' PL/pgSQL source (stored verbatim, so
-- it survives dump, restore and upgrades); NULL for the helpers (their owner alone may change
-- them, and that is the owner of events).
CREATE TABLE @s@.capture_functions (
    signature  text PRIMARY KEY,
    owned_by   text NOT NULL CHECK (owned_by IN ('capture', 'events')),
    secdef     boolean NOT NULL,
    config     text[],
    executors  text NOT NULL CHECK (executors IN ('capture_admin', 'capture')),
    source_md5 text
);
GRANT SELECT ON @s@.capture_functions TO PUBLIC;

-- Every way the capture functions and the capture role differ from what migrations made them:
-- (object, problem). Empty when all is as it should be. Services call it at start-up and
-- `migrate` on every run; anyone may (it reads catalog facts only).
CREATE FUNCTION @s@.capture_check() RETURNS TABLE (object text, problem text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
    WITH roles AS (
        SELECT COALESCE((SELECT r.role FROM @s@.event_stream_roles r WHERE r.job = 'capture'), 'events_capture')::text AS capture,
               COALESCE((SELECT r.role FROM @s@.event_stream_roles r WHERE r.job = 'capture_admin'), 'events_capture_admin')::text AS admin,
               (SELECT c.relowner::regrole::text FROM pg_catalog.pg_class c WHERE c.oid = '@s@.events'::regclass) AS events_owner
    ), expected AS (
        SELECT f.*, pg_catalog.to_regprocedure('@s@.' || f.signature) AS oid,
               CASE f.owned_by WHEN 'capture' THEN roles.capture ELSE roles.events_owner END AS owner,
               roles.capture, roles.admin
          FROM @s@.capture_functions f, roles
    ), found AS (
        SELECT e.*, p.proowner::regrole::text AS actual_owner, p.prosecdef, p.proconfig, p.prosrc,
               (SELECT pg_catalog.string_agg(q.g, ', ' ORDER BY q.g)
                  FROM (SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
                                        || ':' || a.privilege_type AS g
                          FROM pg_catalog.aclexplode(COALESCE(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
                         WHERE a.grantee <> p.proowner) q) AS acl
          FROM expected e LEFT JOIN pg_catalog.pg_proc p ON p.oid = e.oid
    )
    SELECT x.object, x.problem FROM (
        SELECT f.signature AS object, 'is missing' AS problem, 1 AS o FROM found f WHERE f.oid IS NULL
        UNION ALL
        SELECT f.signature, pg_catalog.format('is owned by %s, not %s', f.actual_owner, f.owner), 2
          FROM found f WHERE f.oid IS NOT NULL AND f.actual_owner <> f.owner
        UNION ALL
        SELECT f.signature, CASE WHEN f.secdef THEN 'is SECURITY INVOKER, not SECURITY DEFINER'
                                 ELSE 'is SECURITY DEFINER, not SECURITY INVOKER' END, 3
          FROM found f WHERE f.oid IS NOT NULL AND f.prosecdef <> f.secdef
        UNION ALL
        SELECT f.signature, pg_catalog.format('has settings %s, not %s', COALESCE(f.proconfig::text, '{}'), COALESCE(f.config::text, '{}')), 4
          FROM found f WHERE f.oid IS NOT NULL AND f.proconfig IS DISTINCT FROM f.config
        UNION ALL
        SELECT f.signature, pg_catalog.format('may be executed by %s, not only by %s (and its owner)', f.acl,
                                              CASE f.executors WHEN 'capture' THEN f.capture ELSE f.admin END || ':EXECUTE'), 5
          FROM found f
         WHERE f.oid IS NOT NULL
           AND f.acl IS DISTINCT FROM CASE f.executors WHEN 'capture' THEN f.capture ELSE f.admin END || ':EXECUTE'
        UNION ALL
        SELECT f.signature, 'has a changed body', 6
          FROM found f WHERE f.oid IS NOT NULL AND f.source_md5 IS NOT NULL AND pg_catalog.md5(f.prosrc) <> f.source_md5
        UNION ALL
        -- The capture role owns the trigger functions and nothing else here…
        SELECT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid),
               pg_catalog.format('is owned by the capture role %s', roles.capture), 7
          FROM roles
          JOIN pg_catalog.pg_shdepend d
            ON d.refclassid = 'pg_catalog.pg_authid'::regclass AND d.deptype = 'o'
           AND d.refobjid = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = roles.capture)
           AND d.dbid = (SELECT db.oid FROM pg_catalog.pg_database db WHERE db.datname = pg_catalog.current_database())
         WHERE NOT (d.classid = 'pg_catalog.pg_proc'::regclass
                    AND d.objid IN (SELECT e.oid FROM expected e WHERE e.owned_by = 'capture'))
        UNION ALL
        -- …is nobody's member and has no members…
        SELECT pg_catalog.format('role %s', roles.capture),
               pg_catalog.format('is a member of %s', m.roleid::regrole), 8
          FROM roles JOIN pg_catalog.pg_auth_members m
            ON m.member = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = roles.capture)
        UNION ALL
        SELECT pg_catalog.format('role %s', roles.capture),
               pg_catalog.format('has member %s', m.member::regrole), 9
          FROM roles JOIN pg_catalog.pg_auth_members m
            ON m.roleid = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = roles.capture)
        UNION ALL
        -- …and may create in no schema of this database.
        SELECT pg_catalog.format('schema %s', n.nspname),
               pg_catalog.format('grants CREATE to the capture role %s', roles.capture), 10
          FROM roles, pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
         WHERE a.privilege_type = 'CREATE'
           AND a.grantee = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = roles.capture)
    ) x
    ORDER BY x.o, x.object;
$f$;
GRANT EXECUTE ON FUNCTION @s@.capture_check() TO PUBLIC;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);

    -- What is there now is what the rest of this release expects.
    body := $body$
INSERT INTO @s@.capture_functions (signature, owned_by, secdef, config, executors, source_md5)
SELECT v.signature, v.owned_by, v.secdef, p.proconfig, v.executors,
       CASE WHEN v.owned_by = 'capture' THEN pg_catalog.md5(p.prosrc) END
  FROM (VALUES ('capture_insert()', 'capture', true, 'capture_admin'),
               ('capture_update()', 'capture', true, 'capture_admin'),
               ('capture_delete()', 'capture', true, 'capture_admin'),
               ('capture_truncate()', 'capture', true, 'capture_admin'),
               ('capture_column_names(oid,text)', 'events', false, 'capture'),
               ('capture_key_object(jsonb,text[])', 'events', false, 'capture'),
               ('capture_key_text(jsonb,text[])', 'events', false, 'capture'),
               ('capture_text_columns(oid)', 'events', false, 'capture'),
               ('capture_columns_probe(oid,text)', 'events', false, 'capture'),
               ('capture_json_expression(text,boolean)', 'events', false, 'capture'),
               ('capture_row_expression(oid,text,smallint[])', 'events', false, 'capture'),
               ('capture_rows_statement(oid,text,smallint[],text)', 'events', false, 'capture'),
               ('capture_update_statement(oid,text,text,boolean,smallint[])', 'events', false, 'capture'))
       AS v(signature, owned_by, secdef, executors)
  JOIN pg_catalog.pg_proc p ON p.oid = pg_catalog.to_regprocedure('@s@.' || v.signature);
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);
    -- The helpers run as the capture role (called by the trigger functions), and as nobody else.
    EXECUTE pg_catalog.format(
        'SELECT pg_catalog.string_agg(%L OPERATOR(pg_catalog.||) ''.'' OPERATOR(pg_catalog.||) f.signature, '', '')
           FROM %s.capture_functions f WHERE f.owned_by OPERATOR(pg_catalog.=) ''events''', s, s) INTO body;
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %1$s FROM PUBLIC; GRANT EXECUTE ON FUNCTION %1$s TO %2$I',
                              body, capture_owner);
    PERFORM pg_catalog.set_config('search_path', caller_path, true);
END
$migration$;

-- Which login may use which consumer name. Managed by the database owner (no one else has any
-- privilege on it); empty, any login may take any free name.
CREATE TABLE consumer_names (
    consumer text PRIMARY KEY
             CONSTRAINT consumer_names_format CHECK (consumer ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    login    name NOT NULL
);
REVOKE ALL ON consumer_names FROM PUBLIC;

-- The row policy's question: may role `who` write the position row of `consumer`? Only a role
-- that can log in, and (once names are registered) only under a name registered to it. SECURITY
-- DEFINER so that consumers need no privilege on consumer_names; pinned and qualified.
CREATE FUNCTION events_consumer_may_write(consumer text, who name) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = who AND r.rolcanlogin)
           AND (NOT EXISTS (SELECT FROM consumer_names)
                OR EXISTS (SELECT FROM consumer_names n WHERE n.consumer = $1 AND n.login = who));
END;
REVOKE ALL ON FUNCTION events_consumer_may_write(text, name) FROM PUBLIC;

-- events_grant_roles as in V7, with the capture role owning only the trigger functions (the
-- helpers stay with the owner of events and are executable by the capture role alone), and the
-- consumers' row policy refusing group roles and names registered to another login.
CREATE OR REPLACE FUNCTION events_grant_roles(prefix text) RETURNS void
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
    v_triggers text := 'capture_insert(), capture_update(), capture_delete(), capture_truncate()';
    v_helpers  text;
    v_manage   text := 'capture_trigger_name(text), capture_add(regclass, text, text[], text[], text[], boolean), '
                       'capture_add(text, text, text[], text[], text[], boolean), capture_remove(regclass), '
                       'capture_remove(text), capture_table(text), capture_list()';
BEGIN
    SELECT pg_catalog.string_agg(f.signature, ', ' ORDER BY f.signature) INTO v_helpers
      FROM capture_functions f WHERE f.owned_by = 'events';
    PERFORM events_grant_stream_roles(prefix); -- validates the prefix too
    FOR v_member IN SELECT a.grantee::regrole::name
                      FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                     WHERE p.oid = 'events_consumer_may_write(text, name)'::regprocedure
                       AND a.grantee <> p.proowner AND a.grantee <> 0 LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION events_consumer_may_write(text, name) FROM %I', v_member);
    END LOOP;
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION events_consumer_may_write(text, name) TO %1$I;
         ALTER POLICY %2$I ON consumer_positions
             USING ((owner = current_user OR owner IS NULL) AND events_consumer_may_write(consumer, current_user))
             WITH CHECK (owner = current_user AND events_consumer_may_write(consumer, current_user));',
        prefix || '_consumer', prefix || '_consumer_own_position');

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

    -- Handing the trigger functions over (ALTER FUNCTION … OWNER TO) needs, for a migrating owner
    -- that is not a superuser, membership in the new owner and the new owner's CREATE on the
    -- schema; the latter only for the moment of the handover (taken back below).
    IF NOT pg_catalog.pg_has_role(current_user, v_capture, 'MEMBER') THEN
        EXECUTE pg_catalog.format('GRANT %I TO %I', v_capture, current_user);
    END IF;
    EXECUTE pg_catalog.format('GRANT CREATE ON SCHEMA %I TO %I', v_schema, v_capture);
    EXECUTE pg_catalog.format(
        'ALTER FUNCTION capture_insert() OWNER TO %1$I;
         ALTER FUNCTION capture_update() OWNER TO %1$I;
         ALTER FUNCTION capture_delete() OWNER TO %1$I;
         ALTER FUNCTION capture_truncate() OWNER TO %1$I;', v_capture);

    FOREACH v_role IN ARRAY v_roles LOOP
        EXECUTE pg_catalog.format(
            'REVOKE ALL ON events FROM %1$I;
             REVOKE ALL ON SEQUENCE events_id_seq FROM %1$I;
             REVOKE ALL ON FUNCTION %2$s, %3$s, %5$s FROM %1$I;
             REVOKE CREATE ON SCHEMA %4$I FROM %1$I;', v_role, v_triggers, v_manage, v_schema, v_helpers);
    END LOOP;
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s, %s, %s FROM PUBLIC', v_triggers, v_helpers, v_manage);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_helpers, v_capture);

    EXECUTE pg_catalog.format(
        'GRANT INSERT (topic, key, type, payload) ON events TO %1$I;
         GRANT USAGE ON SEQUENCE events_id_seq TO %1$I;', v_capture);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s, %s TO %I', v_triggers, v_manage, v_admin);

    -- Nobody is a member of a capture role, this one or a previous one.
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
