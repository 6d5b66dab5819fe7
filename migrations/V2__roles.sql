-- Least-privilege group roles. They cannot log in; grant them to login users, e.g.
--   CREATE ROLE orders_app LOGIN PASSWORD '...' IN ROLE events_producer;
-- Roles are cluster-wide, so they are created only when missing (several databases of one
-- cluster can each hold an event stream).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'events_producer') THEN
        CREATE ROLE events_producer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'events_consumer') THEN
        CREATE ROLE events_consumer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'events_purger') THEN
        CREATE ROLE events_purger NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON events, consumer_positions, purge_watermark FROM PUBLIC;

-- Producers append. They may choose event_id (idempotency keys) but never id, tx_id or created_at,
-- which the reading order and the retention depend on. RETURNING needs SELECT on what it returns.
GRANT INSERT (event_id, topic, key, type, payload, headers) ON events TO events_producer;
GRANT SELECT (id, event_id) ON events TO events_producer;
GRANT USAGE ON SEQUENCE events_id_seq TO events_producer;

-- Consumers read events and write only their own bookkeeping. pg_read_all_stats lets a consumer
-- name the backend whose open transaction holds delivery back.
GRANT SELECT ON events TO events_consumer;
GRANT SELECT, INSERT, UPDATE ON consumer_positions TO events_consumer;
GRANT SELECT ON purge_watermark TO events_consumer;
GRANT pg_read_all_stats TO events_consumer;

-- The purger deletes old events; it reads positions to know what it must keep.
GRANT SELECT, DELETE ON events TO events_purger;
GRANT SELECT ON consumer_positions TO events_purger;
GRANT SELECT, INSERT, UPDATE ON purge_watermark TO events_purger;
