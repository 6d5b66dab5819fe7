-- Where sinks without a store of their own (HTTP webhooks, NATS JetStream) keep their checkpoint
-- and their dead letters: in PostgreSQL, next to the events. The MongoDB sink keeps both in
-- MongoDB, in the same transaction as the events; a webhook receiver has no transaction we could
-- join, so its checkpoint is written after the receiver's 2xx (delivery at least once).

-- One row per consumer. `pending_*` is the end of the request in flight: recorded before the
-- request is sent, so that after a crash the same events go out again as the same request, with
-- the same idempotency key (a receiver that saw them can tell).
CREATE TABLE sink_checkpoints (
    consumer        text        PRIMARY KEY
                    CONSTRAINT sink_checkpoints_name_format CHECK (consumer ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    sink            text        NOT NULL,
    tx_id           xid8        NOT NULL,
    id              bigint      NOT NULL,
    event_id        uuid,
    origin_system   text,
    origin_database text,
    pending_tx_id   xid8,
    pending_id      bigint,
    owner           name        NOT NULL DEFAULT current_user,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sink_checkpoints_pending_both CHECK ((pending_tx_id IS NULL) = (pending_id IS NULL))
);

-- One row per event a consumer set aside, with why; the payload text bounded as in MongoDB's
-- deadLetters (64 KiB, its full length and hash kept).
CREATE TABLE sink_dead_letters (
    consumer            text        NOT NULL,
    id                  bigint      NOT NULL,
    tx_id               xid8        NOT NULL,
    event_id            uuid,
    topic               text,
    key                 text,
    type                text,
    reason              text        NOT NULL,
    detail              text        NOT NULL,
    payload_text        text        NOT NULL,
    payload_bytes       bigint      NOT NULL,
    payload_truncated   boolean     NOT NULL,
    payload_sha256      text        NOT NULL,
    owner               name        NOT NULL DEFAULT current_user,
    first_seen_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at        timestamptz NOT NULL DEFAULT now(),
    -- Set by `eventsctl dead-letters replay`: the consumer, which holds the sink's settings and
    -- secrets, sends the event again and removes the row once the sink took it.
    replay_requested_at timestamptz,
    PRIMARY KEY (consumer, id)
);
CREATE INDEX sink_dead_letters_replay_idx ON sink_dead_letters (consumer) WHERE replay_requested_at IS NOT NULL;

-- A consumer login writes only the rows it owns, under names it may use (as consumer_positions).
ALTER TABLE sink_checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE sink_dead_letters ENABLE ROW LEVEL SECURITY;

-- events_grant_roles as before (V9, then V10), then the consumer role's rights on these tables.
ALTER FUNCTION events_grant_roles(text) RENAME TO events_grant_roles_before_sinks;
REVOKE ALL ON FUNCTION events_grant_roles_before_sinks(text) FROM PUBLIC;

CREATE FUNCTION events_grant_roles(prefix text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_old  name := (SELECT r.role FROM event_stream_roles r WHERE r.job = 'consumer');
    v_role name := prefix || '_consumer';
    v_each name;
BEGIN
    PERFORM events_grant_roles_before_sinks(prefix); -- validates the prefix, creates the roles
    FOREACH v_each IN ARRAY ARRAY[coalesce(v_old, 'events_consumer'), v_role] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_each);
        EXECUTE pg_catalog.format(
            'REVOKE ALL ON sink_checkpoints, sink_dead_letters FROM %1$I;
             DROP POLICY IF EXISTS %2$I ON sink_checkpoints;
             DROP POLICY IF EXISTS %2$I ON sink_dead_letters;', v_each, v_each || '_own_sink_state');
    END LOOP;
    EXECUTE pg_catalog.format(
        'GRANT SELECT, INSERT, UPDATE ON sink_checkpoints TO %1$I;
         GRANT SELECT, INSERT, UPDATE, DELETE ON sink_dead_letters TO %1$I;
         CREATE POLICY %2$I ON sink_checkpoints FOR ALL TO %1$I
             USING (owner = current_user AND events_consumer_may_write(consumer, current_user))
             WITH CHECK (owner = current_user AND events_consumer_may_write(consumer, current_user));
         CREATE POLICY %2$I ON sink_dead_letters FOR ALL TO %1$I
             USING (owner = current_user AND events_consumer_may_write(consumer, current_user))
             WITH CHECK (owner = current_user AND events_consumer_may_write(consumer, current_user));',
        v_role, v_role || '_own_sink_state');
END
$fn$;
REVOKE ALL ON FUNCTION events_grant_roles(text) FROM PUBLIC;
