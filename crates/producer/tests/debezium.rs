//! The README's Debezium section ("Kafka: Debezium's outbox event router") promises that its SQL
//! and connector settings fit the `events` table. This runs that SQL on a cluster with
//! `wal_level = logical`, checks every column, role and publication the settings name, and reads
//! appended events through the slot with `pgoutput`, as Debezium would.

use std::collections::HashSet;

use event_store::{db, migrations, NewEvent, Topic};
use producer::{Channel, Producer};
use serde_json::{json, Value};
use testbed::Postgres;

/// The section's ```sql and ```json blocks, in that order.
fn readme_section() -> (String, Value) {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("### Kafka: Debezium's outbox event router")
        .expect("the README has the Debezium section");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n## ").map_or(section.len(), |e| e + 4)];
    let block = |lang: &str| {
        let open = format!("```{lang}\n");
        let at = section
            .find(&open)
            .unwrap_or_else(|| panic!("a ```{lang} block"))
            + open.len();
        section[at..at + section[at..].find("```").unwrap()].to_string()
    };
    let settings = serde_json::from_str(&block("json")).expect("the settings are valid JSON");
    (block("sql"), settings)
}

fn setting<'a>(settings: &'a Value, name: &str) -> &'a str {
    settings[name]
        .as_str()
        .unwrap_or_else(|| panic!("the settings name {name}"))
}

#[tokio::test]
async fn the_readme_settings_name_what_exists_and_the_slot_delivers_appended_events() {
    let (sql, settings) = readme_section();
    let pg = Postgres::start_with(&["wal_level=logical", "max_replication_slots=4"]);
    let mut owner = db::connect_spawned(&db::config(&pg.url(), "test").unwrap())
        .await
        .unwrap();
    migrations::run(&mut owner).await.unwrap();
    owner
        .batch_execute(&sql)
        .await
        .expect("the README's SQL runs");

    // The role and the publication, as the settings name them.
    let user = setting(&settings, "database.user");
    let row = owner
        .query_one(
            "SELECT rolcanlogin, rolreplication, rolsuper, \
                    has_table_privilege(rolname, 'events', 'SELECT'), \
                    has_table_privilege(rolname, 'events', 'INSERT') \
               FROM pg_roles WHERE rolname = $1",
            &[&user],
        )
        .await
        .expect("the role exists");
    let rights: (bool, bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        rights,
        (true, true, false, true, false),
        "login, replication, no superuser, SELECT on events and nothing more"
    );
    let publication = setting(&settings, "publication.name");
    let row = owner
        .query_one(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, \
                    (SELECT array_agg(schemaname || '.' || tablename) FROM pg_publication_tables t \
                      WHERE t.pubname = p.pubname) \
               FROM pg_publication p WHERE pubname = $1",
            &[&publication],
        )
        .await
        .expect("the publication exists");
    let ops: (bool, bool, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        ops,
        (true, false, false, false),
        "inserts only: the purger's deletes are not events"
    );
    let tables: Vec<String> = row.get(4);
    assert_eq!(
        tables,
        vec![setting(&settings, "table.include.list").to_string()],
        "the publication holds exactly the table the connector includes"
    );
    assert_eq!(
        setting(&settings, "publication.autocreate.mode"),
        "disabled",
        "the connector's role cannot create publications, so it must not try"
    );

    // Every column the router reads exists with the type it expects.
    let columns: HashSet<(String, String)> = owner
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
              WHERE table_schema || '.' || table_name = $1",
            &[&setting(&settings, "table.include.list")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let has = |name: &str, ty: &str| columns.contains(&(name.to_string(), ty.to_string()));
    let router = |option: &str| setting(&settings, &format!("transforms.outbox.{option}"));
    assert!(has(router("table.field.event.id"), "uuid"), "{columns:?}");
    assert!(has(router("table.field.event.key"), "text"));
    assert!(has(router("table.field.event.payload"), "jsonb"));
    assert!(has(router("route.by.field"), "text"));
    for placement in router("table.fields.additional.placement").split(',') {
        let column = placement.split(':').next().unwrap();
        assert!(
            columns.iter().any(|(c, _)| c == column),
            "additional placement of a missing column {column}"
        );
    }

    // The connector's login creates its slot and reads appended events through the publication.
    let slot = setting(&settings, "slot.name");
    let debezium = db::connect_spawned(&db::config(&pg.url_for(user, None), "debezium").unwrap())
        .await
        .unwrap();
    debezium
        .execute(
            "SELECT pg_create_logical_replication_slot($1, $2)",
            &[&slot, &setting(&settings, "plugin.name")],
        )
        .await
        .expect("the replication role creates its slot");
    let producer = Producer::in_transaction(Channel::default());
    let tx = owner.transaction().await.unwrap();
    let appended = producer
        .append_in(
            &tx,
            &NewEvent::new(Topic::new("orders").unwrap(), json!({"n": 1})).with_key("o-1"),
        )
        .await
        .unwrap();
    let event_id = appended.receipts().event_id.to_string();
    tx.commit().await.unwrap();
    appended.committed();
    owner.execute("DELETE FROM events", &[]).await.unwrap();

    let messages: Vec<Vec<u8>> = debezium
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                 'proto_version', '1', 'publication_names', $2)",
            &[&slot, &publication],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let kinds: Vec<u8> = messages.iter().map(|m| m[0]).collect();
    assert!(
        kinds.contains(&b'I'),
        "the append arrives as an insert: {kinds:?}"
    );
    assert!(
        !kinds.contains(&b'D'),
        "the delete is not published: {kinds:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m[0] == b'I' && m.windows(event_id.len()).any(|w| w == event_id.as_bytes())),
        "the insert carries the event's id"
    );
}
