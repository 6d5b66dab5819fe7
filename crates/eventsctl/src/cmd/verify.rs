//! `eventsctl capture verify`: does a MongoDB mirror (`consumer --mirror`) equal its table?
//!
//! Both sides are brought to the mirror's form and compared document by document: each table row
//! becomes `{_id: <key>, <captured columns>}` with the change log's value mapping
//! (`mongo_format::event`), exactly as the consumer builds a mirror document from a captured
//! event; each side's document is hashed (SHA-256 of its BSON with the fields in name order) and
//! the hashes compared by `_id`. Counts are compared too. Run it when the consumer has caught up
//! (writes in flight show up as differences until they are delivered).
//!
//! Values are serialised with `to_jsonb`, as capture serialises built-in types; a column of a type
//! a non-superuser owns (captured as its text output) may show as different.

use std::collections::BTreeMap;

use anyhow::Context;
use event_store::capture::{self, quote_ident};
use event_store::db;
use mongo_format::event::json_text_to_bson;
use mongodb::bson::{doc, Bson, Document};
use sha2::{Digest, Sha256};

use crate::cli::Cli;
use crate::cmd::capture::coded;
use crate::connect;
use crate::exit::{self, Code};

/// Compare a captured table with its MongoDB mirror (consumer --mirror): counts, and every row
/// (or a random sample) by key with a hash of its values. Exit 0 when equal, 1 when they differ
/// (what differs is printed).
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl capture verify orders --collection orders
  eventsctl capture verify 'sales.\"Order Items\"' --collection items --sample 1000

Needs DATABASE_URL (a login that may read the table) and MONGODB_URI (--mongodb-database names
the consumer's database). Run it when the consumer has caught up.")]
pub struct VerifyArgs {
    /// The captured table, as in SQL: orders, sales.orders, '"Order Items"'
    #[arg(value_name = "TABLE")]
    pub table: String,

    /// The mirror collection (consumer --mirror TOPIC=COLLECTION)
    #[arg(long = "collection", value_name = "NAME")]
    pub collection: String,

    /// Compare only this many rows, picked at random (counts are always compared)
    #[arg(long = "sample", value_name = "N")]
    pub sample: Option<u32>,
}

/// Differences printed at most.
const SHOWN: usize = 20;

pub async fn run(cli: &Cli, args: &VerifyArgs) -> anyhow::Result<Code> {
    let config = db::config(&cli.postgres.database_url, "eventsctl-verify")?;
    let client = db::connect_spawned(&config).await?;
    let mongo = connect::mongo_required(cli, "capture verify").await?;

    let named = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = to_regclass($1::text)",
            &[&args.table],
        )
        .await
        .context("look the table up")?
        .ok_or_else(|| exit::usage(format!("table {:?} does not exist", args.table)))?;
    let (schema, table): (String, String) = (named.get(0), named.get(1));
    let captured = capture::list(&client)
        .await
        .map_err(coded)?
        .into_iter()
        .find(|c| c.schema == schema && c.table == table)
        .ok_or_else(|| {
            exit::usage(format!(
                "{} is not captured: a mirror follows a captured table's events",
                args.table
            ))
        })?;
    let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));

    // The rows as JSON with the excluded columns left out; the identifiers are quoted by
    // PostgreSQL (format('%I')), the names travel as parameters.
    let sql: String = client
        .query_one(
            "SELECT format('SELECT (to_jsonb(t) - $1::text[])::text FROM %I.%I t %s', $1::text, $2::text,
                           CASE WHEN $3::int8 IS NULL THEN '' ELSE 'ORDER BY random() LIMIT ' || $3::int8 END)",
            &[&schema, &table, &args.sample.map(i64::from)],
        )
        .await?
        .get(0);
    let rows = client
        .query(sql.as_str(), &[&captured.exclude_columns])
        .await
        .with_context(|| format!("read {qualified}"))?;
    let count_sql: String = client
        .query_one(
            "SELECT format('SELECT count(*) FROM %I.%I', $1::text, $2::text)",
            &[&schema, &table],
        )
        .await?
        .get(0);
    let table_count: i64 = client.query_one(count_sql.as_str(), &[]).await?.get(0);

    let mut expected: BTreeMap<Vec<u8>, (Bson, String)> = BTreeMap::new();
    for row in &rows {
        let text: &str = row.get(0);
        let doc = mirror_document(text, &captured.key_columns)
            .map_err(|e| anyhow::anyhow!("a row of {qualified} cannot be mirrored: {e}"))?;
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        expected.insert(id_bytes(&id), (id, hash(&doc)));
    }

    let collection = mongo.collection::<Document>(&args.collection);
    let mirror_count = collection
        .count_documents(doc! {})
        .await
        .context("count the mirror's documents")?;
    let mut found: BTreeMap<Vec<u8>, (Bson, String)> = BTreeMap::new();
    let filter = if args.sample.is_some() {
        let ids: Vec<Bson> = expected.values().map(|(id, _)| id.clone()).collect();
        doc! {"_id": {"$in": ids}}
    } else {
        doc! {}
    };
    let mut cursor = collection.find(filter).await.context("read the mirror")?;
    while cursor.advance().await.context("read the mirror")? {
        let doc: Document = cursor.deserialize_current()?;
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        found.insert(id_bytes(&id), (id, hash(&doc)));
    }

    let mut differences = Vec::new();
    if table_count != mirror_count as i64 {
        differences.push(format!(
            "counts differ: {table_count} rows in {qualified}, {mirror_count} documents in {}",
            args.collection
        ));
    }
    for (key, (id, want)) in &expected {
        match found.get(key) {
            None => differences.push(format!("missing in the mirror: _id {id}")),
            Some((_, have)) if have != want => differences.push(format!(
                "different values: _id {id} (table {}…, mirror {}…)",
                &want[..12],
                &have[..12]
            )),
            Some(_) => {}
        }
    }
    for (key, (id, _)) in &found {
        if !expected.contains_key(key) {
            differences.push(format!("not in the table: _id {id}"));
        }
    }

    let compared = if args.sample.is_some() {
        format!("a sample of {} rows", expected.len())
    } else {
        format!("all {} rows", expected.len())
    };
    if differences.is_empty() {
        println!(
            "{qualified} and {} are equal: {table_count} rows, {compared} compared",
            args.collection
        );
        return Ok(Code::Ok);
    }
    println!(
        "{qualified} and {} differ ({} differences; {compared} compared):",
        args.collection,
        differences.len()
    );
    for d in differences.iter().take(SHOWN) {
        println!("  {d}");
    }
    if differences.len() > SHOWN {
        println!("  … and {} more", differences.len() - SHOWN);
    }
    Ok(Code::OverThreshold)
}

