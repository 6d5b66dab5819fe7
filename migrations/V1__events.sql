-- The outbox: one row per event. Rows are only ever inserted (by producers) and deleted (by the
-- purger); nothing updates them.
CREATE TABLE events (
    id         bigserial   PRIMARY KEY,
    -- The writing transaction's id (epoch-extended, never wraps). Readers take rows in (tx_id, id)
    -- order and only below the visibility horizon, so a transaction that commits late can never
    -- land behind a position a consumer has already passed.
    tx_id      xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id   uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    topic      text        NOT NULL
               CONSTRAINT events_topic_format CHECK (topic ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    key        text,
    type       text,
    payload    jsonb       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Reading by position.
CREATE INDEX events_position_idx ON events (tx_id, id);
-- Purging by age.
CREATE INDEX events_created_at_idx ON events (created_at);

-- Where each consumer publishes the position it has durably delivered up to, after every batch.
-- The purger never deletes past the slowest consumer that published recently.
CREATE TABLE consumer_positions (
    consumer   text        PRIMARY KEY
               CONSTRAINT consumer_positions_name_format CHECK (consumer ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$'),
    tx_id      xid8        NOT NULL,
    id         bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The highest position the purger has ever deleted. A consumer whose position is below it may have
-- lost events (a forced purge, or it was offline longer than the consumer expiry) and says so.
-- One row at most.
CREATE TABLE purge_watermark (
    singleton  boolean     PRIMARY KEY DEFAULT true CONSTRAINT purge_watermark_one_row CHECK (singleton),
    tx_id      xid8        NOT NULL,
    id         bigint      NOT NULL,
    forced     boolean     NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
