-- Table-change capture, second version of the UPDATE trigger (and cheaper name look-ups for all
-- three row triggers). V5 created the functions; this migration replaces their bodies, so
-- existing captures (whose triggers name the functions) pick the new code up with no change.
--
-- Why, measured on PostgreSQL 15 with fsync on (cargo bench -p consumer --bench capture):
-- - Old and new rows of an UPDATE are now paired by their position in the transition tables
--   (PostgreSQL appends the old and the new version of each updated row to the two tables
--   together), not by key. Pairing by key was wrong for keys that are not unique (a --key-columns
--   choice without a unique index): two updated rows sharing a key made four pairs. By position,
--   each row is one pair, and a key change is the delete of the old key directly followed by
--   the insert of the new one, in the order PostgreSQL changed the rows.
-- - A statement of at least `pgevents.capture_bulk_rows` rows (default 100) runs a statement
--   generated from the table's current columns: values are compared as they are (no JSON of the
--   old row, no per-row jsonb_each); the generic path costs about 6 µs more per row. Smaller
--   statements keep the generic statement, whose plan is cached (a generated statement is
--   planned each time, ~1 ms). Both paths produce the same events (tested with each forced).
-- - Names of one-column keys are looked up inline; other name lists through a plain SQL function
--   instead of a PL/pgSQL one with its own search_path (a per-call cost on every statement).

DO $migration$
DECLARE
    s text := (SELECT pg_catalog.quote_ident(n.nspname)
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE c.oid = 'events'::regclass);
    body text;
    caller_path text := pg_catalog.current_setting('search_path');
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    body := $body$
-- Current names of the columns numbered in `attnums` ('1,3'), in that order. A dropped column's
-- name is a placeholder that matches no key of a row, so it simply stops mattering.
CREATE OR REPLACE FUNCTION @s@.capture_column_names(relid oid, attnums text) RETURNS text[]
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT COALESCE(pg_catalog.array_agg(
               (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass, relid, a.num)).object_names[3]
               ORDER BY a.i), '{}')
      FROM pg_catalog.unnest(pg_catalog.string_to_array(NULLIF(attnums, ''), ',')::int4[]) WITH ORDINALITY AS a(num, i);
END;

