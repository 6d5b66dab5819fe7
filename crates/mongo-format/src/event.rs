//! The stored form of an event, and the mapping from PostgreSQL's JSON to BSON.
//!
//! Payload and headers arrive as the text PostgreSQL prints for `jsonb`, and are converted here
//! value by value, keeping every value exact or refusing the event (which then becomes a dead
//! letter, never a stuck stream):
//!
//! | JSON (jsonb)                                     | BSON                                   |
//! |--------------------------------------------------|----------------------------------------|
//! | integer in ±2^31                                 | Int32                                  |
//! | integer in ±2^63                                 | Int64                                  |
//! | other number a double holds exactly (`1.5`, `1e22`) | Double                              |
//! | other number with ≤ 34 significant digits and exponent in −6176…+6111 (`0.1`, `1e400`, `1e-400`, 30-digit integers) | Decimal128 |
//! | any other number (35+ significant digits)        | dead letter `number_out_of_range`      |
//! | string, `true`/`false`, `null`                   | String, Boolean, Null                  |
//! | array, object                                    | Array, Document (keys as they are: `$x`, `a.b` and `""` included) |
//! | nesting past [`MAX_DEPTH`] levels in the stored document | dead letter `too_deep`         |
//! | a stored document over 16 MiB                    | dead letter `too_large`                |
//!
//! There is no extended-JSON interpretation: `{"$oid": "x"}` stays a plain document. Field names
//! that a server refuses (older MongoDB refuses `$`-prefixed and dotted names) make the write fail
//! as invalid, and the sink isolates that event as a dead letter `rejected_by_server`.
//!
//! Why a converter of our own rather than serde_json: serde_json turns `1e400` into an error and
//! 40-digit integers into rounded doubles, and stops at 128 levels of nesting, while PostgreSQL's
//! jsonb holds all of them (its numbers are `numeric`). Parsing the server's own text straight
//! into BSON also skips an intermediate `Value`.

use event_store::Event;
use mongodb::bson::{doc, RawDocumentBuf};
use mongodb::bson::{spec::BinarySubtype, Binary, Bson, DateTime, Decimal128, Document};

/// MongoDB's nesting limit for stored documents (a real `mongod` refuses deeper ones; enforcing it
/// here keeps behaviour the same on every server). The event document itself is level 1, so a
/// payload may nest `MAX_DEPTH - 1` levels.
pub const MAX_DEPTH: usize = 100;

/// MongoDB's document size limit (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// Why an event cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// A short stable code, the `reason` label of `consumer_dead_letters_total`.
    pub code: &'static str,
    /// For humans: what exactly was wrong.
    pub detail: String,
}

