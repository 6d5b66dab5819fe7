//! The configuration reference (`docs/configuration.md`), checked against each binary's `--help`.
//!
//! Every option is documented twice over — in the reference's tables and, through the clap doc
//! comments, in `--help` — and the two drift apart silently whenever an option, a default or a
//! sentence changes on one side only. Each binary's crate has a test calling
//! [`assert_reference_matches_help`], which runs the built binary with `--help` and compares every
//! option (name, environment variable, default, meaning) with the reference's rows for it, in both
//! directions. The parsing lives here, once.
//!
//! The reference's tables are recognised by their header:
//! - `| option | environment | default | taken by | meaning |`: options several binaries share;
//!   `taken by` lists them, comma-separated;
//! - `| service | option | environment | default | compose sets | meaning |`: one binary's own
//!   options (`compose sets` is documentation only).
//!
//! Conventions: a default or environment of `—` (optionally followed by a remark) means none; a
//! flag without a value has the default `off` and, when it has a variable, `NAME=true`; an option with fixed values
//! ends its meaning with them, as `` (`a`, `b`) ``.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One option as `--help` prints it, or as the reference documents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionDoc {
    /// The long name, without dashes.
    pub long: String,
    pub env: Option<String>,
    pub default: Option<String>,
    /// `false` for a flag such as `--once`.
    pub takes_value: bool,
    /// The help text (the reference's "meaning"), whitespace normalised, with the possible values
    /// appended as `` (`a`, `b`) ``.
    pub meaning: String,
}

/// The file holding the configuration reference, relative to the workspace root.
pub const REFERENCE: &str = "docs/configuration.md";

/// Runs `binary --help` and fails the test, listing every difference, when the configuration
/// reference ([`REFERENCE`]) does not document `name`'s options exactly as `--help` does.
pub fn assert_reference_matches_help(name: &str, binary: impl AsRef<Path>) {
    let output = Command::new(binary.as_ref())
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --help: {e}", binary.as_ref().display()));
    assert!(
        output.status.success(),
        "{name} --help failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let help = parse_help(&String::from_utf8_lossy(&output.stdout));
    let path = crate::workspace_root().join(REFERENCE);
    let reference = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let documented = parse_reference(&reference, name);
    let problems = compare(&help, &documented);
    assert!(
        problems.is_empty(),
        "{REFERENCE} disagrees with `{name} --help`:\n- {}\n\
         Fix the row in {REFERENCE} (or the doc comment that --help prints) so that both say \
         the same.",
        problems.join("\n- ")
    );
}

/// Every difference between `--help` and the reference's rows, as sentences.
pub fn compare(help: &[OptionDoc], documented: &[OptionDoc]) -> Vec<String> {
    let reference: BTreeMap<&str, &OptionDoc> =
        documented.iter().map(|o| (o.long.as_str(), o)).collect();
    let mut problems = Vec::new();
    for option in help {
        let Some(row) = reference.get(option.long.as_str()) else {
            problems.push(format!("--{} is not documented", option.long));
            continue;
        };
        let mut differs = |what: &str, ours: String, theirs: String| {
            if ours != theirs {
                problems.push(format!(
                    "--{} {what}: {REFERENCE} says {ours:?}, --help says {theirs:?}",
                    option.long
                ));
            }
        };
        differs("environment", shown(&row.env), shown(&option.env));
        differs("default", shown(&row.default), shown(&option.default));
        differs(
            "takes a value",
            row.takes_value.to_string(),
            option.takes_value.to_string(),
        );
        differs("meaning", row.meaning.clone(), option.meaning.clone());
    }
    for row in documented {
        if !help.iter().any(|o| o.long == row.long) {
            problems.push(format!(
                "--{} is documented but --help has no such option",
                row.long
            ));
        }
    }
    problems
}

/// The options in a clap `--help` text (long or compact form), without `--help` and `--version`.
pub fn parse_help(text: &str) -> Vec<OptionDoc> {
    let mut blocks: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if (2..=6).contains(&indent) && trimmed.starts_with('-') {
            blocks.push((trimmed.to_string(), Vec::new()));
            in_block = true;
        } else if indent == 0 && !trimmed.is_empty() {
            // A section header ("Commands:", "Options:"): no option continues past it.
            in_block = false;
        } else if in_block && indent > 6 {
            if let Some((_, lines)) = blocks.last_mut() {
                lines.push(trimmed.to_string());
            }
        }
    }
    blocks
        .into_iter()
        .filter_map(|(head, lines)| option_from_block(&head, &lines))
        .filter(|o| o.long != "help" && o.long != "version")
        .collect()
}

