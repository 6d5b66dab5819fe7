//! Test support (feature `testing`): a throwaway events database, migrated, with a login per job.
//!
//! Every integration test and benchmark of the workspace starts the same way — a real PostgreSQL
//! from [`testbed`], the embedded migrations applied as the superuser, and least-privilege logins
//! in this database's group roles — so that set-up lives here, once, and a change to the roles or
//! the schema is made in one place. Nothing is mocked: the logins hold exactly what the services'
//! logins hold in production.

use testbed::Postgres;
use tokio_postgres::Client;

use crate::db;
use crate::migrations::{self, Role};

/// A migrated events database on its own PostgreSQL server.
pub struct TestDatabase {
    pub pg: Postgres,
    /// A superuser connection (independent checks, set-up that needs the owner).
    pub admin: Client,
}

impl TestDatabase {
    /// Starts PostgreSQL, migrates it and creates `logins` (name, job) in the group roles.
    pub async fn start(logins: &[(&str, Role)]) -> TestDatabase {
        TestDatabase::on(Postgres::start(), logins).await
    }

    /// [`TestDatabase::start`] on a server of the caller's making (TLS, other settings).
    pub async fn on(pg: Postgres, logins: &[(&str, Role)]) -> TestDatabase {
        let mut admin = connect(&pg.url()).await;
        migrations::run(&mut admin)
            .await
            .expect("migrate the test database");
        let db = TestDatabase { pg, admin };
        for (name, role) in logins {
            db.add_login(name, *role).await;
        }
        db
    }

    /// Creates login `name` (no password: the test cluster trusts loopback) in `role`'s group.
    pub async fn add_login(&self, name: &str, role: Role) {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "test login names are plain identifiers"
        );
        let group = migrations::group_role(&self.admin, role)
            .await
            .expect("look up the group role");
        self.admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN IN ROLE \"{group}\""))
            .await
            .expect("create the login");
    }

    /// The connection string of login `user`.
    pub fn url_for(&self, user: &str) -> String {
        self.pg.url_for(user, None)
    }
}

/// A connection driven by a spawned task.
pub async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "pgevents-test").expect("a valid test URL"))
        .await
        .expect("connect to the test PostgreSQL")
}
