//! Scratch PostgreSQL databases for tests: each test gets a database of its
//! own on the server named by `MODELPRESS_TEST_POSTGRES_URL`, dropped when
//! the test ends, passed or failed.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

/// The variable naming the PostgreSQL server of the tests, as a URL of a
/// database that exists there (`postgres://postgres@127.0.0.1:5432/postgres`).
pub const POSTGRES_URL_VAR: &str = "MODELPRESS_TEST_POSTGRES_URL";

/// The server URL of the tests, if set; when not, says that `what` is
/// skipped (so a run without a server shows what it did not check).
pub fn postgres_url_or_skip(what: &str) -> Option<String> {
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            say_skipped(&format!(
                "{what} (set {POSTGRES_URL_VAR} to a PostgreSQL server to run it)"
            ));
            None
        }
    }
}

/// Prints `skipped: {what}` past the test harness's capture of output,
/// which would hide it for a test that passes.
pub fn say_skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {what}");
}

/// A database created for one test and dropped, with whatever connections
/// it still has, when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `mp_<random>` on the server of `admin_url` (any database
    /// there that the user can connect to).
    pub async fn create(admin_url: &str) -> TestDatabase {
        let name = format!("mp_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect(admin_url).await;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
        let _ = admin.close().await;
        let url = with_database(admin_url, &name);
        TestDatabase {
            admin_url: admin_url.to_string(),
            name,
            url,
        }
    }

    /// Its URL, for `--database-url` or [`crate::store::Store::open`].
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    /// Drops the database on a thread with its own runtime: `drop` may run
    /// inside an async test, whose runtime cannot be blocked on.
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the drop");
            runtime.block_on(async {
                let mut admin = connect(&admin_url).await;
                // FORCE ends the connections a server under test left open.
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .map(|_| ())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "could not drop the test database {}: {dropped:?}",
                self.name
            );
        }
    }
}

async fn connect(url: &str) -> PgConnection {
    PgConnectOptions::from_str(url)
        .map(|o| o.disable_statement_logging())
        .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR} is not a PostgreSQL URL: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server ({POSTGRES_URL_VAR}): {e}"))
}

/// `url` with its database (the path) replaced by `name`; its query, if
/// any, kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_of_a_url_is_replaced_and_its_options_kept() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "mp_1"),
            "postgres://postgres@127.0.0.1:5432/mp_1"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "mp_2"),
            "postgresql://u:p@h/mp_2?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