fn option_from_block(head: &str, lines: &[String]) -> Option<OptionDoc> {
    let start = head.find("--")?;
    let rest = &head[start + 2..];
    let name_end = rest.find([' ', '=']).unwrap_or(rest.len());
    let long = rest[..name_end].to_string();
    let mut after = rest[name_end..].trim_start();
    let takes_value = after.starts_with('<');
    if takes_value {
        after = after.find('>').map_or("", |i| after[i + 1..].trim_start());
    }
    // Compact help puts the text on the option's line; long help on the lines below it.
    let mut text: Vec<&str> = Vec::new();
    if !after.is_empty() {
        text.push(after);
    }
    text.extend(lines.iter().map(String::as_str));
    let all = text.join("\n");
    let bracket = |key: &str| -> Option<String> {
        let at = all.find(&format!("[{key}: "))? + key.len() + 3;
        let end = all[at..].find(']')? + at;
        Some(all[at..end].to_string())
    };
    let env = bracket("env").map(|e| e.trim_end_matches('=').to_string());
    let default = bracket("default");
    let mut possible: Vec<String> = bracket("possible values")
        .map(|v| v.split(", ").map(str::to_string).collect())
        .unwrap_or_default();
    let mut description = Vec::new();
    let mut in_values = false;
    for line in &text {
        if line.starts_with("Possible values:") {
            in_values = true;
        } else if in_values {
            if let Some(value) = line.strip_prefix("- ") {
                let value = value.split(':').next().unwrap_or(value).trim();
                possible.push(value.to_string());
            }
        } else if !line.starts_with('[') {
            // Compact form: "text [env: X] [default: y]" on one line.
            let cut = line.find(" [").map_or(*line, |i| &line[..i]);
            description.push(cut);
        }
    }
    let mut meaning = normalise(&description.join(" "));
    if !possible.is_empty() {
        let values: Vec<String> = possible.iter().map(|v| format!("`{v}`")).collect();
        meaning = format!("{meaning} ({})", values.join(", "));
    }
    Some(OptionDoc {
        long,
        env,
        default,
        takes_value,
        meaning,
    })
}

/// The rows of the reference (the whole document: only tables with one of the headers above
/// count) that document `binary`'s options.
pub fn parse_reference(reference: &str, binary: &str) -> Vec<OptionDoc> {
    let mut rows = Vec::new();
    let mut header: Vec<String> = Vec::new();
    for line in reference.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            header.clear();
            continue;
        }
        let cells = split_row(line);
        if header.is_empty() {
            header = cells.iter().map(|c| c.to_lowercase()).collect();
            continue;
        }
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
        {
            continue; // the separator row
        }
        let cell = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .and_then(|i| cells.get(i))
                .map(String::as_str)
        };
        let applies = match (cell("service"), cell("taken by")) {
            (Some(service), _) => service == binary,
            (None, Some(list)) => list.split(',').any(|b| b.trim() == binary),
            (None, None) => false,
        };
        if !applies {
            continue;
        }
        let (Some(option), Some(env), Some(default), Some(meaning)) = (
            cell("option"),
            cell("environment"),
            cell("default"),
            cell("meaning"),
        ) else {
            continue;
        };
        let env = unquote(env);
        let flag = env.ends_with("=true") || unquote(default) == "off";
        rows.push(OptionDoc {
            long: unquote(option).trim_start_matches("--").to_string(),
            env: Some(env.trim_end_matches("=true").to_string())
                .filter(|e| !e.is_empty() && !e.starts_with('—')),
            default: if default.starts_with('—') || (flag && unquote(default) == "off") {
                None
            } else {
                Some(unquote(default).to_string())
            },
            takes_value: !flag,
            meaning: normalise(meaning),
        });
    }
    rows
}

