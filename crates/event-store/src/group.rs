//! Consumer groups: several processes share one consumer's work.
//!
//! A group `orders` of P partitions is P internal consumers named `orders.p00` … `orders.pNN`
//! ([`Partition::name`]). Each has its own checkpoint in the sink and its own `consumer_positions`
//! row, so delivery, catch-up, the purger and `eventsctl` treat a partition like any consumer.
//!
//! **The hash.** An event belongs to partition
//! `((hashtextextended(coalesce(key, event_id::text), 0) % P) + P) % P` ([`PARTITION_SQL`]):
//! PostgreSQL's 64-bit text hash of the key (of the event id for events without a key), taken
//! non-negative modulo P. It is the hash PostgreSQL's own hash partitioning uses, kept stable
//! across versions because hash-partitioned tables survive `pg_upgrade`. Every event of a key is
//! in one partition, read in position order by one member at a time: per-key order is the
//! stream's order.
//!
//! **Ownership** lives in PostgreSQL (V12): members keep a row in `consumer_group_members` alive
//! with heartbeats, and each partition row in `consumer_group_partitions` names its owner and
//! when that lease expires. Advisory locks would not do: a paused member (SIGSTOP, a long GC, a
//! network stall) keeps its session, so it would keep its locks and stall its partitions forever.
//! A lease expires instead, and the partition is taken over.
//!
//! **Fencing.** Every take-over increments the partition's `epoch`. The new owner stamps it on
//! the partition's checkpoint in the sink before it reads anything, and every batch's checkpoint
//! update requires it, in the same transaction as the events. A member that was paused past its
//! lease therefore finds its next write refused; it cannot overwrite what the new owner stored.
//!
//! **Assignment** is computed by every member from the same table: the live, ready members
//! sorted by id, and partition `p` to the member at index `p mod n` ([`assignment`]). A member
//! that cannot reach its sink reports itself not ready and is given nothing, so the others take
//! its partitions over.

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::position::Position;

/// The most partitions a group may have (each partition reads the whole stream's positions).
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition of an event, as SQL over the columns `key` and `event_id` and the bound count
/// `$1`: documented, so that anyone can compute where a key goes (`SELECT … FROM events`).
pub const PARTITION_SQL: &str =
    "((hashtextextended(coalesce(key, event_id::text), 0) % $1::bigint) + $1::bigint) % $1::bigint";

pub use crate::position::Partition;

/// The group and partition index a partition's consumer name stands for (`orders.p03` →
/// `("orders", 3)`), if it has the form.
pub fn split_name(name: &str) -> Option<(&str, u32)> {
    let (group, suffix) = name.rsplit_once(".p")?;
    if group.is_empty() || suffix.len() < 2 || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((group, suffix.parse().ok()?))
}

/// Checks a group name: a consumer name without dots (a dot would make partition names
/// ambiguous), of at most 120 characters.
pub fn validate_group_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 120
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{name:?} cannot name a consumer group: use 1 to 120 letters, digits, '_' or '-', \
             starting with a letter or digit (no '.': partitions are named <group>.p00 …)"
        )))
    }
}

/// Checks a partition count: 1 to [`MAX_PARTITIONS`].
pub fn check_count(partitions: u32) -> Result<()> {
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(Error::Config(format!(
            "--partitions {partitions} is out of range: a group has 1 to {MAX_PARTITIONS} partitions"
        )));
    }
    Ok(())
}

/// What [`join`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// This call created the group.
    pub created: bool,
    /// The published position of the consumer of the same name that the new group took over
    /// (its partitions start there), if there was one.
    pub took_over: Option<Position>,
}

/// The error for a partition count that is not the group's.
fn count_mismatch(group: &str, stored: i32, asked: u32) -> Error {
    Error::Config(format!(
        "consumer group {group:?} has {stored} partitions, but this member was started with \
         --partitions {asked}. Start it with --partitions {stored}, or change the group's count: \
         stop every member, run `eventsctl group repartition {group} --partitions {asked} --yes` \
         (every partition starts again from the oldest partition checkpoint; events already \
         stored are not stored twice), then start the members with --partitions {asked}"
    ))
}

