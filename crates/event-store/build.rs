//! Rebuilds this crate when a migration is added or changed: `refinery::embed_migrations!` reads
//! `migrations/` at compile time, but cargo only knows about files it is told of, so without this
//! a new migration would be missing from an incremental build (tests would run the old schema).

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
