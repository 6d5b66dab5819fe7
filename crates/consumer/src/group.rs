//! A member of a consumer group (`--partitions N`): several processes with the same `--name`
//! share its work, one partition per pipeline (see [`event_store::group`] for the hash, the
//! leases and the fencing).
//!
//! The member's loop, every tenth of `--lease-timeout` (200 ms to 1 s):
//! 1. **Heartbeat and renew** in PostgreSQL: its member row, and every partition lease it holds.
//!    A lease missing from the renewal was taken over: that partition's pipeline is stopped at
//!    once (and its next write would be refused by the epoch anyway). When PostgreSQL cannot be
//!    reached for a whole lease timeout, the member stops every partition: its leases may have
//!    been given to others meanwhile.
//! 2. **Probe MongoDB**: a member that has not reached it (by a probe or a partition's write) for
//!    a lease timeout reports itself not
//!    ready, gets no partitions, and gives up those it has, so the group moves them to members
//!    that can deliver them.
//! 3. **Rebalance**: compute this member's share from the live members; stop the partitions no
//!    longer in it (each finishes its batch in flight, then its lease is released for the next
//!    owner to take at once), and take the free or expired ones that are.
//!
//! Each owned partition runs the consumer's own pipeline under the partition's name
//! (`orders.p03`): its own checkpoint in MongoDB, its own `consumer_positions` row for the
//! purger, and its own `/metrics` series.
//!
//! SIGTERM: every partition finishes its batch in flight, every lease is released and the member
//! row removed, so the others take the partitions over on their next look.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_store::db;
use event_store::group::{self, Partition};
use event_store::migrations::{self, Role};
use event_store::retry::{sleep_or_stop, Decision, Policy, Retry};
use services::ops::Health;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::health::POSTGRES;
use crate::sink::mongo::MongoProbe;
use crate::sink::{MongoSink, Probe, Sink, SinkError};
use crate::Config;

/// What the member's probe learnt of MongoDB.
#[derive(Default)]
struct Probed {
    /// A probe has answered (either way).
    answered: AtomicBool,
    /// The last answer was a failure.
    failing: AtomicBool,
}

impl Probed {
    /// Reachable: the probe has answered, and its last answer was no failure, or something (a
    /// probe or a write) reached MongoDB within `timeout`.
    fn ready(&self, reached: &crate::health::Reached, timeout: Duration) -> bool {
        let recent = reached
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < timeout);
        self.answered.load(Ordering::Relaxed) && (!self.failing.load(Ordering::Relaxed) || recent)
    }
}

/// Probes MongoDB every `every` on a task of its own, so that a slow answer never delays the
/// heartbeat (a late heartbeat would lose the leases).
fn spawn_probe(
    probe: MongoProbe,
    reached: crate::health::Reached,
    health: Arc<Health>,
    every: Duration,
    stop: CancellationToken,
) -> Arc<Probed> {
    let probed = Arc::new(Probed::default());
    let seen = probed.clone();
    tokio::spawn(async move {
        loop {
            // Bounded by the driver's server selection timeout.
            let answer = tokio::select! {
                answer = probe.ping() => answer,
                _ = stop.cancelled() => return,
            };
            match answer {
                Ok(()) => {
                    *reached.lock().unwrap() = Some(Instant::now());
                    seen.failing.store(false, Ordering::Relaxed);
                    health.ok(MongoSink::KIND);
                }
                Err(e) => {
                    seen.failing.store(true, Ordering::Relaxed);
                    health.failing(MongoSink::KIND, e.to_string());
                }
            }
            seen.answered.store(true, Ordering::Relaxed);
            if sleep_or_stop(every, &stop).await {
                return;
            }
        }
    });
    probed
}

/// A partition this member runs (or is stopping).
struct Running {
    epoch: i64,
    stop: CancellationToken,
    task: JoinHandle<Result<()>>,
    /// Asked to stop; its lease is released once the task ends.
    stopping: bool,
}