/// A row's JSON text as the mirror holds it: `_id` (the key's value, or the key columns as a
/// document in key order) first, then the columns (a column called `_id` gives way to the key).
fn mirror_document(row_json: &str, key_columns: &[String]) -> Result<Document, String> {
    let Bson::Document(row) = json_text_to_bson(row_json, 1).map_err(|p| p.to_string())? else {
        return Err("not a JSON object".into());
    };
    let id = match key_columns {
        [one] => row.get(one).cloned().unwrap_or(Bson::Null),
        many => Bson::Document(
            many.iter()
                .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Bson::Null)))
                .collect(),
        ),
    };
    let mut doc = doc! {"_id": id};
    for (column, value) in row {
        if column != "_id" {
            doc.insert(column, value);
        }
    }
    Ok(doc)
}

/// SHA-256 (hex) of the document's BSON with its top-level fields in name order (nested values
/// keep their order: both sides take it from the same jsonb text).
fn hash(doc: &Document) -> String {
    let sorted: BTreeMap<&String, &Bson> = doc.iter().collect();
    let canonical: Document = sorted
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut bytes = Vec::new();
    canonical
        .to_writer(&mut bytes)
        .expect("a document always serialises");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A map key for an `_id` (BSON values have no order of their own).
fn id_bytes(id: &Bson) -> Vec<u8> {
    let mut bytes = Vec::new();
    doc! {"k": id.clone()}
        .to_writer(&mut bytes)
        .expect("a document always serialises");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_mirror_documents_and_hash_regardless_of_field_order() {
        let one = mirror_document(r#"{"id": 7, "n": 1.5, "_id": "x"}"#, &["id".into()]).unwrap();
        assert_eq!(one, doc! {"_id": 7, "id": 7, "n": 1.5});
        let two = mirror_document(r#"{"b": "x", "a": 1}"#, &["b".into(), "a".into()]).unwrap();
        assert_eq!(two.get_document("_id").unwrap(), &doc! {"b": "x", "a": 1});
        assert_eq!(
            hash(&doc! {"_id": 1, "a": 2, "b": 3}),
            hash(&doc! {"b": 3, "_id": 1, "a": 2})
        );
        assert_ne!(
            hash(&doc! {"_id": 1, "a": 2}),
            hash(&doc! {"_id": 1, "a": 3})
        );
        assert_ne!(
            hash(&doc! {"_id": 1, "a": 2}),
            hash(&doc! {"_id": 1, "a": 2_i64}),
            "Int32 and Int64 are different values in MongoDB"
        );
    }
}