/// Joins (creating when needed) group `group` of `partitions` partitions. Refuses a different
/// count than the group has. Creating a group takes over the consumer of the same name: its
/// published position is copied to every partition's row and its own row removed, in one
/// transaction (the sink's checkpoint is taken over by each partition's first owner).
pub async fn join(client: &mut Client, group: &str, partitions: u32) -> Result<Joined> {
    validate_group_name(group)?;
    check_count(partitions)?;
    let context = || format!("join consumer group {group:?}");
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::database(context(), e))?;
    let count = i32::try_from(partitions).expect("at most MAX_PARTITIONS");
    let created = tx
        .query_opt(
            "INSERT INTO consumer_groups (name, partitions) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING RETURNING partitions",
            &[&group, &count],
        )
        .await
        .map_err(|e| Error::database(context(), e))?
        .is_some();
    if !created {
        let stored: i32 = tx
            .query_one(
                "SELECT partitions FROM consumer_groups WHERE name = $1",
                &[&group],
            )
            .await
            .map_err(|e| Error::database(context(), e))?
            .get(0);
        if stored != count {
            return Err(count_mismatch(group, stored, partitions));
        }
        return Ok(Joined {
            created: false,
            took_over: None,
        });
    }
    insert_partitions(&tx, group, count).await?;
    let base = tx
        .query_opt(
            "DELETE FROM consumer_positions WHERE consumer = $1 RETURNING tx_id::text, id",
            &[&group],
        )
        .await
        .map_err(|e| Error::database(context(), e))?;
    let took_over = match base {
        Some(row) => {
            let position = Position::from_text(row.get(0), row.get(1))?;
            publish_partitions(&tx, group, partitions, position, false).await?;
            Some(position)
        }
        None => None,
    };
    tx.commit()
        .await
        .map_err(|e| Error::database(context(), e))?;
    Ok(Joined {
        created: true,
        took_over,
    })
}

/// A group's partition count, `None` when there is no such group.
pub async fn partitions_of(client: &Client, group: &str) -> Result<Option<u32>> {
    let row = client
        .query_opt(
            "SELECT partitions FROM consumer_groups WHERE name = $1",
            &[&group],
        )
        .await
        .map_err(|e| Error::database(format!("look up consumer group {group:?}"), e))?;
    Ok(row.map(|r| u32::try_from(r.get::<_, i32>(0)).unwrap_or(0)))
}

/// A live member, as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub member: String,
    /// It can reach its sink.
    pub ready: bool,
    /// Until its next heartbeat is due at the latest.
    pub expires_in: Duration,
}

/// Records that `member` is alive (and whether it can reach its sink) for `timeout` more.
pub async fn heartbeat(
    client: &Client,
    group: &str,
    member: &str,
    ready: bool,
    timeout: Duration,
) -> Result<()> {
    let ms = millis(timeout);
    client
        .execute(
            "INSERT INTO consumer_group_members (group_name, member, ready, expires_at)
             VALUES ($1, $2, $3, now() + $4::bigint * interval '1 millisecond')
             ON CONFLICT (group_name, member)
             DO UPDATE SET ready = EXCLUDED.ready, expires_at = EXCLUDED.expires_at",
            &[&group, &member, &ready, &ms],
        )
        .await
        .map_err(|e| Error::database(format!("send the heartbeat of member {member}"), e))?;
    Ok(())
}

