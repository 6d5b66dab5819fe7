-- Causal order: an event written by a statement that could see another transaction's commit sorts
-- after every event of that transaction.
--
-- Until now tx_id was the writer's own transaction id, taken at its first write. A transaction
-- that wrote something early (an audit row, a lock row) and appended an event after it had seen
-- another transaction's commit sorted before that commit's events, so per-key readers (projections,
-- capture diffs, mirrors) replayed changes in an order the table never went through.
--
-- From here on the sort key is the larger of
--   * the writer's own transaction id (assigned by pg_current_xact_id() if it has none yet), and
--   * the newest transaction id the inserting statement's snapshot knows to be finished:
--     pg_snapshot_xmax(snapshot) - 1, which is PostgreSQL's latestCompletedXid when the snapshot
--     was taken (xmax is always latestCompletedXid + 1).
--
-- Why causal: if B committed before A's statement took its snapshot, latestCompletedXid was then
-- already >= B's own id and >= every key B's statements computed (it only grows), so A's key is
-- >= all of B's keys; on a tie, A's ids come from the same sequence after B's rows took theirs.
-- Why nothing is skipped: the key is never below the writer's own id, and readers only take rows
-- whose key is below pg_snapshot_xmin (no transaction at or above it has finished), so a row that
-- is not yet visible always sorts after every position a reader has passed. The full argument is
-- in crates/event-store/src/position.rs.
--
-- xid8 has no arithmetic, hence the round trip through bigint (xid8 values are epoch-extended
-- 64-bit counters, far below 2^63 in practice). Only the DEFAULT changes: stored events and every
-- stored position keep their values and their order, and readers need no change.
ALTER TABLE events
    ALTER COLUMN tx_id SET DEFAULT GREATEST(
        pg_catalog.pg_current_xact_id(),
        ((pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::bigint - 1)::text)::xid8
    );

COMMENT ON COLUMN events.tx_id IS
    'Sort key (with id): the larger of the writing transaction''s id and the newest transaction id '
    'finished when the inserting statement took its snapshot. Causal: a statement that could see a '
    'commit writes after it. Never below the writer''s own id: rows of open transactions stay at or '
    'above every reader''s horizon.';
