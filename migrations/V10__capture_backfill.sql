-- Backfill (issue 24): the rows a captured table already holds become `read` events, in key
-- order, in chunks of short transactions, while the application keeps writing; progress is kept
-- here, so a killed backfill resumes after its last finished chunk.
--
-- A `read` event has the payload contract of a captured insert: {"op": "read", "schema",
-- "table", "key", "new"}, excluded columns absent, every value serialised as the insert trigger
-- serialises it (V9: to_jsonb, or the text output for types a non-superuser owns).
--
-- Never back in time. Each chunk is one transaction under READ COMMITTED that
--   1. reads its rows in key order with SELECT … FOR SHARE, and
--   2. writes their `read` events in the same transaction (events.tx_id = events_sort_key()).
-- FOR SHARE conflicts with every UPDATE and DELETE (FOR KEY SHARE would not: a non-key UPDATE
-- takes only FOR NO KEY UPDATE, so the chunk could read the value from before an UPDATE whose
-- event then sorts before the read). So:
-- * A change C to row r that the chunk sees: C's writer committed before the chunk read r (its
--   SELECT waits for an in-flight writer of r and then reads the row as that writer left it).
--   The read's sort key is events_sort_key() taken after that commit, so it is >= C's writer's
--   id and every sort key of C's events (V8: latestCompletedXid only grows); on a tie its id
--   comes from the sequence after C's. The read sorts after C.
-- * A change D to r that the chunk does not see: D's writer could not modify r while the chunk
--   held its lock, so D's statement ran after the chunk committed, and its events' sort keys are
--   >= the chunk's transaction id and >= the read's sort key (taken earlier). D sorts after the
--   read. TRUNCATE waits for the chunk's ROW SHARE lock on the table in the same way.
-- * A row inserted by a transaction still open when the chunk reads is invisible to it and gets
--   no read; its insert event carries it. A row whose key an open transaction moves out of the
--   chunk's range is re-checked after the wait (EvalPlanQual) and skipped; its delete + insert
--   events carry it.
-- The chunk's range is fixed before the locking read: the chunk_rows-th key after the last
-- finished key, read without locks. The locking read takes every row in (last, that key], so a
-- key moved far ahead during a wait can never make the next chunk start past rows not yet read.
--
-- Privileges. Reading the table needs its owner's rights, writing events the capture role's:
-- * capture_backfill_start / _chunk / capture_backfill run as the caller (SECURITY INVOKER),
--   who must own the table and be a capture admin, like capture_add. They read and lock the
--   rows and hand them, as an array of the table's row type, to
-- * capture_backfill_write (SECURITY DEFINER, owned by the capture role like the trigger
--   functions), which serialises them exactly as the insert trigger does and appends the events.
--   It checks that the array is of the table's row type, that the table is captured (the topic
--   and key come from its triggers, never from the caller) and that the session's login may act
--   as the table's owner: a definer cannot see its caller's role, and who can become the owner
--   could write any such row into the table anyway.
-- * capture_backfills: readable and writable by capture admins, each for the tables they own
--   (row policy); the database owner sees all. A running backfill's row (its condition above all)
--   is written only by the role that started it, and only that role runs its chunks: the
--   condition is SQL that runs with the runner's rights. Anyone who may see the row may finish it
--   (cancel).

