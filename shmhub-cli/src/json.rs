//! A JSON value with members in a fixed order, and its pretty printer: enough for the
//! documents of `--json` (`shm.cli.inspect-json`) without a serialisation framework.

use std::fmt::Write;

/// A JSON value. Objects keep their members in the order they were built.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`: absent or unknown.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A non-negative integer (counts, sizes, pids, generations: all below 2^53).
    Num(u64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, members in order.
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    /// A u64 that may exceed 2^53, as a `"0x…"` string.
    pub fn hex(v: u64) -> Json {
        Json::Str(format!("{v:#x}"))
    }

    /// `null` for `None`.
    pub fn opt<T: Into<Json>>(v: Option<T>) -> Json {
        v.map_or(Json::Null, Into::into)
    }

    /// The document, indented by two spaces, with a final newline.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => write_str(out, s),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(members) if members.is_empty() => out.push_str("{}"),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    item.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push(']');
            }
            Json::Obj(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    indent(out, depth + 1);
                    write_str(out, key);
                    out.push_str(": ");
                    value.write(out, depth + 1);
                }
                out.push('\n');
                indent(out, depth);
                out.push('}');
            }
        }
    }
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
}

/// A string literal: quotes, backslashes and control characters escaped (RFC 8259).
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl From<bool> for Json {
    fn from(v: bool) -> Self {
        Json::Bool(v)
    }
}

impl From<u64> for Json {
    fn from(v: u64) -> Self {
        Json::Num(v)
    }
}

impl From<u32> for Json {
    fn from(v: u32) -> Self {
        Json::Num(u64::from(v))
    }
}

impl From<u8> for Json {
    fn from(v: u8) -> Self {
        Json::Num(u64::from(v))
    }
}

impl From<&str> for Json {
    fn from(v: &str) -> Self {
        Json::Str(v.to_string())
    }
}

impl From<String> for Json {
    fn from(v: String) -> Self {
        Json::Str(v)
    }
}

impl From<Vec<Json>> for Json {
    fn from(v: Vec<Json>) -> Self {
        Json::Arr(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_strings_are_escaped() {
        let doc = Json::Obj(vec![
            ("z", Json::Num(1)),
            ("a", Json::Str("q\"\\\n\u{1}é".into())),
            ("e", Json::Arr(vec![])),
            ("o", Json::Obj(vec![])),
            (
                "l",
                Json::Arr(vec![Json::Null, Json::Bool(true), Json::hex(255)]),
            ),
        ]);
        assert_eq!(
            doc.pretty(),
            "{\n  \"z\": 1,\n  \"a\": \"q\\\"\\\\\\n\\u0001é\",\n  \"e\": [],\n  \"o\": {},\n  \
             \"l\": [\n    null,\n    true,\n    \"0xff\"\n  ]\n}\n"
        );
    }
}
