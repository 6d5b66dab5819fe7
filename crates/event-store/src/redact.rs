//! Keeping passwords out of logs and error messages.
//!
//! Nothing here prints a connection string: a connection is described by what the parser that
//! makes the connection read from it (`host:port/dbname as user`, [`crate::db::describe`]), and any
//! text that might quote a connection string (a driver's parse error) is passed through [`scrub`],
//! which replaces everything that could be its password with `***`.
//!
//! "Could be": a connection string that does not parse the way its author meant (an unencoded
//! `@`, `?` or `#` in a password) has no single password, so [`secrets`] collects every reading —
//! the user-info up to the first `@` (tokio-postgres) and up to the last (MongoDB), each `password`
//! / `sslpassword` parameter (names and values percent-decoded) in URL and key=value form, raw and
//! percent-decoded, and their pieces between URL delimiters.

/// Parameter names whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

/// Pieces shorter than this are left alone: replacing every `a` of a message helps nobody.
const MIN_PIECE: usize = 3;

/// Every string in `url` that may be a password, longest first.
pub fn secrets(url: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut add = |text: &str| {
        for candidate in [text.to_string(), crate::tls::percent_decode(text)] {
            if candidate.chars().count() >= MIN_PIECE {
                found.push(candidate.clone());
            }
            for piece in candidate.split(|c: char| ":/?#@&=,;[] ".contains(c)) {
                if piece.chars().count() >= MIN_PIECE {
                    found.push(piece.to_string());
                }
            }
        }
    };
    if let Some((_, rest)) = url.split_once("://") {
        // The user-info, read both ways: up to the first `@` and up to the last.
        for end in [rest.find('@'), rest.rfind('@')].into_iter().flatten() {
            if let Some((_, password)) = rest[..end].split_once(':') {
                add(password);
            }
        }
        // Parameters, wherever a `?` starts them.
        for (at, _) in rest.match_indices('?') {
            for pair in rest[at + 1..].split(['&', '?']) {
                if let Some((key, value)) = pair.split_once('=') {
                    if SECRET_KEYS.contains(
                        &crate::tls::percent_decode(key)
                            .to_ascii_lowercase()
                            .as_str(),
                    ) {
                        add(value);
                    }
                }
            }
        }
    } else {
        for (start, end, key, value) in crate::tls::key_value_pairs(url) {
            if SECRET_KEYS.contains(&key.to_ascii_lowercase().as_str()) {
                add(&value);
                if let Some((_, raw)) = url[start..end].split_once('=') {
                    add(raw.trim());
                }
            }
        }
    }
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found.dedup();
    found
}

/// `text` with every string that may be a password of `url` ([`secrets`]) replaced by `***`.
pub fn scrub(text: &str, url: &str) -> String {
    scrub_all(text, &secrets(url))
}

/// `text` with each of `secrets` replaced by `***` (longest first).
pub fn scrub_all(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        if !secret.is_empty() && out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

/// Where a PostgreSQL connection string points, fit to print: `host:port/dbname as user` as the
/// connection reads it, or a note that it does not parse. Never the password.
pub fn postgres(url: &str) -> String {
    match crate::tls::split(url)
        .rest
        .parse::<tokio_postgres::Config>()
    {
        Ok(config) => scrub(&crate::db::describe(&config), url),
        Err(_) => "an unparseable connection string".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passwords with `/ ? @ # % +`, percent-encoded or not, in the user-info, in a `password`
    /// parameter (its name encoded too) and in key=value form: neither the text as written nor
    /// its decoded form survives, and what remains still says where the connection goes.
    #[test]
    fn no_form_of_a_password_survives() {
        for (url, written, decoded) in [
            (
                "postgres://prod:Zm9v/YmFy+PgSecret6=@127.0.0.1:5432/db",
                "Zm9v/YmFy+PgSecret6=",
                "Zm9v/YmFy+PgSecret6=",
            ),
            (
                "postgres://prod:s3?cr#t/p%40ss%25w+rd@db.example:5433/events?sslmode=disable",
                "s3?cr#t/p%40ss%25w+rd",
                "s3?cr#t/p@ss%w+rd",
            ),
            (
                "postgresql://prod@db.example/events?pass%77ord=qp%2Fs3cr%3Ft%40x",
                "qp%2Fs3cr%3Ft%40x",
                "qp/s3cr?t@x",
            ),
            (
                "postgres://db.example/events?user=prod&password=plain-s3cret",
                "plain-s3cret",
                "plain-s3cret",
            ),
            (
                "host=db.example user=prod password='kv s3cr/t?@#%+' dbname=events",
                "'kv s3cr/t?@#%+'",
                "kv s3cr/t?@#%+",
            ),
            (
                "host=db.example user=prod password=bare/s3?cr@t dbname=events",
                "bare/s3?cr@t",
                "bare/s3?cr@t",
            ),
        ] {
            let shown = postgres(url);
            assert!(!shown.contains(written), "{url} -> {shown}");
            assert!(!shown.contains(decoded), "{url} -> {shown}");
            assert!(shown.contains("prod"), "{url} -> {shown}");
            assert!(
                shown.contains("db") || shown.contains("127.0.0.1"),
                "{shown}"
            );
        }
        assert_eq!(
            postgres("postgres://app@db:5432/events"),
            "db:5432/events as app"
        );
        assert_eq!(
            postgres("postgres://app:x@db:notaport/events"),
            "an unparseable connection string"
        );
    }

    /// A driver's message quoting a misread URL (an unencoded `?` cuts the user-info short, so
    /// the "host" is `user:pa…`) loses every piece of the password.
    #[test]
    fn driver_messages_lose_every_piece_of_the_password() {
        let uri = "mongodb://consumer:hunter?two@mongo:27017/";
        let message =
            "invalid server address consumer:hunter: the port must be an integer, got hunter";
        let scrubbed = scrub(message, uri);
        assert!(!scrubbed.contains("hunter"), "{scrubbed}");
        assert!(scrubbed.contains("consumer"), "{scrubbed}");
        let uri = "mongodb://consumer:p%40ss%2Fw0rd@m1,m2/?replicaSet=rs0";
        assert_eq!(
            scrub("failed for p@ss/w0rd and p%40ss%2Fw0rd", uri),
            "failed for *** and ***"
        );
    }
}