/// The members whose heartbeat has not expired, sorted by id.
pub async fn members(client: &Client, group: &str) -> Result<Vec<Member>> {
    let rows = client
        .query(
            "SELECT member, ready, extract(epoch FROM expires_at - now())::float8
               FROM consumer_group_members
              WHERE group_name = $1 AND expires_at > now()
              ORDER BY member",
            &[&group],
        )
        .await
        .map_err(|e| Error::database(format!("read the members of group {group:?}"), e))?;
    Ok(rows
        .iter()
        .map(|r| Member {
            member: r.get(0),
            ready: r.get(1),
            expires_in: Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0)),
        })
        .collect())
}

/// The partitions of a group of `count` that `me` should own, given the live `members` (sorted
/// by id): partition `p` goes to the ready member at index `p mod n`. When no member is ready,
/// every live member counts (someone must keep trying).
pub fn assignment(members: &[Member], me: &str, count: u32) -> Vec<Partition> {
    let ready: Vec<&Member> = members.iter().filter(|m| m.ready).collect();
    let candidates: Vec<&Member> = if ready.is_empty() {
        members.iter().collect()
    } else {
        ready
    };
    let Some(at) = candidates.iter().position(|m| m.member == me) else {
        return Vec::new();
    };
    let n = candidates.len() as u32;
    Partition::all(count)
        .filter(|p| p.index % n == at as u32)
        .collect()
}

/// Takes `partition` for `member` when it is free or its lease expired: the new epoch, or `None`
/// when another member holds it.
pub async fn acquire(
    client: &Client,
    group: &str,
    partition: Partition,
    member: &str,
    timeout: Duration,
) -> Result<Option<i64>> {
    let index = partition.index as i32;
    let row = client
        .query_opt(
            "UPDATE consumer_group_partitions
                SET member = $3, epoch = epoch + 1,
                    expires_at = now() + $4::bigint * interval '1 millisecond'
              WHERE group_name = $1 AND partition = $2
                AND (member IS NULL OR member = $3 OR expires_at IS NULL OR expires_at < now())
                -- Never under another count (a repartition while this member was away).
                AND EXISTS (SELECT FROM consumer_groups g WHERE g.name = $1 AND g.partitions = $5)
             RETURNING epoch",
            &[
                &group,
                &index,
                &member,
                &millis(timeout),
                &(partition.count as i32),
            ],
        )
        .await
        .map_err(|e| {
            Error::database(
                format!("take partition {} of group {group:?}", partition.index),
                e,
            )
        })?;
    Ok(row.map(|r| r.get(0)))
}

/// Extends every lease `member` holds by `timeout`: the partitions (and epochs) it still owns.
/// A partition missing from the answer was taken over: stop writing it at once.
pub async fn renew(
    client: &Client,
    group: &str,
    member: &str,
    timeout: Duration,
) -> Result<Vec<(u32, i64)>> {
    let rows = client
        .query(
            "UPDATE consumer_group_partitions
                SET expires_at = now() + $3::bigint * interval '1 millisecond'
              WHERE group_name = $1 AND member = $2
             RETURNING partition, epoch",
            &[&group, &member, &millis(timeout)],
        )
        .await
        .map_err(|e| Error::database(format!("renew the leases of member {member}"), e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get(1)))
        .collect())
}

/// Gives `partition` up (when `member` still holds it), for another member to take at once.
pub async fn release(client: &Client, group: &str, partition: u32, member: &str) -> Result<()> {
    client
        .execute(
            "UPDATE consumer_group_partitions SET member = NULL, expires_at = NULL
              WHERE group_name = $1 AND partition = $2 AND member = $3",
            &[&group, &(partition as i32), &member],
        )
        .await
        .map_err(|e| Error::database(format!("release partition {partition}"), e))?;
    Ok(())
}

/// Leaves the group: every lease given up and the member's row removed, so the others take its
/// partitions on their next look.
pub async fn leave(client: &Client, group: &str, member: &str) -> Result<()> {
    client
        .execute(
            "UPDATE consumer_group_partitions SET member = NULL, expires_at = NULL
              WHERE group_name = $1 AND member = $2",
            &[&group, &member],
        )
        .await
        .map_err(|e| Error::database(format!("release the partitions of member {member}"), e))?;
    client
        .execute(
            "DELETE FROM consumer_group_members WHERE group_name = $1 AND member = $2",
            &[&group, &member],
        )
        .await
        .map_err(|e| Error::database(format!("remove member {member} from the group"), e))?;
    Ok(())
}