-- The UPDATE statement for a statement of many rows, generated from the table's current columns
-- (so it always matches the table's shape). Parameters when executed: $1 topic, $2 schema,
-- $3 table, $4 the excluded columns' current names.
--
-- Columns of types whose equality is exactly the equality of their JSON form are compared as they
-- are (text and varchar byte for byte, as JSON strings compare); any other type is compared
-- through to_jsonb, as the generic statement does (json, xml and geometric types have no
-- equality; bpchar's ignores trailing blanks). Values go into the events through
-- jsonb_build_object, which converts them as to_jsonb(row) does.
CREATE OR REPLACE FUNCTION @s@.capture_update_statement(relid oid, key_attnums text, excluded_attnums text, full_old boolean)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    keys int4[] := string_to_array(key_attnums, ',')::int4[];
    excl int4[] := COALESCE(string_to_array(NULLIF(excluded_attnums, ''), ',')::int4[], '{}');
    -- Floats are not here: their JSON text depends on the writer's extra_float_digits.
    as_is regtype[] := ARRAY['bool', 'int2', 'int4', 'int8', 'numeric', 'uuid', 'date', 'timestamp',
                             'timestamptz', 'bytea', 'jsonb']::regtype[];
    col record;
    n int := 0;
    cols text := '';            -- ", t.<name> AS cN, …": the captured columns of a row
    differs text;
    changed text := '';
    row_pairs text[] := '{}';   -- per captured column: "'name', o.cN" (the old row as JSON)
    old_row text := '';
    column_of int[] := '{}';    -- by attnum: N of the captured column cN
    differs_of text[] := '{}';  -- by attnum: its comparison
    k int;
    c int;
    name text;
    sep text := '';
    key_differs text := 'false';
    key_cols text := '';        -- the key columns of both rows, carried out of the join
    pairs_old text[] := '{}';   -- per key column, in key order: "'name', e.ocN"
    pairs_new text[] := '{}';
    key_old text := '';
    key_new text := '';
    text_old text := '''{''';   -- the key as text: '{' || '"name":' || COALESCE(to_jsonb(e.ocN)::text, 'null') || … || '}'
    text_new text := '''{''';
BEGIN
    FOR col IN SELECT a.attnum, a.attname, a.atttypid
                 FROM pg_attribute a
                WHERE a.attrelid = relid AND a.attnum > 0 AND NOT a.attisdropped AND a.attnum <> ALL (excl)
                ORDER BY a.attnum LOOP
        n := n + 1;
        cols := cols || format(', t.%I AS c%s', col.attname, n);
        differs := CASE
                   WHEN col.atttypid IN ('text'::regtype, 'varchar'::regtype)
                       THEN format('o.c%1$s COLLATE "C" IS DISTINCT FROM n.c%1$s COLLATE "C"', n)
                   WHEN col.atttypid = ANY (as_is) THEN format('o.c%1$s IS DISTINCT FROM n.c%1$s', n)
                   ELSE format('to_jsonb(o.c%1$s) IS DISTINCT FROM to_jsonb(n.c%1$s)', n) END;
        changed := changed || format(
            E'\n OPERATOR(pg_catalog.||) CASE WHEN %s THEN jsonb_build_object(%L, jsonb_build_object(''old'', o.c%s, ''new'', n.c%s)) ELSE ''{}''::jsonb END',
            differs, col.attname, n, n);
        row_pairs := row_pairs || format('%L, o.c%s', col.attname, n);
        column_of[col.attnum] := n;
        differs_of[col.attnum] := differs;
    END LOOP;

    -- The key in key order, named as the generic statement names it: a dropped key column keeps
    -- its placeholder name and has no value.
    FOREACH k IN ARRAY keys LOOP
        name := (pg_identify_object_as_address('pg_catalog.pg_class'::regclass, relid, k)).object_names[3];
        c := column_of[k];
        IF c IS NULL THEN
            pairs_old := pairs_old || format('%L, NULL::jsonb', name);
            pairs_new := pairs_new || format('%L, NULL::jsonb', name);
            text_old := text_old || format(' || %L', sep || to_json(name)::text || ':null');
            text_new := text_new || format(' || %L', sep || to_json(name)::text || ':null');
        ELSE
            key_differs := key_differs || ' OR ' || differs_of[k];
            key_cols := key_cols || format(', o.c%1$s AS oc%1$s, n.c%1$s AS nc%1$s', c);
            pairs_old := pairs_old || format('%L, e.oc%s', name, c);
            pairs_new := pairs_new || format('%L, e.nc%s', name, c);
            text_old := text_old || format(' || %L || COALESCE(to_jsonb(e.oc%s)::text, ''null'')', sep || to_json(name)::text || ':', c);
            text_new := text_new || format(' || %L || COALESCE(to_jsonb(e.nc%s)::text, ''null'')', sep || to_json(name)::text || ':', c);
        END IF;
        sep := ',';
    END LOOP;
    text_old := text_old || ' || ''}''';
    text_new := text_new || ' || ''}''';
    -- jsonb_build_object takes at most 100 arguments: 50 columns per call.
    FOR k IN 0 .. (cardinality(row_pairs) - 1) / 50 LOOP
        old_row := old_row || CASE WHEN k > 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
                   || 'jsonb_build_object(' || array_to_string(row_pairs[k * 50 + 1 : k * 50 + 50], ', ') || ')';
    END LOOP;
    FOR k IN 0 .. (cardinality(pairs_old) - 1) / 50 LOOP
        key_old := key_old || CASE WHEN k > 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
                   || 'jsonb_build_object(' || array_to_string(pairs_old[k * 50 + 1 : k * 50 + 50], ', ') || ')';
        key_new := key_new || CASE WHEN k > 0 THEN ' OPERATOR(pg_catalog.||) ' ELSE '' END
                   || 'jsonb_build_object(' || array_to_string(pairs_new[k * 50 + 1 : k * 50 + 50], ', ') || ')';
    END LOOP;

    -- `t.*`, never a bare `t`: a column named t would win over the row. The old row's JSON is
    -- built from its captured columns, and only for the events that carry it (deletes of a key
    -- change, updates with full_old).
    RETURN format($q$
INSERT INTO @s@.events (topic, key, type, payload)
SELECT $1, CASE e.op WHEN 'delete' THEN %s ELSE %s END, e.op,
       CASE e.op
       WHEN 'delete' THEN jsonb_build_object('op', 'delete', 'schema', $2, 'table', $3, 'key', %s,
                                             'old', e.oj)
       WHEN 'insert' THEN jsonb_build_object('op', 'insert', 'schema', $2, 'table', $3, 'key', %s,
                                             'new', e.j)
       ELSE jsonb_build_object('op', 'update', 'schema', $2, 'table', $3, 'key', %s,
                               'new', e.j, %s'changed', e.ch)
       END
  FROM (SELECT p.*, unnest(CASE WHEN p.oi IS NULL THEN '{insert}'::text[]
                                WHEN p.ni IS NULL THEN '{delete}'::text[]
                                WHEN p.kd THEN '{delete,insert}'::text[]
                                WHEN p.ch OPERATOR(pg_catalog.=) '{}'::jsonb THEN '{}'::text[]
                                ELSE '{update}'::text[] END) AS op
          FROM (SELECT o.i AS oi, n.i AS ni, n.j%s,
                       (%s) AS kd,
                       CASE WHEN n.i IS NULL OR (%s) OR %s THEN %s END AS oj,
                       '{}'::jsonb %s AS ch
                  FROM (SELECT row_number() OVER () AS i%s FROM capture_old t OFFSET 0) o
                  FULL JOIN (SELECT row_number() OVER () AS i, to_jsonb(t.*) OPERATOR(pg_catalog.-) $4 AS j%s
                               FROM capture_new t OFFSET 0) n
                    ON o.i OPERATOR(pg_catalog.=) n.i
                OFFSET 0) p) e
$q$,
        -- Keys are built in the outer projection, for the operation at hand only.
        text_old, text_new, key_old, key_new, key_new,
        CASE WHEN full_old THEN '''old'', e.oj, ' ELSE '' END,
        key_cols, key_differs, key_differs, CASE WHEN full_old THEN 'true' ELSE 'false' END, old_row,
        changed, cols, cols);
END
$f$;

-- Trigger arguments: topic, key column numbers, excluded column numbers, full_old.
CREATE OR REPLACE FUNCTION @s@.capture_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    one_key text := CASE WHEN pg_catalog.strpos(TG_ARGV[1], ',') = 0
                         THEN (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass,
                                                                        TG_RELID, TG_ARGV[1]::int4)).object_names[3] END;
    key_names text[] := CASE WHEN one_key IS NULL THEN @s@.capture_column_names(TG_RELID, TG_ARGV[1]) END;
    excluded text[] := CASE WHEN TG_ARGV[2] = '' THEN '{}'::text[] ELSE @s@.capture_column_names(TG_RELID, TG_ARGV[2]) END;
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
    one_key text := CASE WHEN pg_catalog.strpos(TG_ARGV[1], ',') = 0
                         THEN (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass,
                                                                        TG_RELID, TG_ARGV[1]::int4)).object_names[3] END;
    key_names text[] := CASE WHEN one_key IS NULL THEN @s@.capture_column_names(TG_RELID, TG_ARGV[1]) END;
    excluded text[] := CASE WHEN TG_ARGV[2] = '' THEN '{}'::text[] ELSE @s@.capture_column_names(TG_RELID, TG_ARGV[2]) END;
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
      FROM (SELECT pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) excluded AS j FROM capture_old t OFFSET 0) r;
    RETURN NULL;
END
$f$;

-- Old and new rows are paired by position (see the top of this file). A pair whose captured
-- columns are all equal emits nothing; a pair whose key changed is a delete of the old key then
-- an insert of the new one; `changed` lists only the columns whose values differ.
--
-- Cost notes (100k-row UPDATE): without the OFFSET 0 fences the planner pulls the subqueries up
-- and evaluates to_jsonb(row) once per reference, 2.7x slower. JIT is off: row estimates over
-- transition tables are wild, so JIT would compile for ~0.3 s per bulk statement and win nothing.
CREATE OR REPLACE FUNCTION @s@.capture_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    one_key text := CASE WHEN pg_catalog.strpos(TG_ARGV[1], ',') = 0
                         THEN (pg_catalog.pg_identify_object_as_address('pg_catalog.pg_class'::pg_catalog.regclass,
                                                                        TG_RELID, TG_ARGV[1]::int4)).object_names[3] END;
    key_names text[] := CASE WHEN one_key IS NULL THEN @s@.capture_column_names(TG_RELID, TG_ARGV[1]) END;
    excluded text[] := CASE WHEN TG_ARGV[2] = '' THEN '{}'::text[] ELSE @s@.capture_column_names(TG_RELID, TG_ARGV[2]) END;
    full_old boolean := TG_ARGV[3] = 'true';
    key_prefix text := '{' OPERATOR(pg_catalog.||) pg_catalog.to_json(one_key)::text OPERATOR(pg_catalog.||) ':';
    -- A malformed setting must not fail the user's write: anything but digits means the default.
    bulk_setting text := pg_catalog.current_setting('pgevents.capture_bulk_rows', true);
    bulk_rows int := CASE WHEN bulk_setting ~ '^[0-9]{1,9}$' THEN bulk_setting::int ELSE 100 END;
    old_rows bigint;
    new_rows bigint;
    paired boolean;
    pass text;
BEGIN
    SELECT (SELECT pg_catalog.count(*) FROM capture_old), (SELECT pg_catalog.count(*) FROM capture_new)
      INTO old_rows, new_rows;
    IF old_rows = 0 AND new_rows = 0 THEN
        RETURN NULL;
    END IF;
    -- PostgreSQL puts the old and new version of each updated row into the two tables together,
    -- except when a row moved to another partition and a BEFORE INSERT trigger there suppressed
    -- its insert: then positions do not pair, and the statement is reported as deletes of all
    -- old rows followed by inserts of all new rows (two passes of the generic statement).
    paired := old_rows = new_rows;
    IF paired AND new_rows >= bulk_rows THEN
        EXECUTE @s@.capture_update_statement(TG_RELID, TG_ARGV[1], TG_ARGV[2], full_old)
          USING TG_ARGV[0], TG_TABLE_SCHEMA, TG_TABLE_NAME, excluded;
        RETURN NULL;
    END IF;

    FOREACH pass IN ARRAY CASE WHEN paired THEN '{all}'::text[] ELSE '{delete,insert}'::text[] END LOOP
    INSERT INTO @s@.events (topic, key, type, payload)
    SELECT TG_ARGV[0],
           CASE WHEN one_key IS NOT NULL
                THEN key_prefix OPERATOR(pg_catalog.||)
                     COALESCE((CASE e.op WHEN 'delete' THEN e.oj ELSE e.nj END OPERATOR(pg_catalog.->) one_key)::text, 'null')
                     OPERATOR(pg_catalog.||) '}'
                ELSE @s@.capture_key_text(CASE e.op WHEN 'delete' THEN e.oj ELSE e.nj END, key_names) END,
           e.op,
           CASE
           WHEN e.op = 'delete' THEN
               pg_catalog.jsonb_build_object('op', 'delete', 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
                                             'key', e.ok, 'old', e.oj)
           WHEN e.op = 'insert' THEN
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
                   pg_catalog.unnest(CASE WHEN p.oj IS NULL THEN '{insert}'::text[]
                                          WHEN p.nj IS NULL THEN '{delete}'::text[]
                                          WHEN p.ok IS DISTINCT FROM p.nk THEN '{delete,insert}'::text[]
                                          ELSE '{update}'::text[] END) AS op
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
     WHERE pass = 'all' OR e.op = pass;
    END LOOP;
    RETURN NULL;
END
$f$;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_update_statement(oid, text, text, boolean) OWNER TO events_capture', s);
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s.capture_update_statement(oid, text, text, boolean) FROM PUBLIC', s);
    PERFORM pg_catalog.set_config('search_path', caller_path, true);
END
$migration$;
