//! `eventsctl` and consumer groups, against real servers and in-process group members: `status`
//! shows members and partitions, `lag` a group's partitions, `reset` and `group repartition`
//! refuse while members run and otherwise move every partition; after a repartition the group
//! runs with the new count and delivers everything once.

mod common;

use std::time::Duration;

use common::{assert_exit, json, produce, setup, spawn, stderr, stdout, wait_until, Env};
use mongodb::bson::doc;

const GROUP: &str = "orders";

fn member(env: &Env, partitions: u32) -> consumer::Config {
    let mut config = env.consumer_config(GROUP);
    config.partitions = Some(partitions);
    config.lease_timeout = Duration::from_secs(2);
    config
}

async fn wait_all_delivered(env: &Env) {
    let expected = env.pg_ids().await;
    wait_until(
        "every event is delivered",
        Duration::from_secs(60),
        || async { env.mongo_ids().await == expected },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_lag_reset_and_repartition_act_per_group() {
    let env = setup(true).await;
    produce(&env.admin, "orders", 500).await;
    let a = spawn(member(&env, 4));
    let b = spawn(member(&env, 4));
    wait_all_delivered(&env).await;
    wait_until(
        "both members own partitions",
        Duration::from_secs(20),
        || async {
            let out = env.keeper(&["status", "--json"]).await;
            let members = &json(&out)["groups"][0]["members"];
            members.as_array().is_some_and(|m| {
                m.len() == 2
                    && m.iter()
                        .all(|m| !m["partitions"].as_array().unwrap().is_empty())
            })
        },
    )
    .await;
    let out = env.keeper(&["status"]).await;
    assert_exit(&out, 0, "status");
    let text = stdout(&out);
    assert!(
        text.contains("Consumer group orders (4 partitions, 2 running members"),
        "{text}"
    );
    wait_until(
        "every partition published a position",
        Duration::from_secs(20),
        || async {
            let out = env.keeper(&["lag", GROUP, "--json"]).await;
            stdout(&out).matches("orders.p0").count() == 4
        },
    )
    .await;

    // While members run, a reset or a repartition of the group is refused.
    let out = env
        .ctl(&["reset", GROUP, "--to", "earliest", "--yes"])
        .await;
    assert_exit(&out, 3, "reset of a running group");
    assert!(stderr(&out).contains("running member"), "{}", stderr(&out));
    let out = env
        .ctl(&["group", "repartition", GROUP, "--partitions", "8", "--yes"])
        .await;
    assert_exit(&out, 3, "repartition of a running group");
    a.stop().await;
    b.stop().await;

    // Stopped: reset moves every partition back to the start.
    let out = env
        .ctl(&["reset", GROUP, "--to", "earliest", "--yes"])
        .await;
    assert_exit(&out, 0, "reset of a stopped group");
    for p in 0..4 {
        let cp = env.checkpoint(&format!("orders.p0{p}")).await.unwrap();
        assert_eq!(cp.get_i64("id").unwrap(), 0, "partition {p} moved back");
    }

    // The plan changes nothing; --yes changes the count, and the group runs with it.
    let out = env
        .ctl(&["group", "repartition", GROUP, "--partitions", "8"])
        .await;
    assert_exit(&out, 0, "repartition plan");
    assert!(
        stdout(&out).contains("4 → 8 partitions"),
        "{}",
        stdout(&out)
    );
    assert_eq!(env.pg.psql("SELECT partitions FROM consumer_groups"), "4");
    let out = env
        .ctl(&["group", "repartition", GROUP, "--partitions", "8", "--yes"])
        .await;
    assert_exit(&out, 0, "repartition");
    assert_eq!(env.pg.psql("SELECT partitions FROM consumer_groups"), "8");
    assert!(env.checkpoint("orders.p07").await.is_some());
    assert!(env.checkpoint("orders.p03").await.is_some());
    produce(&env.admin, "orders", 300).await;
    let c = spawn(member(&env, 8));
    wait_all_delivered(&env).await;
    let stored = env
        .mongo_db()
        .await
        .collection::<mongodb::bson::Document>("receivedEvents")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 800, "re-delivery stored nothing twice");
    c.stop().await;
    assert_eq!(
        env.pg
            .psql("SELECT count(*) FROM consumer_positions WHERE consumer LIKE 'orders.p%'"),
        "8"
    );
}

/// A consumer login may touch only the groups, and delete only the position rows, its own login
/// created: not another login's, and not the ownerless rows from before V4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_login_cannot_touch_a_group_or_delete_positions_it_does_not_own() {
    let env = setup(true).await;
    produce(&env.admin, "orders", 50).await;
    let a = spawn(member(&env, 2));
    wait_all_delivered(&env).await;
    a.stop().await;
    env.pg.psql("INSERT INTO consumer_positions (consumer, tx_id, id, owner) VALUES ('legacy', '1', 1, NULL)");
    let other = common::connect(&env.pg.url_for("ops2", None)).await;
    for sql in [
        "DELETE FROM consumer_groups",
        "UPDATE consumer_groups SET partitions = 9",
        "UPDATE consumer_group_partitions SET epoch = 0, member = 'x'",
        "DELETE FROM consumer_group_partitions",
        "DELETE FROM consumer_positions",
    ] {
        let changed = other.execute(sql, &[]).await.unwrap_or(0);
        assert_eq!(changed, 0, "{sql} changed rows as another login");
    }
    assert_eq!(env.pg.psql("SELECT partitions FROM consumer_groups"), "2");
    assert_eq!(
        env.pg.psql("SELECT count(*) FROM consumer_positions"),
        "3",
        "both partitions' rows and the ownerless one stay"
    );
    // The owning login may delete its own rows (the group's first start does), never the
    // ownerless one.
    let own = common::connect(&env.pg.url_for("ops", None)).await;
    assert_eq!(
        own.execute(
            "DELETE FROM consumer_positions WHERE consumer = 'legacy'",
            &[]
        )
        .await
        .unwrap(),
        0
    );
}