/// A partition's lease, as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: Partition,
    /// The owner, while its lease has not expired.
    pub member: Option<String>,
    pub epoch: i64,
}

/// Every partition of `group` and who owns it now (an expired lease shows no owner).
pub async fn leases(client: &Client, group: &str) -> Result<Vec<Lease>> {
    let rows = client
        .query(
            "SELECT p.partition, CASE WHEN p.expires_at > now() THEN p.member END, p.epoch,
                    g.partitions
               FROM consumer_group_partitions p
               JOIN consumer_groups g ON g.name = p.group_name
              WHERE p.group_name = $1
              ORDER BY p.partition",
            &[&group],
        )
        .await
        .map_err(|e| Error::database(format!("read the partitions of group {group:?}"), e))?;
    Ok(rows
        .iter()
        .map(|r| Lease {
            partition: Partition {
                index: r.get::<_, i32>(0) as u32,
                count: r.get::<_, i32>(3) as u32,
            },
            member: r.get(1),
            epoch: r.get(2),
        })
        .collect())
}

/// Every group's name and partition count, for `eventsctl status`.
pub async fn all(client: &Client) -> Result<Vec<(String, u32)>> {
    let rows = client
        .query(
            "SELECT name, partitions FROM consumer_groups ORDER BY name",
            &[],
        )
        .await
        .map_err(|e| Error::database("list the consumer groups", e))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i32>(1) as u32))
        .collect())
}

/// Changes `group` to `partitions` partitions while no member runs: every new partition's
/// published position is the oldest of the old ones' and `floor` (where the sink's checkpoints
/// start them: the purger must keep everything they read again), and the old partitions' rows
/// go. Returns that position (`None`: none was known).
pub async fn repartition(
    client: &mut Client,
    group: &str,
    partitions: u32,
    floor: Option<Position>,
) -> Result<Option<Position>> {
    check_count(partitions)?;
    let context = || format!("repartition consumer group {group:?}");
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::database(context(), e))?;
    let old: i32 = tx
        .query_opt(
            "SELECT partitions FROM consumer_groups WHERE name = $1 FOR UPDATE",
            &[&group],
        )
        .await
        .map_err(|e| Error::database(context(), e))?
        .ok_or_else(|| Error::Config(format!("there is no consumer group {group:?}")))?
        .get(0);
    let live: i64 = tx
        .query_one(
            "SELECT count(*) FROM consumer_group_members WHERE group_name = $1 AND expires_at > now()",
            &[&group],
        )
        .await
        .map_err(|e| Error::database(context(), e))?
        .get(0);
    if live > 0 {
        return Err(Error::LeaseHeld(format!(
            "{live} member(s) of group {group:?} are running; stop every member first"
        )));
    }
    let old_names: Vec<String> = Partition::all(old as u32).map(|p| p.name(group)).collect();
    let oldest = tx
        .query_opt(
            "SELECT tx_id::text, id FROM consumer_positions WHERE consumer = ANY($1)
              ORDER BY tx_id, id LIMIT 1",
            &[&old_names],
        )
        .await
        .map_err(|e| Error::database(context(), e))?
        .map(|r| Position::from_text(r.get(0), r.get(1)))
        .transpose()?;
    let oldest = match (oldest, floor) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    tx.execute(
        "DELETE FROM consumer_positions WHERE consumer = ANY($1)",
        &[&old_names],
    )
    .await
    .map_err(|e| Error::database(context(), e))?;
    let count = partitions as i32;
    tx.execute(
        "DELETE FROM consumer_group_partitions WHERE group_name = $1",
        &[&group],
    )
    .await
    .map_err(|e| Error::database(context(), e))?;
    tx.execute(
        "UPDATE consumer_groups SET partitions = $2 WHERE name = $1",
        &[&group, &count],
    )
    .await
    .map_err(|e| Error::database(context(), e))?;
    insert_partitions(&tx, group, count).await?;
    if let Some(position) = oldest {
        publish_partitions(&tx, group, partitions, position, true).await?;
    }
    tx.commit()
        .await
        .map_err(|e| Error::database(context(), e))?;
    Ok(oldest)
}

