-- Causal order: an event written after another transaction's commit was visible to its writer
-- sorts after every event of that transaction.
--
-- Until now tx_id was the writer's own transaction id, taken at its first write. A transaction
-- that wrote something early (an audit row, a lock row) and appended an event after it had seen
-- another transaction's commit sorted before that commit's events, so per-key readers (projections,
-- capture diffs, mirrors) replayed changes in an order the table never went through.
--
-- From here on the sort key is the larger of
--   * the writer's own transaction id (assigned by pg_current_xact_id() if it has none yet), and
--   * the newest transaction id known to have finished when the row is written:
--     pg_snapshot_xmax(snapshot) - 1, which is PostgreSQL's latestCompletedXid when the snapshot
--     was taken (xmax is always latestCompletedXid + 1).
--
-- The function is VOLATILE plpgsql on purpose: PostgreSQL gives a volatile function's expression a
-- fresh snapshot (in READ COMMITTED), taken when the row is written, not when the statement began.
-- So `WITH u AS (UPDATE hot … RETURNING …) INSERT INTO events …` whose UPDATE waited for another
-- transaction's row lock and then built on its commit still sorts after that commit. An inline
-- expression would use the statement's snapshot, taken before the wait; a SQL function could be
-- inlined into it. In REPEATABLE READ and SERIALIZABLE the snapshot is the transaction's, so the
-- order follows what the transaction saw.
--
-- Why causal: if B committed before the row's snapshot, latestCompletedXid was then already >= B's
-- own id and >= every key of B's (it only grows), so the row's key is >= all of B's keys; on a tie
-- the row's id comes from the sequence after B's rows took theirs. Why nothing is skipped: the key
-- is never below the writer's own id, and readers only take rows whose key is below
-- pg_snapshot_xmin (no transaction at or above it has finished), so a row that is not yet visible
-- always sorts after every position a reader has passed. The full argument is in
-- crates/event-store/src/position.rs.
--
-- Everything is schema-qualified: the function runs with the privileges of whoever inserts, the
-- capture role included, whatever their search_path. xid8 has no arithmetic, hence the round trip
-- through int8 (xid8 values are epoch-extended 64-bit counters, far below 2^63 in practice).
-- Only the DEFAULT changes: stored events and every stored position keep their values and their
-- order, and readers need no change.
CREATE FUNCTION events_sort_key() RETURNS xid8
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
AS $$
BEGIN
    RETURN GREATEST(
        pg_catalog.pg_current_xact_id(),
        ((pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::pg_catalog.text::pg_catalog.int8
            OPERATOR(pg_catalog.-) 1)::pg_catalog.text)::pg_catalog.xid8);
END
$$;

COMMENT ON FUNCTION events_sort_key() IS
    'The default of events.tx_id: the larger of the writing transaction''s id and the newest '
    'transaction id finished when the row is written. Causal: a row written after a commit was '
    'visible sorts after it. Never below the writer''s own id: rows of open transactions stay at '
    'or above every reader''s horizon.';

ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT events_sort_key();