-- One row per backfill. `last_key`: the key columns' text output of the last finished chunk's
-- upper bound (NULL: none finished yet), compared through each column's input function.
CREATE TABLE capture_backfills (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tab          regclass    NOT NULL,
    topic        text        NOT NULL,
    condition    text,
    chunk_rows   integer     NOT NULL CONSTRAINT capture_backfills_chunk_rows CHECK (chunk_rows BETWEEN 1 AND 1000000),
    rows_total   bigint      NOT NULL,
    rows_done    bigint      NOT NULL DEFAULT 0,
    chunks_done  bigint      NOT NULL DEFAULT 0,
    last_key     text[],
    started_by   name        NOT NULL DEFAULT current_user,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
-- One unfinished backfill per table: a second start resumes it.
CREATE UNIQUE INDEX capture_backfills_running ON capture_backfills (tab) WHERE finished_at IS NULL;
REVOKE ALL ON capture_backfills FROM PUBLIC;
ALTER TABLE capture_backfills ENABLE ROW LEVEL SECURITY;

DO $migration$
DECLARE
    s text := (SELECT pg_catalog.quote_ident(n.nspname)
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                WHERE c.oid = 'events'::regclass);
    capture_owner name := (SELECT p.proowner::regrole::name FROM pg_catalog.pg_proc p
                            WHERE p.oid = 'capture_insert()'::regprocedure);
    -- Read before search_path is pinned below.
    admin_role name := COALESCE((SELECT r.role FROM event_stream_roles r WHERE r.job = 'capture_admin'),
                                'events_capture_admin');
    body text;
    caller_path text := pg_catalog.current_setting('search_path');
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

    body := $body$
-- The capture settings of `tab` from its triggers: topic, key and excluded column numbers.
-- NULL when the table is not captured.
CREATE FUNCTION @s@.capture_settings(tab regclass, OUT topic text, OUT key_attnums text, OUT excluded_attnums text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
    SELECT a[1], a[2], a[3]
      FROM (SELECT pg_catalog.string_to_array(pg_catalog.encode(t.tgargs, 'escape'), '\000') AS a
              FROM pg_catalog.pg_trigger t
             WHERE t.tgrelid OPERATOR(pg_catalog.=) tab AND t.tgname LIKE 'events\_capture\_%'
               AND t.tgfoid IN ('@s@.capture_insert()'::pg_catalog.regprocedure, '@s@.capture_update()'::pg_catalog.regprocedure,
                                '@s@.capture_delete()'::pg_catalog.regprocedure, '@s@.capture_truncate()'::pg_catalog.regprocedure)
             ORDER BY t.tgname
             LIMIT 1) x;
$f$;

-- Appends one `read` event per row of `rows` (an array of `tab`'s row type), in array order,
-- serialised as capture_insert() serialises an inserted row. Returns how many.
CREATE FUNCTION @s@.capture_backfill_write(tab regclass, rows anyarray) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $f$
DECLARE
    rel record;
    settings record;
    key_names text[];
    excluded text[];
    text_cols int2[];
    row_json text;
    written bigint;
BEGIN
    SELECT c.relowner, c.reltype, n.nspname, c.relname INTO rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) tab;
    IF rel.reltype IS NULL
       OR pg_catalog.pg_typeof(rows)::pg_catalog.oid OPERATOR(pg_catalog.<>)
          (SELECT t.typarray FROM pg_catalog.pg_type t WHERE t.oid OPERATOR(pg_catalog.=) rel.reltype) THEN
        RAISE EXCEPTION 'capture_backfill_write takes an array of rows of table %', tab
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF NOT pg_catalog.pg_has_role(session_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to backfill it', tab USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT * INTO settings FROM @s@.capture_settings(tab);
    IF settings.topic IS NULL THEN
        RAISE EXCEPTION 'table % is not captured', tab USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    key_names := @s@.capture_column_names(tab, settings.key_attnums);
    excluded := @s@.capture_column_names(tab, settings.excluded_attnums);
    text_cols := @s@.capture_text_columns(tab);
    row_json := CASE WHEN pg_catalog.cardinality(text_cols) OPERATOR(pg_catalog.=) 0
                     THEN 'pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.-) $5'
                     ELSE @s@.capture_row_expression(tab, settings.excluded_attnums, text_cols) END;
    EXECUTE pg_catalog.format($q$
INSERT INTO @s@.events (topic, key, type, payload)
SELECT $1, @s@.capture_key_text(r.j, $4), 'read',
       pg_catalog.jsonb_build_object('op', 'read', 'schema', $2, 'table', $3,
                                     'key', @s@.capture_key_object(r.j, $4), 'new', r.j)
  FROM (SELECT %s AS j FROM pg_catalog.unnest($6) t OFFSET 0) r
$q$, row_json)
      USING settings.topic, rel.nspname::text, rel.relname::text, key_names, excluded, rows;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$f$;

-- `tab`'s key columns (from its capture settings) as SQL over alias `a`: the key as one value
-- (a row for several columns), the ORDER BY list, the same key as text output, a NULL test,
-- and per column its type (for literals read back through the input function).
CREATE FUNCTION @s@.capture_backfill_key(tab regclass, a text,
    OUT key_expr text, OUT order_by text, OUT key_text text, OUT any_null text, OUT types text[], OUT names text[],
    OUT nullable boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    settings record;
    col record;
    exprs text[] := '{}';
BEGIN
    SELECT * INTO settings FROM @s@.capture_settings(tab);
    IF settings.topic IS NULL THEN
        RAISE EXCEPTION 'table % is not captured', tab
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'capture it first (capture_add, eventsctl capture add): a backfill writes to its topic';
    END IF;
    types := '{}';
    names := '{}';
    nullable := false;
    FOR col IN SELECT a2.attname, a2.attnotnull, pg_catalog.format_type(a2.atttypid, a2.atttypmod) AS typ
                 FROM pg_catalog.unnest(pg_catalog.string_to_array(settings.key_attnums, ',')::int2[]) WITH ORDINALITY AS k(num, i)
                 JOIN pg_catalog.pg_attribute a2 ON a2.attrelid OPERATOR(pg_catalog.=) tab AND a2.attnum OPERATOR(pg_catalog.=) k.num
                WHERE NOT a2.attisdropped
                ORDER BY k.i LOOP
        exprs := exprs OPERATOR(pg_catalog.||) pg_catalog.format('%I.%I', a, col.attname);
        types := types OPERATOR(pg_catalog.||) col.typ;
        names := names OPERATOR(pg_catalog.||) col.attname::text;
        nullable := nullable OR NOT col.attnotnull;
    END LOOP;
    IF pg_catalog.cardinality(exprs) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'table % has no key columns left: capture it again with key columns', tab
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    key_expr := CASE WHEN pg_catalog.cardinality(exprs) OPERATOR(pg_catalog.=) 1 THEN exprs[1]
                     ELSE 'ROW(' OPERATOR(pg_catalog.||) pg_catalog.array_to_string(exprs, ', ') OPERATOR(pg_catalog.||) ')' END;
    order_by := pg_catalog.array_to_string(exprs, ', ');
    key_text := 'ARRAY[' OPERATOR(pg_catalog.||)
                (SELECT pg_catalog.string_agg(pg_catalog.format('pg_catalog.format(''%%s'', %s)', e), ', ' ORDER BY i)
                   FROM pg_catalog.unnest(exprs) WITH ORDINALITY AS u(e, i))
                OPERATOR(pg_catalog.||) ']::pg_catalog.text[]';
    any_null := (SELECT pg_catalog.string_agg(pg_catalog.format('%s IS NULL', e), ' OR ') FROM pg_catalog.unnest(exprs) AS u(e));
END
$f$;

-- A key given as text outputs, as SQL literals read through each type's input function.
CREATE FUNCTION @s@.capture_backfill_literal(key text[], types text[]) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $f$
    SELECT CASE WHEN pg_catalog.cardinality(types) OPERATOR(pg_catalog.=) 1
                THEN pg_catalog.format('%L::%s', key[1], types[1])
                ELSE 'ROW(' OPERATOR(pg_catalog.||)
                     (SELECT pg_catalog.string_agg(pg_catalog.format('%L::%s', key[i], types[i]), ', ' ORDER BY i)
                        FROM pg_catalog.generate_series(1, pg_catalog.cardinality(types)) AS i)
                     OPERATOR(pg_catalog.||) ')' END;
$f$;

-- Starts a backfill of `tab` (or returns the unfinished one, to resume it): every row matching
-- `condition` (SQL over the table's columns, run with the caller's rights; NULL: all rows) will
-- get one `read` event. Refuses a table with rows whose key is NULL (they have no place in key
-- order). Run as the table's owner, a member of the capture admin role.
CREATE FUNCTION @s@.capture_backfill_start(tab regclass, chunk_rows integer DEFAULT 1000, condition text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    owner oid := (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) tab);
    k record;
    running record;
    total bigint;
    has_null boolean;
    filter text := CASE WHEN NULLIF(pg_catalog.btrim(condition), '') IS NULL THEN 'true'
                        ELSE '(' OPERATOR(pg_catalog.||) condition OPERATOR(pg_catalog.||) ')' END;
    new_id bigint;
BEGIN
    IF tab IS NULL THEN
        RAISE EXCEPTION 'capture_backfill_start needs a table' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT pg_catalog.pg_has_role(current_user, owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to backfill it (its owner is %)', tab, pg_catalog.pg_get_userbyid(owner)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'run it as the table''s owner, who must be a member of events_capture_admin';
    END IF;
    IF chunk_rows IS NULL OR chunk_rows NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'chunk_rows must be between 1 and 1000000, not %', chunk_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO k FROM @s@.capture_backfill_key(tab, 't');
    SELECT b.id, b.condition INTO running FROM @s@.capture_backfills b
     WHERE b.tab OPERATOR(pg_catalog.=) capture_backfill_start.tab AND b.finished_at IS NULL FOR UPDATE;
    IF running.id IS NOT NULL THEN
        IF running.condition IS DISTINCT FROM NULLIF(pg_catalog.btrim(condition), '') THEN
            RAISE EXCEPTION 'table % has an unfinished backfill (%) with another condition (%)', tab, running.id,
                            COALESCE(pg_catalog.quote_literal(running.condition), 'all rows')
                USING ERRCODE = 'object_in_use',
                      HINT = 'resume it with the same condition, or cancel it first (capture_backfill_cancel, eventsctl capture backfill --cancel)';
        END IF;
        UPDATE @s@.capture_backfills b SET chunk_rows = capture_backfill_start.chunk_rows
         WHERE b.id OPERATOR(pg_catalog.=) running.id;
        RETURN running.id;
    END IF;
    -- Also checks the condition before any chunk runs.
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s t WHERE %s', tab, filter) INTO total;
    IF k.nullable THEN
        EXECUTE pg_catalog.format('SELECT EXISTS (SELECT FROM %s t WHERE %s AND (%s))', tab, filter, k.any_null) INTO has_null;
        IF has_null THEN
            RAISE EXCEPTION 'table % has rows whose key (%) is NULL: a backfill reads rows in key order and cannot place them',
                            tab, pg_catalog.array_to_string(k.names, ', ')
                USING ERRCODE = 'null_value_not_allowed',
                      HINT = 'give those rows a key, exclude them with a condition (--where), or capture the table with key columns that are never NULL';
        END IF;
    END IF;
    INSERT INTO @s@.capture_backfills (tab, topic, condition, chunk_rows, rows_total)
    VALUES (capture_backfill_start.tab, (SELECT x.topic FROM @s@.capture_settings(capture_backfill_start.tab) x),
            NULLIF(pg_catalog.btrim(capture_backfill_start.condition), ''), capture_backfill_start.chunk_rows, total)
    RETURNING capture_backfills.id INTO new_id;
    RETURN new_id;
END
$f$;

CREATE FUNCTION @s@.capture_backfill_start(tab text, chunk_rows integer DEFAULT 1000, condition text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql
BEGIN ATOMIC
    SELECT @s@.capture_backfill_start(@s@.capture_table(tab), chunk_rows, condition);
END;

-- Runs the next chunk of backfill `backfill`, in the caller's transaction (which must be READ
-- COMMITTED; commit right after, so the chunk's locks are short). Returns the rows read by this
-- chunk, the totals, and whether the backfill is finished.
CREATE FUNCTION @s@.capture_backfill_chunk(backfill bigint,
    OUT rows_read bigint, OUT rows_done bigint, OUT rows_total bigint, OUT finished boolean)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $f$
DECLARE
    b record;
    k record;
    alias text := 'backfill_row';
    filter text;
    after text;
    upper_key text[];
    float_digits text;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
        RAISE EXCEPTION 'a backfill chunk must run under READ COMMITTED, not %', pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = 'active_sql_transaction',
                  HINT = 'its locking read must see the rows as their last writer left them: BEGIN ISOLATION LEVEL READ COMMITTED';
    END IF;
    -- Locked: two runners of one backfill take turns, each after the other's committed chunk.
    SELECT * INTO b FROM @s@.capture_backfills x WHERE x.id OPERATOR(pg_catalog.=) backfill FOR UPDATE;
    IF b.id IS NULL THEN
        RAISE EXCEPTION 'there is no backfill %', backfill USING ERRCODE = 'no_data_found';
    END IF;
    IF b.finished_at IS NOT NULL THEN
        rows_read := 0; rows_done := b.rows_done; rows_total := b.rows_total; finished := true;
        RETURN;
    END IF;
    IF NOT pg_catalog.pg_has_role(current_user, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) b.tab), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to backfill it', b.tab USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- The condition is SQL, run below with the rights of whoever runs the chunk: only the role
    -- that wrote it runs it. Otherwise another capture admin could plant SQL in a backfill that
    -- the table's owner (or a superuser) goes on to run.
    IF b.started_by OPERATOR(pg_catalog.<>) current_user THEN
        RAISE EXCEPTION 'backfill % of table % was started by %: only that role runs its chunks', b.id, b.tab, b.started_by
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'its condition runs with the rights of whoever runs a chunk; run it as '
                         OPERATOR(pg_catalog.||) pg_catalog.quote_ident(b.started_by)
                         OPERATOR(pg_catalog.||) ', or cancel it and start it again';
    END IF;
    -- The row alias must not be a column's name (a column would win over the whole row).
    WHILE EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) b.tab AND a.attname OPERATOR(pg_catalog.=) alias) LOOP
        alias := alias OPERATOR(pg_catalog.||) '_';
    END LOOP;
    SELECT * INTO k FROM @s@.capture_backfill_key(b.tab, alias);
    filter := CASE WHEN b.condition IS NULL THEN 'true' ELSE '(' OPERATOR(pg_catalog.||) b.condition OPERATOR(pg_catalog.||) ')' END;
    after := CASE WHEN b.last_key IS NULL THEN 'true'
                  ELSE pg_catalog.format('%s OPERATOR(pg_catalog.>) %s', k.key_expr, @s@.capture_backfill_literal(b.last_key, k.types)) END;
    -- The chunk's upper bound, as text that reads back exactly (floats with all their digits).
    float_digits := pg_catalog.current_setting('extra_float_digits');
    PERFORM pg_catalog.set_config('extra_float_digits', '3', true);
    EXECUTE pg_catalog.format('SELECT %s FROM %s %I WHERE %s AND %s ORDER BY %s OFFSET %s LIMIT 1',
                              k.key_text, b.tab, alias, filter, after, k.order_by, b.chunk_rows OPERATOR(pg_catalog.-) 1)
       INTO upper_key;
    PERFORM pg_catalog.set_config('extra_float_digits', float_digits, true);
    EXECUTE pg_catalog.format(
        'SELECT @s@.capture_backfill_write(%s::pg_catalog.oid::pg_catalog.regclass, ARRAY(SELECT %I FROM %s %I WHERE %s AND %s AND %s ORDER BY %s FOR SHARE OF %I))',
        b.tab::pg_catalog.oid, alias, b.tab, alias, filter, after,
        CASE WHEN upper_key IS NULL THEN 'true'
             ELSE pg_catalog.format('%s OPERATOR(pg_catalog.<=) %s', k.key_expr, @s@.capture_backfill_literal(upper_key, k.types)) END,
        k.order_by, alias)
       INTO rows_read;
    UPDATE @s@.capture_backfills x
       SET last_key = COALESCE(upper_key, x.last_key), rows_done = x.rows_done OPERATOR(pg_catalog.+) rows_read,
           chunks_done = x.chunks_done OPERATOR(pg_catalog.+) 1, updated_at = pg_catalog.now(),
           finished_at = CASE WHEN upper_key IS NULL THEN pg_catalog.now() END
     WHERE x.id OPERATOR(pg_catalog.=) backfill
    RETURNING x.rows_done, x.rows_total, x.finished_at IS NOT NULL INTO rows_done, rows_total, finished;
END
$f$;

-- Stops an unfinished backfill for good (its events so far stay). Returns whether there was one.
CREATE FUNCTION @s@.capture_backfill_cancel(tab regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $f$
BEGIN
    DELETE FROM @s@.capture_backfills b
     WHERE b.tab OPERATOR(pg_catalog.=) capture_backfill_cancel.tab AND b.finished_at IS NULL;
    RETURN FOUND;
END
$f$;

CREATE FUNCTION @s@.capture_backfill_cancel(tab text) RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
    SELECT @s@.capture_backfill_cancel(@s@.capture_table(tab));
END;

-- The whole backfill in the caller's transaction, for migrations (all chunks hold their locks
-- until that transaction ends: for large live tables run `eventsctl capture backfill`, which
-- commits every chunk). Returns the backfill's id.
-- No pinned search_path: the table name is resolved as the caller writes it (a bare 'orders'
-- on the caller's path), and the body names nothing unqualified. It runs with the caller's
-- rights (SECURITY INVOKER), so the caller's path can change nothing it could not do itself.
CREATE FUNCTION @s@.capture_backfill(tab text, chunk_rows integer DEFAULT 1000, condition text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
AS $f$
DECLARE
    backfill bigint := @s@.capture_backfill_start(@s@.capture_table(tab), chunk_rows, condition);
BEGIN
    WHILE NOT (SELECT c.finished FROM @s@.capture_backfill_chunk(backfill) c) LOOP
    END LOOP;
    RETURN backfill;
END
$f$;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);

    -- The writer belongs to the capture role, like the trigger functions: handing it over needs
    -- membership in that role and its CREATE on the schema, for this moment only
    -- (events_grant_roles, run by migrate next, takes the membership back).
    IF NOT pg_catalog.pg_has_role(current_user, capture_owner, 'USAGE') THEN
        EXECUTE pg_catalog.format('GRANT %I TO %I', capture_owner, current_user);
    END IF;
    EXECUTE pg_catalog.format('GRANT CREATE ON SCHEMA %s TO %I', s, capture_owner);
    EXECUTE pg_catalog.format('ALTER FUNCTION %s.capture_backfill_write(regclass, anyarray) OWNER TO %I', s, capture_owner);
    EXECUTE pg_catalog.format('REVOKE CREATE ON SCHEMA %s FROM %I', s, capture_owner);

    body := $body$
REVOKE ALL ON FUNCTION @s@.capture_settings(regclass), @s@.capture_backfill_write(regclass, anyarray),
    @s@.capture_backfill_key(regclass, text), @s@.capture_backfill_literal(text[], text[]),
    @s@.capture_backfill_start(regclass, integer, text), @s@.capture_backfill_start(text, integer, text),
    @s@.capture_backfill_chunk(bigint), @s@.capture_backfill_cancel(regclass), @s@.capture_backfill_cancel(text),
    @s@.capture_backfill(text, integer, text)
    FROM PUBLIC;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);
    -- Executable by this database's capture admins from the start (events_grant_roles, run by
    -- migrate next, grants the same): capture_check() expects exactly that.
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON FUNCTION %1$s.capture_backfill_write(regclass, anyarray), %1$s.capture_backfill_start(regclass, integer, text),
             %1$s.capture_backfill_start(text, integer, text), %1$s.capture_backfill_chunk(bigint), %1$s.capture_backfill_cancel(regclass),
             %1$s.capture_backfill_cancel(text), %1$s.capture_backfill(text, integer, text), %1$s.capture_backfill_key(regclass, text),
             %1$s.capture_backfill_literal(text[], text[]), %1$s.capture_settings(regclass) TO %2$I',
        s, admin_role);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s.capture_settings(regclass) TO %I', s, capture_owner);
    body := $body$
INSERT INTO @s@.capture_functions (signature, owned_by, secdef, config, executors, source_md5)
SELECT 'capture_backfill_write(regclass,anyarray)', 'capture', true, p.proconfig, 'capture_admin', pg_catalog.md5(p.prosrc)
  FROM pg_catalog.pg_proc p WHERE p.oid = '@s@.capture_backfill_write(regclass, anyarray)'::pg_catalog.regprocedure;
$body$;
    EXECUTE pg_catalog.replace(body, '@s@', s);
    PERFORM pg_catalog.set_config('search_path', caller_path, true);
END
$migration$;

-- events_grant_roles as before, then the backfill's: the capture role owns the writer and may
-- call the settings look-up; capture admins run backfills and keep their progress, each for the
-- tables it owns.
ALTER FUNCTION events_grant_roles(text) RENAME TO events_grant_roles_before_backfill;
REVOKE ALL ON FUNCTION events_grant_roles_before_backfill(text) FROM PUBLIC;

CREATE FUNCTION events_grant_roles(prefix text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_capture name := prefix || '_capture';
    v_admin   name := prefix || '_capture_admin';
    v_schema  name := (SELECT n.nspname FROM pg_catalog.pg_class c
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'events'::regclass);
    v_admin_fns text := 'capture_backfill_start(regclass, integer, text), '
                        'capture_backfill_start(text, integer, text), capture_backfill_chunk(bigint), '
                        'capture_backfill_cancel(regclass), capture_backfill_cancel(text), capture_backfill(text, integer, text), '
                        'capture_backfill_key(regclass, text), capture_backfill_literal(text[], text[])';
    v_helpers text := 'capture_settings(regclass)';
    v_member name;
    v_fn text;
    v_owner name;
BEGIN
    -- The writer goes to this prefix's capture role first: handing it over needs membership in
    -- its current owner and in the new one (and the new one's CREATE on the schema), which the
    -- previous function takes back at its end from everyone, as it does for the trigger functions.
    v_owner := (SELECT p.proowner::regrole::name FROM pg_catalog.pg_proc p
                 WHERE p.oid = 'capture_backfill_write(regclass, anyarray)'::regprocedure);
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_capture) THEN
        EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', v_capture);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_admin) THEN
        EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', v_admin);
    END IF;
    FOREACH v_member IN ARRAY ARRAY[v_owner, v_capture] LOOP
        IF NOT pg_catalog.pg_has_role(current_user, v_member, 'MEMBER') THEN
            EXECUTE pg_catalog.format('GRANT %I TO %I', v_member, current_user);
        END IF;
    END LOOP;
    IF v_owner <> v_capture THEN
        EXECUTE pg_catalog.format('GRANT CREATE ON SCHEMA %I TO %I', v_schema, v_capture);
        EXECUTE pg_catalog.format('ALTER FUNCTION capture_backfill_write(regclass, anyarray) OWNER TO %I', v_capture);
        EXECUTE pg_catalog.format('REVOKE CREATE ON SCHEMA %I FROM %I', v_schema, v_capture);
    END IF;
    -- Exactly this prefix's admins may execute it (only its owner may grant that).
    FOR v_member IN SELECT a.grantee::regrole::name
                      FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                     WHERE p.oid = 'capture_backfill_write(regclass, anyarray)'::regprocedure
                       AND a.grantee <> p.proowner AND a.grantee <> 0 LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION capture_backfill_write(regclass, anyarray) FROM %I', v_member);
    END LOOP;
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION capture_backfill_write(regclass, anyarray) TO %I', v_admin);
    PERFORM events_grant_roles_before_backfill(prefix); -- validates the prefix; takes the memberships back

    -- Exactly: whoever held something here before (a previous prefix's roles) loses it.
    FOR v_fn, v_member IN SELECT p.oid::regprocedure::text, a.grantee::regrole::name
                      FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                     WHERE p.proname IN ('capture_settings', 'capture_backfill_start',
                                         'capture_backfill_chunk', 'capture_backfill_cancel', 'capture_backfill',
                                         'capture_backfill_key', 'capture_backfill_literal')
                       AND p.pronamespace = (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = 'events'::regclass)
                       AND a.grantee <> p.proowner AND a.grantee <> 0 LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM %I', v_fn, v_member);
    END LOOP;
    FOR v_member IN SELECT DISTINCT a.grantee::regrole::name
                      FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                     WHERE c.oid = 'capture_backfills'::regclass AND a.grantee <> c.relowner AND a.grantee <> 0 LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON capture_backfills FROM %I', v_member);
    END LOOP;
    FOR v_member IN SELECT p.polname FROM pg_catalog.pg_policy p WHERE p.polrelid = 'capture_backfills'::regclass LOOP
        EXECUTE pg_catalog.format('DROP POLICY %I ON capture_backfills', v_member);
    END LOOP;

    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', v_admin_fns, v_admin);
    EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I, %I', v_helpers, v_capture, v_admin);
    EXECUTE pg_catalog.format(
        'GRANT SELECT, INSERT, UPDATE, DELETE ON capture_backfills TO %1$I;
         CREATE POLICY capture_backfills_own_tables ON capture_backfills FOR ALL TO %1$I
             USING (pg_catalog.pg_has_role(current_user, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tab), ''USAGE''))
             WITH CHECK (pg_catalog.pg_has_role(current_user, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tab), ''USAGE'')
                         AND (started_by = current_user OR finished_at IS NOT NULL));',
        v_admin);
END
$fn$;
REVOKE ALL ON FUNCTION events_grant_roles(text) FROM PUBLIC;