impl Poison {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Poison {
        Poison {
            code,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Poison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// The stored form of an event (`received_at`: when the consumer read it).
pub fn event_document(event: &Event, received_at: DateTime) -> Result<RawDocumentBuf, Poison> {
    // The event document is level 1, `payload` and `headers` level 2.
    let payload = json_text_to_bson(event.payload.as_str(), 2)?;
    let headers = json_text_to_bson(event.headers.as_str(), 2)?;
    let optional = |s: &Option<String>| s.as_ref().map_or(Bson::Null, |s| Bson::String(s.clone()));
    let document = doc! {
        "_id": event.id(),
        "event_id": Binary { subtype: BinarySubtype::Uuid, bytes: event.event_id.as_bytes().to_vec() },
        // The stream position, so `sort({"position.tx_id": 1, "position.id": 1})` gives delivery
        // order (`_id` alone does not: ids are taken at INSERT, not in stream order). tx_id is an
        // Int64, as in the checkpoint.
        "position": { "tx_id": event.position.tx_id as i64, "id": event.position.id },
        "topic": &event.topic,
        "key": optional(&event.key),
        "type": optional(&event.event_type),
        "payload": payload,
        "headers": headers,
        "created_at": DateTime::from_system_time(event.created_at),
        "received_at": received_at,
    };
    let raw = RawDocumentBuf::from_document(&document).map_err(|e| {
        Poison::new(
            "invalid_document",
            format!("cannot be encoded as BSON: {e}"),
        )
    })?;
    if raw.as_bytes().len() > MAX_DOCUMENT_BYTES {
        return Err(Poison::new(
            "too_large",
            format!(
                "the document would be {} bytes, over MongoDB's limit of {MAX_DOCUMENT_BYTES}",
                raw.as_bytes().len()
            ),
        ));
    }
    Ok(raw)
}

/// Converts the JSON text PostgreSQL printed into BSON; `level` is the nesting level the value
/// sits at inside the stored document.
pub fn json_text_to_bson(text: &str, level: usize) -> Result<Bson, Poison> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        text,
        at: 0,
    };
    let value = parser.value(level)?;
    parser.skip_whitespace();
    if parser.at != parser.bytes.len() {
        return Err(parser.malformed("trailing characters"));
    }
    Ok(value)
}

/// A recursive-descent parser for the JSON PostgreSQL prints. Recursion is bounded by
/// [`MAX_DEPTH`]: deeper input is refused before descending, so no input can exhaust the stack.
struct Parser<'a> {
    bytes: &'a [u8],
    text: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn value(&mut self, level: usize) -> Result<Bson, Poison> {
        self.skip_whitespace();
        match self.bytes.get(self.at) {
            Some(b'{') => {
                self.descend(level)?;
                let mut document = Document::new();
                self.at += 1;
                if self.consume(b'}') {
                    return Ok(Bson::Document(document));
                }
                loop {
                    self.skip_whitespace();
                    let key = self.string()?;
                    if key.contains('\0') {
                        return Err(Poison::new(
                            "invalid_document",
                            "a field name contains NUL, which BSON cannot store",
                        ));
                    }
                    if !self.consume(b':') {
                        return Err(self.malformed("expected ':'"));
                    }
                    let value = self.value(level + 1)?;
                    document.insert(key, value);
                    if self.consume(b',') {
                        continue;
                    }
                    if self.consume(b'}') {
                        return Ok(Bson::Document(document));
                    }
                    return Err(self.malformed("expected ',' or '}'"));
                }
            }
            Some(b'[') => {
                self.descend(level)?;
                let mut items = Vec::new();
                self.at += 1;
                if self.consume(b']') {
                    return Ok(Bson::Array(items));
                }
                loop {
                    items.push(self.value(level + 1)?);
                    if self.consume(b',') {
                        continue;
                    }
                    if self.consume(b']') {
                        return Ok(Bson::Array(items));
                    }
                    return Err(self.malformed("expected ',' or ']'"));
                }
            }
            Some(b'"') => Ok(Bson::String(self.string()?)),
            Some(b't') => self.literal("true", Bson::Boolean(true)),
            Some(b'f') => self.literal("false", Bson::Boolean(false)),
            Some(b'n') => self.literal("null", Bson::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while matches!(
                    self.bytes.get(self.at),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.at += 1;
                }
                number(&self.text[start..self.at])
            }
            _ => Err(self.malformed("expected a JSON value")),
        }
    }