/// The lease rows of a group of `count` partitions, all free.
async fn insert_partitions(
    tx: &tokio_postgres::Transaction<'_>,
    group: &str,
    count: i32,
) -> Result<()> {
    tx.execute(
        "INSERT INTO consumer_group_partitions (group_name, partition)
         SELECT $1, p FROM generate_series(0, $2 - 1) AS p",
        &[&group, &count],
    )
    .await
    .map_err(|e| Error::database(format!("create the partitions of group {group:?}"), e))?;
    Ok(())
}

/// Publishes `position` for every partition of a group of `count` (the purger keeps what comes
/// after it): over rows already there too when `overwrite`.
async fn publish_partitions(
    tx: &tokio_postgres::Transaction<'_>,
    group: &str,
    count: u32,
    position: Position,
    overwrite: bool,
) -> Result<()> {
    let names: Vec<String> = Partition::all(count).map(|p| p.name(group)).collect();
    let conflict = if overwrite {
        "DO UPDATE SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id"
    } else {
        "DO NOTHING"
    };
    tx.execute(
        &format!(
            "INSERT INTO consumer_positions (consumer, tx_id, id)
             SELECT n, $2::text::xid8, $3 FROM unnest($1::text[]) AS n
             ON CONFLICT (consumer) {conflict}"
        ),
        &[&names, &position.tx_text(), &position.id],
    )
    .await
    .map_err(|e| Error::database(format!("publish the positions of group {group:?}"), e))?;
    Ok(())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, ready: bool) -> Member {
        Member {
            member: name.into(),
            ready,
            expires_in: Duration::from_secs(5),
        }
    }

    #[test]
    fn partition_names_sort_and_parse_back() {
        let p = Partition {
            index: 3,
            count: 16,
        };
        assert_eq!(p.name("orders"), "orders.p03");
        assert_eq!(
            Partition {
                index: 7,
                count: 1000
            }
            .name("o"),
            "o.p007"
        );
        assert_eq!(Partition { index: 0, count: 1 }.name("o"), "o.p00");
        assert_eq!(split_name("orders.p03"), Some(("orders", 3)));
        assert_eq!(split_name("orders.p3"), None);
        assert_eq!(split_name("orders"), None);
        assert_eq!(split_name("a.b.p10"), Some(("a.b", 10)));
    }

    #[test]
    fn every_partition_has_one_ready_owner() {
        let members = [member("a", true), member("b", false), member("c", true)];
        let a = assignment(&members, "a", 16);
        let b = assignment(&members, "b", 16);
        let c = assignment(&members, "c", 16);
        assert!(b.is_empty(), "a member that is not ready gets nothing");
        assert_eq!(a.len() + c.len(), 16);
        assert!(a.iter().all(|p| !c.contains(p)));
        assert!(assignment(&members, "stranger", 16).is_empty());
        let none_ready = [member("a", false), member("b", false)];
        assert_eq!(
            assignment(&none_ready, "a", 4).len() + assignment(&none_ready, "b", 4).len(),
            4
        );
    }

    #[test]
    fn group_names_exclude_dots() {
        assert!(validate_group_name("orders").is_ok());
        assert!(validate_group_name("orders.x").is_err());
        assert!(validate_group_name("").is_err());
        assert!(validate_group_name(&"a".repeat(121)).is_err());
    }
}