/// Refuses to run consumer `name` on its own when it is a consumer group.
pub async fn refuse_if_grouped(client: &Client, name: &str) -> Result<()> {
    match group::partitions_of(client, name).await? {
        Some(n) => Err(Error::Config(format!(
            "consumer {name:?} is a consumer group of {n} partitions: start it with \
             --partitions {n} (CONSUMER_PARTITIONS={n})"
        ))),
        None => Ok(()),
    }
}

/// This process's id in the group: host, pid and a random part (a restarted process is a new
/// member).
fn member_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

/// Runs this process as a member of group `config.name` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let count = config.partitions.expect("a group member has --partitions");
    let name = config.name.clone();
    let me = member_id();
    let timeout = config.lease_timeout;
    // Heartbeats are cheap (three small statements); looking often keeps hand-overs short.
    let tick = (timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(1));
    let (health, stop) = crate::serve(&config, &shutdown).await?;
    let _stop_on_return = stop.clone().drop_guard();
    let template = MongoSink::new(config.mongo()).await?;
    let probe = template.probe();
    let pg = db::config(
        &config.postgres.database_url,
        &format!("events-consumer:{name}:group"),
    )?;
    info!(group = %name, member = %me, partitions = count, lease_timeout = ?timeout,
          postgres = %db::describe(&pg), sink = %template.describe(),
          "Joining the consumer group.");
    health.failing(POSTGRES, "not connected yet");

    let Some(mut client) = connect(&pg, &name, count, &health, &stop).await? else {
        return Ok(());
    };
    health.ok(POSTGRES);

    let mut running: BTreeMap<u32, Running> = BTreeMap::new();
    let mut pg_ok_at = Instant::now();
    let mut pg_failing = false;
    // The probe, or any partition's write: a busy MongoDB answers writes while a ping waits.
    let reached: crate::health::Reached = Default::default();
    let probing = spawn_probe(probe, reached.clone(), health.clone(), tick, stop.clone());
    let mut ready_logged: Option<bool> = None;
    let outcome = loop {
        // Whether this member can deliver decides whether it asks for a share. Slow answers are
        // no reason to give partitions up: only failures, with no write succeeding meanwhile.
        let ready = probing.ready(&reached, timeout);
        let answered = probing.answered.load(Ordering::Relaxed);
        if answered && ready_logged != Some(ready) {
            if ready {
                info!(group = %name, member = %me, "MongoDB is reachable: asking for a share of the partitions.");
            } else if ready_logged.is_some() {
                warn!(group = %name, member = %me, lease_timeout = ?timeout,
                      "MongoDB has been unreachable for a lease timeout: giving up this member's \
                       partitions so that other members deliver them.");
            } else {
                warn!(group = %name, member = %me,
                      "MongoDB is not reachable yet: this member takes no partitions until it is.");
            }
            ready_logged = Some(ready);
        }

        let looked = async {
            // The count first: a group repartitioned while this member was away (paused, cut
            // off) must not be read with the old hash.
            match group::partitions_of(&client, &name).await? {
                Some(n) if n == count => {}
                other => {
                    return Err(event_store::Error::Config(format!(
                        "consumer group {name:?} now has {} partitions (it was repartitioned), \
                         this member runs with --partitions {count}: restart it with the new count",
                        other.map_or("no".into(), |n| n.to_string())
                    )))
                }
            }
            group::heartbeat(&client, &name, &me, ready, timeout).await?;
            let owned = group::renew(&client, &name, &me, timeout).await?;
            let members = group::members(&client, &name).await?;
            Ok::<_, event_store::Error>((owned, members))
        };
        // Bounded: a call hanging on a silent network must not outlive the leases unnoticed.
        match bounded(timeout, "the group's heartbeat", looked).await {
            Ok((owned, members)) => {
                pg_ok_at = Instant::now();
                if pg_failing {
                    pg_failing = false;
                    info!(group = %name, "PostgreSQL reachable again.");
                    health.ok(POSTGRES);
                }
                // Partitions taken over while this member was not looking: stop at once.
                for (index, run) in running.iter_mut() {
                    let still = owned.iter().any(|&(p, e)| p == *index && e == run.epoch);
                    if !still && !run.stopping {
                        warn!(group = %name, partition = index,
                              "This member's lease on the partition was taken over (it was paused \
                               or cut off past --lease-timeout); stopping it.");
                        run.stopping = true;
                        run.stop.cancel();
                    }
                }
                let wanted = if ready {
                    group::assignment(&members, &me, count)
                } else {
                    Vec::new()
                };
                for (index, run) in running.iter_mut() {
                    if !run.stopping && !wanted.iter().any(|p| p.index == *index) {
                        info!(group = %name, partition = index,
                              "Handing the partition over to another member.");
                        run.stopping = true;
                        run.stop.cancel();
                    }
                }
                for partition in wanted {
                    if running.contains_key(&partition.index) {
                        continue;
                    }
                    match group::acquire(&client, &name, partition, &me, timeout).await {
                        Ok(Some(epoch)) => {
                            let run = start(
                                &config, &template, partition, epoch, &health, &reached, &stop,
                            );
                            info!(group = %name, partition = partition.index, epoch,
                                  consumer = %partition.name(&name), "Took the partition.");
                            running.insert(partition.index, run);
                        }
                        Ok(None) => {} // its previous owner still holds it; next look
                        Err(e) => {
                            warn!(group = %name, error = %e, "Cannot take a partition yet.");
                            break;
                        }
                    }
                }
            }
            Err(e) if e.decision() == Decision::Never => break Err(e),
            Err(e) => {
                if !pg_failing {
                    pg_failing = true;
                    warn!(group = %name, error = %e,
                          "Cannot reach PostgreSQL for the group's heartbeat; retrying.");
                }
                health.failing(POSTGRES, e.to_string());
                if pg_ok_at.elapsed() >= timeout {
                    for (index, run) in running.iter_mut().filter(|(_, r)| !r.stopping) {
                        warn!(group = %name, partition = index,
                              "No heartbeat for a lease timeout: stopping the partition, which \
                               other members may own by now.");
                        run.stopping = true;
                        run.stop.cancel();
                    }
                }
                if client.is_closed() {
                    if let Ok((fresh, connection)) = db::connect(&pg).await {
                        tokio::spawn(connection);
                        client = fresh;
                    }
                }
            }
        }

        // Partitions that ended: released for the next owner (or the failure reported).
        let fatal = reap(&mut running, &client, &name, &me, timeout).await;
        if let Some(e) = fatal {
            break Err(e);
        }
        if sleep_or_stop(tick, &stop).await {
            break Ok(());
        }
    };

    // Leaving: every partition finishes its batch in flight while the leases are kept alive
    // (the batch may take longer than a lease), and each lease goes as soon as its partition
    // stopped, for the next owner to take at once.
    for run in running.values() {
        run.stop.cancel();
    }
    loop {
        if let Some(e) = reap(&mut running, &client, &name, &me, timeout).await {
            warn!(group = %name, error = %e, "A partition stopped with an error.");
        }
        if running.is_empty() {
            break;
        }
        let _ = bounded(
            timeout,
            "renewing",
            group::renew(&client, &name, &me, timeout),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match bounded(
        timeout,
        "leaving the group",
        group::leave(&client, &name, &me),
    )
    .await
    {
        Ok(()) => {
            info!(group = %name, member = %me, "Left the group; its partitions are free for the others.")
        }
        Err(e) => warn!(group = %name, error = %e,
                        "Cannot leave the group cleanly; its partitions move once their leases expire."),
    }
    outcome
}

/// `work`, failing with [`Error::Timeout`] (retried soon) when it takes longer than `limit`.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = event_store::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(done) => Ok(done?),
        Err(_) => Err(Error::Timeout(format!("{what} (limit: --lease-timeout)"))),
    }
}