fn shown(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "none".into())
}

fn split_row(line: &str) -> Vec<String> {
    let inner = line.trim_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim().trim_matches('`')
}

fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: &str = "\
Copies events

Usage: consumer [OPTIONS] --database-url <DATABASE_URL>

Options:
      --database-url <DATABASE_URL>
          PostgreSQL connection string
          (key=value form works too)

          [env: DATABASE_URL]

      --mode <MODE>
          How it goes

          Possible values:
          - auto: Use them when the server has them
          - off:  Never

          [env: MODE=]
          [default: auto]

      --once
          Run one pass

          [env: ONCE=]

  -h, --help
          Print help (see a summary with '-h')
";

    const COMPACT: &str = "\
Applies the schema

Usage: migrate [OPTIONS] --database-url <DATABASE_URL>

Options:
      --database-url <DATABASE_URL>  PostgreSQL connection string [env: DATABASE_URL]
      --log-level <LOG_LEVEL>        Log filter [env: LOG_LEVEL=] [default: info]
      --kind <KIND>                  A kind [default: a] [possible values: a, b]
  -h, --help                         Print help
  -V, --version                      Print version
";

    #[test]
    fn long_help_is_parsed_with_env_default_values_and_flags() {
        let options = parse_help(LONG);
        assert_eq!(options.len(), 3, "{options:?}");
        assert_eq!(options[0].long, "database-url");
        assert_eq!(options[0].env.as_deref(), Some("DATABASE_URL"));
        assert_eq!(options[0].default, None);
        assert_eq!(
            options[0].meaning,
            "PostgreSQL connection string (key=value form works too)"
        );
        assert_eq!(options[1].default.as_deref(), Some("auto"));
        assert_eq!(options[1].meaning, "How it goes (`auto`, `off`)");
        assert!(!options[2].takes_value);
        assert_eq!(options[2].env.as_deref(), Some("ONCE"));
    }

    #[test]
    fn compact_help_is_parsed_too() {
        let options = parse_help(COMPACT);
        assert_eq!(options.len(), 3, "{options:?}");
        assert_eq!(options[1].meaning, "Log filter");
        assert_eq!(options[1].default.as_deref(), Some("info"));
        assert_eq!(options[2].meaning, "A kind (`a`, `b`)");
    }

    #[test]
    fn reference_rows_and_their_differences_are_reported() {
        let reference = "\
## Configuration

| option | environment | default | taken by | meaning |
| --- | --- | --- | --- | --- |
| `--database-url` | `DATABASE_URL` | — (required) | consumer, migrate | PostgreSQL connection string (key=value form works too) |

| service | option | environment | default | compose sets | meaning |
| --- | --- | --- | --- | --- | --- |
| consumer | `--mode` | `MODE` | `manual` | `auto` | How it goes (`auto`, `off`) |
| consumer | `--gone` | `GONE` | — |  | Removed long ago |
| purger | `--once` | `ONCE=true` | `off` |  | Run one pass |

## Next
";
        let rows = parse_reference(reference, "consumer");
        assert_eq!(rows.len(), 3, "{rows:?}");
        let problems = compare(&parse_help(LONG), &rows);
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("--mode default"), "{problems:?}");
        assert!(
            problems[1].contains("--once is not documented"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("--gone is documented but"),
            "{problems:?}"
        );

        let purger = parse_reference(reference, "purger");
        assert_eq!(purger[0].env.as_deref(), Some("ONCE"));
        assert!(!purger[0].takes_value);
        assert_eq!(purger[0].default, None);
    }
}
