-- Consumer groups: several processes share one consumer's work, partitioned by key.
--
-- A group `orders` of P partitions is P internal consumers `orders.p00` … (each with its own
-- checkpoint in MongoDB and its own consumer_positions row, so the purger keeps what every
-- partition still needs). Who runs which partition is decided here, by leases with heartbeats:
-- advisory locks would not do, because a paused process (SIGSTOP, a long GC, a network stall)
-- keeps its session and would keep its locks forever. Each take-over of a partition increments its
-- `epoch`; the new owner stamps that epoch on the partition's MongoDB checkpoint, and every batch's
-- checkpoint update requires it, in the same MongoDB transaction as the events. A member that
-- lost a partition while paused therefore cannot write it any more (fencing).

-- One row per group: its name and partition count (changed only by `eventsctl group repartition`).
CREATE TABLE consumer_groups (
    name       text        PRIMARY KEY
               CONSTRAINT consumer_groups_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,119}$'),
    partitions integer     NOT NULL CONSTRAINT consumer_groups_partitions_range CHECK (partitions BETWEEN 1 AND 1024),
    owner      name        NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per running member, kept alive by its heartbeat. `ready`: the member can reach its sink
-- (a member that cannot is given no partitions, so the others take them over).
CREATE TABLE consumer_group_members (
    group_name text        NOT NULL REFERENCES consumer_groups (name) ON DELETE CASCADE ON UPDATE CASCADE,
    member     text        NOT NULL CONSTRAINT consumer_group_members_member_format CHECK (length(member) BETWEEN 1 AND 200),
    ready      boolean     NOT NULL DEFAULT true,
    owner      name        NOT NULL DEFAULT current_user,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (group_name, member)
);

-- One row per partition: who owns it until when, and the epoch of that ownership.
CREATE TABLE consumer_group_partitions (
    group_name text        NOT NULL REFERENCES consumer_groups (name) ON DELETE CASCADE ON UPDATE CASCADE,
    partition  integer     NOT NULL CONSTRAINT consumer_group_partitions_partition CHECK (partition >= 0),
    member     text,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz,
    owner      name        NOT NULL DEFAULT current_user,
    PRIMARY KEY (group_name, partition)
);

ALTER TABLE consumer_groups ENABLE ROW LEVEL SECURITY;
ALTER TABLE consumer_group_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE consumer_group_partitions ENABLE ROW LEVEL SECURITY;

-- A login registered for consumer `orders` in consumer_names may also write the partitions
-- `orders.p00` … of group `orders` (V9's check, extended to the partitions of a group it may
-- use; a consumer merely named like a partition stays with its own registration).
CREATE OR REPLACE FUNCTION events_consumer_may_write(consumer text, who name) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = who AND r.rolcanlogin)
           AND (NOT EXISTS (SELECT FROM consumer_names)
                OR EXISTS (SELECT FROM consumer_names n
                            WHERE n.login = who
                              AND (n.consumer = $1
                                   OR (n.consumer = pg_catalog.regexp_replace($1, '\.p[0-9]{2,4}$', '')
                                       AND EXISTS (SELECT FROM consumer_groups g
                                                    WHERE g.name = n.consumer
                                                      AND pg_catalog.substring($1, '\.p([0-9]{2,4})$')::integer < g.partitions)))));
END;
REVOKE ALL ON FUNCTION events_consumer_may_write(text, name) FROM PUBLIC;

-- events_grant_roles as before (V11), then the consumer role's rights on the group tables (the
-- rows of groups its login created, as consumer_positions: owner = current_user), and DELETE on
-- the consumer_positions rows its login owns (a restrictive policy: never an ownerless row) (a group's first start hands the position of the
-- consumer it takes over to its partitions, and removes the old row so that the purger does not
-- keep events for a consumer that no longer runs).
ALTER FUNCTION events_grant_roles(text) RENAME TO events_grant_roles_before_groups;
REVOKE ALL ON FUNCTION events_grant_roles_before_groups(text) FROM PUBLIC;

CREATE FUNCTION events_grant_roles(prefix text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_old    name := (SELECT r.role FROM event_stream_roles r WHERE r.job = 'consumer');
    v_role   name := prefix || '_consumer';
    v_purger name := prefix || '_purger';
    v_each   name;
BEGIN
    PERFORM events_grant_roles_before_groups(prefix); -- validates the prefix, creates the roles
    FOREACH v_each IN ARRAY ARRAY[coalesce(v_old, 'events_consumer'), v_role] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = v_each);
        EXECUTE pg_catalog.format(
            'REVOKE ALL ON consumer_groups, consumer_group_members, consumer_group_partitions FROM %1$I;
             REVOKE DELETE ON consumer_positions FROM %1$I;
             DROP POLICY IF EXISTS %2$I ON consumer_groups;
             DROP POLICY IF EXISTS %2$I ON consumer_group_members;
             DROP POLICY IF EXISTS %2$I ON consumer_group_partitions;
             DROP POLICY IF EXISTS %3$I ON consumer_positions;', v_each, v_each || '_own_groups',
            v_each || '_deletes_own_positions');
    END LOOP;
    EXECUTE pg_catalog.format(
        'GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_groups, consumer_group_members, consumer_group_partitions TO %1$I;
         GRANT DELETE ON consumer_positions TO %1$I;
         CREATE POLICY %2$I ON consumer_groups FOR ALL TO %1$I
             USING (owner = current_user AND events_consumer_may_write(name, current_user))
             WITH CHECK (owner = current_user AND events_consumer_may_write(name, current_user));
         CREATE POLICY %2$I ON consumer_group_members FOR ALL TO %1$I
             USING (EXISTS (SELECT FROM consumer_groups g WHERE g.name = group_name AND g.owner = current_user))
             WITH CHECK (owner = current_user
                         AND EXISTS (SELECT FROM consumer_groups g WHERE g.name = group_name AND g.owner = current_user));
         CREATE POLICY %2$I ON consumer_group_partitions FOR ALL TO %1$I
             USING (EXISTS (SELECT FROM consumer_groups g WHERE g.name = group_name AND g.owner = current_user))
             WITH CHECK (EXISTS (SELECT FROM consumer_groups g WHERE g.name = group_name AND g.owner = current_user));
         DROP POLICY IF EXISTS %3$I ON consumer_positions;
         CREATE POLICY %3$I ON consumer_positions AS RESTRICTIVE FOR DELETE TO %1$I
             USING (owner = current_user);',
        v_role, v_role || '_own_groups', v_role || '_deletes_own_positions');
    -- The purger's login reads them (as it reads consumer_positions): `eventsctl status` runs as
    -- the owner or a purger login and shows each group's members and partitions.
    EXECUTE pg_catalog.format(
        'REVOKE ALL ON consumer_groups, consumer_group_members, consumer_group_partitions FROM %1$I;
         DROP POLICY IF EXISTS %2$I ON consumer_groups;
         DROP POLICY IF EXISTS %2$I ON consumer_group_members;
         DROP POLICY IF EXISTS %2$I ON consumer_group_partitions;
         GRANT SELECT ON consumer_groups, consumer_group_members, consumer_group_partitions TO %1$I;
         CREATE POLICY %2$I ON consumer_groups FOR SELECT TO %1$I USING (true);
         CREATE POLICY %2$I ON consumer_group_members FOR SELECT TO %1$I USING (true);
         CREATE POLICY %2$I ON consumer_group_partitions FOR SELECT TO %1$I USING (true);',
        v_purger, v_purger || '_reads_groups');
END
$fn$;
REVOKE ALL ON FUNCTION events_grant_roles(text) FROM PUBLIC;