/// Collects the partitions whose pipeline ended and releases their leases, for the next owner
/// to take at once. Returns the first error other than a fencing (which only means the partition
/// moved on).
async fn reap(
    running: &mut BTreeMap<u32, Running>,
    client: &Client,
    name: &str,
    me: &str,
    timeout: Duration,
) -> Option<Error> {
    let ended: Vec<u32> = running
        .iter()
        .filter(|(_, r)| r.task.is_finished())
        .map(|(i, _)| *i)
        .collect();
    let mut fatal = None;
    for index in ended {
        let run = running.remove(&index).expect("listed");
        let result = run
            .task
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match result {
            Ok(()) => {}
            Err(Error::Sink(e @ SinkError::Fenced { .. })) => {
                warn!(group = %name, partition = index, error = %e, "Stopped the partition.");
            }
            Err(e) => {
                error!(group = %name, partition = index, error = %e,
                       "The partition's delivery stopped with an error.");
                fatal.get_or_insert(e);
            }
        }
        if let Err(e) = bounded(
            timeout,
            "releasing a partition",
            group::release(client, name, index, me),
        )
        .await
        {
            warn!(group = %name, partition = index, error = %e,
                  "Cannot release the partition; it moves once its lease expires.");
        }
    }
    fatal
}

/// Connects, checks the schema and privileges, and joins the group (creating it, and taking
/// over the consumer of the same name, on the first start). `None`: stopped while waiting.
async fn connect(
    pg: &db::Database,
    name: &str,
    count: u32,
    health: &Arc<Health>,
    stop: &CancellationToken,
) -> Result<Option<Client>> {
    let mut retry = Retry::new(Policy::default());
    loop {
        let joined = async {
            let (mut client, connection) = db::connect(pg).await?;
            tokio::spawn(connection);
            migrations::check(&client, Role::Consumer).await?;
            // A consumer of this name running on its own would write beside the group.
            if !event_store::lease::try_acquire(&client, name).await? {
                let holder = event_store::lease::holder(&client, name).await.ok().flatten();
                return Err(event_store::Error::LeaseHeld(format!(
                    "the lease of consumer {name:?} is held ({}): a consumer of this name runs \
                     without --partitions (stop it; the group takes over its checkpoint), or \
                     another member is joining; waiting",
                    holder.map_or("holder not visible".into(), |h| h.to_string())
                )));
            }
            let joined = group::join(&mut client, name, count).await;
            event_store::lease::release(&client, name).await?;
            let joined = joined?;
            if joined.created {
                match joined.took_over {
                    Some(position) => info!(group = %name, partitions = count, %position,
                        "Created the consumer group; its partitions take over the consumer of the same name."),
                    None => info!(group = %name, partitions = count, "Created the consumer group."),
                }
            }
            Ok::<_, event_store::Error>(client)
        }
        .await;
        match joined {
            Ok(client) => return Ok(Some(client)),
            // As a consumer of its own: what waiting cannot fix ends start-up.
            Err(e) if e.decision() != Decision::Soon => return Err(e.into()),
            Err(e) => {
                let pause = retry.failed("Cannot join the consumer group yet", &e, false);
                health.failing(POSTGRES, e.to_string());
                if sleep_or_stop(pause, stop).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Starts delivering `partition`, owned at `epoch`: claim its checkpoint (fencing off earlier
/// owners), then the consumer's pipeline under the partition's name.
fn start(
    config: &Config,
    template: &MongoSink,
    partition: Partition,
    epoch: i64,
    health: &Arc<Health>,
    reached: &crate::health::Reached,
    stop: &CancellationToken,
) -> Running {
    let reached = reached.clone();
    let group = config.name.clone();
    let mut config = config.clone();
    config.name = partition.name(&group);
    config.partitions = None;
    let sink = template.partition(config.name.clone(), epoch);
    let health = health.clone();
    let stop = stop.child_token();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut retry = Retry::new(Policy::default());
            loop {
                match sink.claim(&group).await {
                    Ok(()) => break,
                    Err(e) if e.decision() == Decision::Never => return Err(e.into()),
                    Err(e) => {
                        let pause =
                            retry.failed("Cannot claim the partition's checkpoint", &e, false);
                        health.failing(MongoSink::KIND, e.to_string());
                        if sleep_or_stop(pause, &stop).await {
                            return Ok(());
                        }
                    }
                }
            }
            crate::pipeline(&config, Some((partition, reached)), sink, health, stop).await
        })
    };
    Running {
        epoch,
        stop,
        task,
        stopping: false,
    }
}