    /// Refuses a container that would sit deeper than MongoDB allows.
    fn descend(&self, level: usize) -> Result<(), Poison> {
        if level > MAX_DEPTH {
            return Err(Poison::new(
                "too_deep",
                format!("nesting deeper than MongoDB's limit of {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, Poison> {
        self.skip_whitespace();
        if !self.consume(b'"') {
            return Err(self.malformed("expected a string"));
        }
        let mut out = String::new();
        loop {
            let start = self.at;
            while !matches!(self.bytes.get(self.at), Some(b'"' | b'\\') | None) {
                self.at += 1;
            }
            out.push_str(&self.text[start..self.at]);
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = self.bytes.get(self.at).copied();
                    self.at += 1;
                    match escaped {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let high = self.hex4()?;
                            let c = if (0xD800..0xDC00).contains(&high) {
                                if !(self.consume(b'\\') && self.consume(b'u')) {
                                    return Err(self.malformed("unpaired surrogate"));
                                }
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(self.malformed("unpaired surrogate"));
                                }
                                char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
                            } else {
                                char::from_u32(high)
                            };
                            out.push(c.ok_or_else(|| self.malformed("invalid \\u escape"))?);
                        }
                        _ => return Err(self.malformed("invalid escape")),
                    }
                }
                _ => return Err(self.malformed("unterminated string")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, Poison> {
        let digits = self
            .text
            .get(self.at..self.at + 4)
            .ok_or_else(|| self.malformed("short \\u escape"))?;
        self.at += 4;
        u32::from_str_radix(digits, 16).map_err(|_| self.malformed("invalid \\u escape"))
    }

    fn literal(&mut self, word: &str, value: Bson) -> Result<Bson, Poison> {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(self.malformed("expected a JSON value"))
        }
    }

    fn consume(&mut self, byte: u8) -> bool {
        self.skip_whitespace();
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.bytes.get(self.at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn malformed(&self, what: &str) -> Poison {
        Poison::new(
            "undecodable",
            format!("not JSON at byte {}: {what}", self.at),
        )
    }
}

/// A JSON number, kept exact: see the module's table.
fn number(text: &str) -> Result<Bson, Poison> {
    let integer = !text.contains(['.', 'e', 'E']);
    if integer {
        if let Ok(i) = text.parse::<i64>() {
            return Ok(i32::try_from(i).map_or(Bson::Int64(i), Bson::Int32));
        }
    }
    let decimal = Decimal::parse(text).ok_or_else(|| {
        Poison::new(
            "undecodable",
            format!("{} is not a JSON number", shorten(text)),
        )
    })?;
    if !integer && decimal.is_exact_double() {
        if let Ok(d) = text.parse::<f64>() {
            return Ok(Bson::Double(d));
        }
    }
    decimal
        .to_decimal128()
        .map(Bson::Decimal128)
        .ok_or_else(|| {
            Poison::new(
                "number_out_of_range",
                format!(
                    "{} has {} significant digits; BSON holds exact numbers up to 34 (Decimal128)",
                    shorten(text),
                    decimal.significant_digits()
                ),
            )
        })
}

fn shorten(text: &str) -> String {
    if text.len() <= 40 {
        text.to_string()
    } else {
        format!("{}…({} characters)", &text[..40], text.len())
    }
}

/// A decimal number as `(-1)^negative × digits × 10^exponent`, `digits` without leading zeros
/// (empty for zero); trailing zeros are kept, so a Decimal128 keeps the number's written form.
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
            Some((m, e)) => (m, e.parse::<i64>().ok()?),
            None => (rest, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if whole.is_empty()
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let digits: String = whole.chars().chain(fraction.chars()).collect();
        let exponent = exponent.checked_sub(i64::try_from(fraction.len()).ok()?)?;
        let digits = digits.trim_start_matches('0').to_string();
        Some(Decimal {
            negative,
            exponent: if digits.is_empty() { 0 } else { exponent },
            digits,
        })
    }

    /// The same value with trailing zeros moved into the exponent.
    fn normalized(&self) -> (&str, i64) {
        let significant = self.digits.trim_end_matches('0');
        let moved = (self.digits.len() - significant.len()) as i64;
        (significant, self.exponent.saturating_add(moved))
    }

    fn significant_digits(&self) -> usize {
        self.normalized().0.len()
    }

    /// Whether an IEEE double holds this value exactly: `digits × 10^exponent` must be
    /// `k × 2^p` with odd `k < 2^53` and `p` within the double's range.
    fn is_exact_double(&self) -> bool {
        let (digits, exponent) = self.normalized();
        if digits.is_empty() {
            return true;
        }
        let Ok(mut k) = digits.parse::<u128>() else {
            return false; // more than 38 digits without trailing zeros: beyond 53 bits
        };
        let mut twos: i64;
        if exponent >= 0 {
            // × 10^e = × 5^e × 2^e
            for _ in 0..exponent {
                match k.checked_mul(5) {
                    Some(next) => k = next,
                    None => return false,
                }
            }
            twos = exponent;
        } else {
            // ÷ 10^e: exact in binary only when 5^e divides the digits.
            for _ in 0..-exponent {
                if k % 5 != 0 {
                    return false;
                }
                k /= 5;
            }
            twos = exponent;
        }
        let zeros = k.trailing_zeros();
        k >>= zeros;
        twos += i64::from(zeros);
        let bits = 128 - i64::from(k.leading_zeros());
        k < (1u128 << 53) && twos >= -1074 && bits + twos <= 1024
    }

    /// As Decimal128 when it fits: at most 34 significant digits, exponent within −6176…+6111
    /// (a smaller exponent is padded with zeros up to 34 digits where that reaches the range).
    fn to_decimal128(&self) -> Option<Decimal128> {
        let (mut digits, mut exponent) = (self.digits.clone(), self.exponent);
        if digits.len() > 34 {
            let (significant, normalized) = self.normalized();
            if significant.len() > 34 {
                return None;
            }
            (digits, exponent) = (significant.to_string(), normalized);
        }
        if digits.is_empty() {
            digits.push('0');
        }
        while exponent > 6111 && digits.len() < 34 {
            digits.push('0');
            exponent -= 1;
        }
        if !(-6176..=6111).contains(&exponent) {
            return None;
        }
        let sign = if self.negative { "-" } else { "" };
        format!("{sign}{digits}E{exponent}").parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(text: &str) -> Result<Bson, Poison> {
        json_text_to_bson(text, 2)
    }

    fn decimal(text: &str) -> Bson {
        Bson::Decimal128(text.parse().unwrap())
    }

    #[test]
    fn numbers_keep_their_exact_value() {
        assert_eq!(convert("1").unwrap(), Bson::Int32(1));
        assert_eq!(convert("-2147483649").unwrap(), Bson::Int64(-2147483649));
        assert_eq!(convert("1.5").unwrap(), Bson::Double(1.5));
        assert_eq!(convert("-0.25").unwrap(), Bson::Double(-0.25));
        assert_eq!(convert("1e22").unwrap(), Bson::Double(1e22));
        // Not exact as doubles, exact as Decimal128.
        assert_eq!(convert("0.1").unwrap(), decimal("0.1"));
        assert_eq!(convert("1e23").unwrap(), decimal("1E+23"));
        assert_eq!(convert("1e400").unwrap(), decimal("1E+400"));
        assert_eq!(convert("-1e400").unwrap(), decimal("-1E+400"));
        assert_eq!(convert("1e-400").unwrap(), decimal("1E-400"));
        // PostgreSQL prints numerics in full.
        let big = format!("1{}", "0".repeat(400));
        assert_eq!(convert(&big).unwrap(), decimal("1E+400"));
        let small = format!("0.{}1", "0".repeat(399));
        assert_eq!(convert(&small).unwrap(), decimal("1E-400"));
        // Beyond i64 but within 34 digits.
        assert_eq!(
            convert("123456789012345678901234567890").unwrap(),
            decimal("123456789012345678901234567890")
        );
        // 40 significant digits: nothing holds it exactly.
        let forty = "1234567890123456789012345678901234567891";
        assert_eq!(convert(forty).unwrap_err().code, "number_out_of_range");
        assert_eq!(convert("0").unwrap(), Bson::Int32(0));
        assert_eq!(convert("0.0").unwrap(), Bson::Double(0.0));
        assert_eq!(convert("0.125").unwrap(), Bson::Double(0.125));
        // The smallest double's shortest spelling is not its exact value.
        assert_eq!(convert("5e-324").unwrap(), decimal("5E-324"));
    }

    #[test]
    fn depth_is_limited_to_mongodbs() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(convert(&nested(MAX_DEPTH - 1)).is_ok());
        assert_eq!(convert(&nested(MAX_DEPTH)).unwrap_err().code, "too_deep");
        let objects = format!("{}1{}", r#"{"a": "#.repeat(200), "}".repeat(200));
        assert_eq!(convert(&objects).unwrap_err().code, "too_deep");
        // Far deeper than any stack would take recursively: refused, not crashed.
        assert_eq!(convert(&nested(100_000)).unwrap_err().code, "too_deep");
    }

    #[test]
    fn strings_and_names_are_kept_as_they_are() {
        let value = convert(
            r#"{"$where": "1", "a.b": 2, "": 0, "q": "\"\\\/\n\u00e9\ud83d\ude00", "$oid": "x"}"#,
        )
        .unwrap();
        let Bson::Document(d) = value else { panic!() };
        assert_eq!(d.get("$where"), Some(&Bson::String("1".into())));
        assert_eq!(d.get("a.b"), Some(&Bson::Int32(2)));
        assert_eq!(d.get(""), Some(&Bson::Int32(0)));
        assert_eq!(d.get_str("q").unwrap(), "\"\\/\né😀");
        assert_eq!(d.get_str("$oid").unwrap(), "x");
        assert_eq!(
            convert("[true, false, null]").unwrap(),
            Bson::Array(vec![Bson::Boolean(true), Bson::Boolean(false), Bson::Null])
        );
    }

    #[test]
    fn malformed_text_is_refused_not_panicked_on() {
        for bad in [
            "",
            "{",
            "[1,",
            "\"abc",
            "tru",
            "1 2",
            "{\"a\" 1}",
            "\"\\ud800\"",
            "--1",
            "1.2.3",
        ] {
            assert!(convert(bad).is_err(), "{bad:?}");
        }
    }
}
