//! Who may read which topics: access tokens from a file, one per line `TOKEN TOPIC[,TOPIC...]`.
//!
//! A request carries its token as `Authorization: Bearer TOKEN` or, because browsers' EventSource
//! cannot set headers, as `?access_token=TOKEN` (which is why request logs redact that parameter,
//! see [`redact_query`]). No token, or an unknown one, is 401; a known token asking for a topic it
//! was not given is 403. Tokens are compared in constant time, so response timing does not leak
//! how much of a guess was right.

use std::path::Path;

use event_store::event::Topic;

use crate::error::{Error, Result};

/// The shortest token accepted from the file: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// What one token may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Every topic (`*`).
    All,
    Topics(Vec<String>),
}

impl Grant {
    pub fn allows(&self, topic: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Topics(topics) => topics.iter().any(|t| t == topic),
        }
    }
}

/// A token that passed: its grant, and a stable label for per-token limits and logs that is not
/// the secret itself (its line in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub label: String,
    pub grant: Grant,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or not one we know.
    Unauthenticated,
    /// 403: the token does not cover this topic.
    Forbidden { topic: String },
}

/// The token table.
#[derive(Debug, Clone)]
pub enum Tokens {
    /// `--open`: everyone reads everything.
    Open,
    File(Vec<(String, Principal)>),
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Tokens(format!(
                "cannot read the tokens file {} ({e}); set --tokens-file / GATEWAY_TOKENS_FILE",
                path.display()
            ))
        })?;
        Tokens::parse(&text).map_err(|e| Error::Tokens(format!("{}: {e}", path.display())))
    }

    /// Parses the file's text. Errors name the line, never the token on it.
    pub fn parse(text: &str) -> std::result::Result<Tokens, String> {
        let mut entries: Vec<(String, Principal)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(topics), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "line {number}: expected `TOKEN TOPIC[,TOPIC...]` (two fields)"
                ));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {number}: the token is shorter than {MIN_TOKEN_LEN} characters; use a \
                     random one, e.g. `openssl rand -hex 24`"
                ));
            }
            let grant = if topics == "*" {
                Grant::All
            } else {
                let mut list = Vec::new();
                for topic in topics.split(',') {
                    Topic::new(topic).map_err(|e| format!("line {number}: {e}"))?;
                    list.push(topic.to_string());
                }
                Grant::Topics(list)
            };
            if entries.iter().any(|(t, _)| t == token) {
                return Err(format!("line {number}: the same token is listed twice"));
            }
            entries.push((
                token.to_string(),
                Principal {
                    label: format!("line-{number}"),
                    grant,
                },
            ));
        }
        Ok(Tokens::File(entries))
    }

    /// Who `token` is, if anyone. Walks every entry whatever matches (constant time per entry).
    pub fn authenticate(&self, token: Option<&str>) -> std::result::Result<Principal, Denied> {
        let entries = match self {
            Tokens::Open => {
                return Ok(Principal {
                    label: "open".into(),
                    grant: Grant::All,
                })
            }
            Tokens::File(entries) => entries,
        };
        let token = token.ok_or(Denied::Unauthenticated)?;
        let mut found = None;
        for (known, principal) in entries {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(Denied::Unauthenticated)
    }

    /// `authenticate`, then every topic must be granted. `topics` empty = every topic.
    pub fn authorize(
        &self,
        token: Option<&str>,
        topics: &[String],
    ) -> std::result::Result<Principal, Denied> {
        let principal = self.authenticate(token)?;
        if topics.is_empty() && principal.grant != Grant::All {
            return Err(Denied::Forbidden { topic: "*".into() });
        }
        if let Some(topic) = topics.iter().find(|t| !principal.grant.allows(t)) {
            return Err(Denied::Forbidden {
                topic: topic.clone(),
            });
        }
        Ok(principal)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of a request: the `Authorization: Bearer` header wins over `?access_token=`.
pub fn token_from<'a>(
    authorization: Option<&'a str>,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    authorization
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .or(query_token.filter(|t| !t.is_empty()))
}

/// A query string fit for logs: the value of every `access_token` parameter replaced by
/// `REDACTED`. Names are compared as the handlers read them, after form decoding (`%5F` is `_`,
/// `+` a space), so `?access%5Ftoken=…` is redacted too.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if form_decode(name).eq_ignore_ascii_case("access_token") && !value.is_empty() {
                format!("{name}=REDACTED")
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `application/x-www-form-urlencoded` decoding, as the query extractor does it.
fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbb";

    fn tokens() -> Tokens {
        Tokens::parse(&format!("# comment\n\n{A} courses,policies\n  {B}   *  \n")).unwrap()
    }

    #[test]
    fn tokens_grant_their_topics_only() {
        let t = tokens();
        assert_eq!(
            t.authorize(Some(A), &["courses".into()]).unwrap().label,
            "line-3"
        );
        assert_eq!(
            t.authorize(Some(A), &["secret".into()]),
            Err(Denied::Forbidden {
                topic: "secret".into()
            })
        );
        assert!(matches!(
            t.authorize(Some(A), &[]),
            Err(Denied::Forbidden { .. })
        ));
        assert!(t.authorize(Some(B), &["anything".into()]).is_ok());
        assert!(t.authorize(Some(B), &[]).is_ok());
        assert_eq!(t.authorize(None, &[]), Err(Denied::Unauthenticated));
        assert_eq!(
            t.authorize(Some("aaaaaaaaaaaaaaaaaaab"), &["courses".into()]),
            Err(Denied::Unauthenticated)
        );
    }

    #[test]
    fn bad_files_name_the_line_but_never_the_token() {
        for (text, needle) in [
            ("tooshort courses", "line 1: the token is shorter"),
            (&format!("{A}\n") as &str, "line 1: expected"),
            (&format!("\n{A} a b"), "line 2: expected"),
            (&format!("{A} bad/topic"), "line 1: bad topic"),
            (&format!("{A} a\n{A} b"), "line 2: the same token"),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains(A), "{err}");
        }
    }

    #[test]
    fn bearer_header_wins_and_query_tokens_are_redacted() {
        assert_eq!(token_from(Some("Bearer xyz"), Some("q")), Some("xyz"));
        assert_eq!(token_from(Some("bearer  xyz "), None), Some("xyz"));
        assert_eq!(token_from(Some("Basic abc"), Some("q")), Some("q"));
        assert_eq!(token_from(None, Some("")), None);
        assert_eq!(
            redact_query("from=earliest&access_token=s3cret&key=k&ACCESS_TOKEN=x"),
            "from=earliest&access_token=REDACTED&key=k&ACCESS_TOKEN=REDACTED"
        );
        // The handlers decode names: so must the redaction.
        assert_eq!(
            redact_query("access%5Ftoken=s3cret&access%5ftoken=t&%61ccess_token=u&access_token%3D=v"),
            "access%5Ftoken=REDACTED&access%5ftoken=REDACTED&%61ccess_token=REDACTED&access_token%3D=v"
        );
        assert_eq!(form_decode("a+b%20c%zz%4"), "a b c%zz%4");
    }
}
