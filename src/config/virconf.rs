//! Parser for libvirt's "virconf" configuration syntax (libvirt-rpc.md §7.1).
//!
//! The format looks like TOML or Python but is neither: duplicate keys keep the
//! *first* value, `;` separates statements, strings have no escapes, integers are
//! decimal only, and booleans are written `0`/`1`. A generic TOML parser would
//! both reject valid libvirt files and accept invalid ones, so this is a small
//! hand-written parser that follows libvirt's rules.
//!
//! The parser is sans-IO (text in, [`VirConf`] out) and must never panic: it is
//! fed arbitrary input by the fuzzer. Lists do not nest, so parsing needs no
//! recursion and cannot overflow the stack.

use std::collections::HashSet;

/// Largest input accepted, matching libvirt's 10 MiB limit on config files.
pub const MAX_INPUT_LEN: usize = 10 * 1024 * 1024;

/// A syntax error, with the 1-based line it was found on (0 = whole input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number; 0 when the error is not tied to a line.
    pub line: usize,
    /// Human-readable reason.
    pub message: String,
}

/// A configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// An integer. `i128` so that one variant covers both libvirt's signed
    /// (negative) and unsigned (up to `u64::MAX`) numbers; the parser only
    /// produces values in `i64::MIN..=u64::MAX`.
    Int(i128),
    /// A string, exactly as written between the quotes (no escape processing).
    Str(String),
    /// A list of scalars (lists never nest).
    List(Vec<Value>),
}

/// One `name = value` statement, with the line its name was on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub name: String,
    /// The parsed value.
    pub value: Value,
    /// 1-based line of the key, for error messages.
    pub line: usize,
}

/// A parsed file: every statement in file order, duplicates included.
///
/// Lookups return the first occurrence, which is what libvirt uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirConf {
    entries: Vec<Entry>,
}

impl VirConf {
    /// The value of the first statement named `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entry(key).map(|e| &e.value)
    }

    /// The first statement named `key` (value and line).
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == key)
    }

    /// The line on which `key` first appears.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.entry(key).map(|e| e.line)
    }

    /// Distinct keys in order of first appearance.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .map(|e| e.name.as_str())
            .filter(move |n| seen.insert(*n))
    }

    /// All statements in file order, including later duplicates.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

/// Parse virconf text.
///
/// Errors carry the line of the offending token; for unterminated strings and
/// lists that is the line where they were opened.
pub fn parse(text: &str) -> Result<VirConf, ParseError> {
    if text.len() > MAX_INPUT_LEN {
        return Err(ParseError {
            line: 0,
            message: format!("input is larger than the {MAX_INPUT_LEN} byte limit"),
        });
    }
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
        line: 1,
    };
    let mut conf = VirConf::default();
    while let Some(entry) = p.statement()? {
        conf.entries.push(entry);
    }
    Ok(conf)
}

/// Byte cursor over the input. All structural characters are ASCII, so byte
/// offsets taken at them are always UTF-8 boundaries.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    line: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn peek_at(&self, off: usize) -> Option<u8> {
        self.s.get(self.pos.checked_add(off)?).copied()
    }

    fn err<T>(&self, line: usize, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            line,
            message: message.into(),
        })
    }

    /// Spaces, tabs and carriage returns (so CRLF files work).
    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
            self.pos += 1;
        }
    }

    /// From `#` up to (not including) the newline.
    fn skip_comment(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'\n' {
                break;
            }
            self.pos += 1;
        }
    }

    /// Blanks, newlines and comments: the filler allowed inside lists.
    fn skip_filler(&mut self) {
        loop {
            self.skip_blanks();
            match self.peek() {
                Some(b'#') => self.skip_comment(),
                Some(b'\n') => {
                    self.pos += 1;
                    self.line += 1;
                }
                _ => return,
            }
        }
    }

    /// Parse the next statement; `None` at end of input.
    fn statement(&mut self) -> Result<Option<Entry>, ParseError> {
        self.skip_filler();
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        let line = self.line;
        if !c.is_ascii_alphabetic() {
            let hint = if c == b'[' {
                " (sections/tables are not part of this syntax)"
            } else {
                ""
            };
            return self.err(line, format!("expecting a name{hint}"));
        }
        let start = self.pos;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_') {
            self.pos += 1;
        }
        let name = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
        self.skip_blanks();
        if self.peek() != Some(b'=') {
            return self.err(line, format!("expecting '=' after '{name}'"));
        }
        self.pos += 1;
        self.skip_blanks();
        let value = match self.peek() {
            Some(b'[') => self.list()?,
            _ => self.scalar()?,
        };
        self.separator(&name)?;
        Ok(Some(Entry { name, value, line }))
    }

    /// After a value: end of input, newline, `;`, or a comment.
    fn separator(&mut self, name: &str) -> Result<(), ParseError> {
        self.skip_blanks();
        match self.peek() {
            None | Some(b'\n') | Some(b'#') => Ok(()),
            Some(b';') => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => self.err(
                self.line,
                format!("expecting a separator after the value of '{name}'"),
            ),
        }
    }

    /// `[ v, v, ... ]`, possibly over several lines with comments, trailing comma allowed.
    fn list(&mut self) -> Result<Value, ParseError> {
        let open_line = self.line;
        self.pos += 1; // '['
        let mut items = Vec::new();
        loop {
            self.skip_filler();
            match self.peek() {
                None => return self.err(open_line, "unterminated list: missing ']'"),
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::List(items));
                }
                Some(b'[') => return self.err(self.line, "lists cannot contain lists"),
                Some(_) => items.push(self.scalar()?),
            }
            self.skip_filler();
            match self.peek() {
                None => return self.err(open_line, "unterminated list: missing ']'"),
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                Some(_) => return self.err(self.line, "expecting ',' or ']' in list"),
            }
        }
    }

    /// A string or an integer.
    fn scalar(&mut self) -> Result<Value, ParseError> {
        match self.peek() {
            Some(b'"') if self.peek_at(1) == Some(b'"') && self.peek_at(2) == Some(b'"') => {
                self.triple_string()
            }
            Some(q @ (b'"' | b'\'')) => self.line_string(q),
            Some(c) if c.is_ascii_digit() || c == b'+' || c == b'-' => self.integer(),
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric()) {
                    self.pos += 1;
                }
                let word = String::from_utf8_lossy(&self.s[start..self.pos]).to_ascii_lowercase();
                let hint = match word.as_str() {
                    "true" | "false" | "yes" | "no" | "on" | "off" => {
                        " (booleans are written 0 or 1)"
                    }
                    _ => " (strings must be quoted)",
                };
                self.err(self.line, format!("expecting a value{hint}"))
            }
            None | Some(b'\n') => self.err(self.line, "expecting a value"),
            Some(_) => self.err(self.line, "expecting a value"),
        }
    }

    /// Turn a byte range of the input into a string, refusing NUL bytes
    /// (they could never reach libvirt through a C string).
    fn text(&self, start: usize, end: usize, line: usize) -> Result<String, ParseError> {
        let bytes = self.s.get(start..end).unwrap_or(&[]);
        if bytes.contains(&0) {
            return self.err(line, "NUL byte in string");
        }
        // Both ends sit next to ASCII quote characters, so this is valid UTF-8.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// `"..."` or `'...'` on a single line; no escapes.
    fn line_string(&mut self, quote: u8) -> Result<Value, ParseError> {
        let line = self.line;
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.peek() {
                None | Some(b'\n') | Some(b'\r') => return self.err(line, "unterminated string"),
                Some(c) if c == quote => break,
                Some(_) => self.pos += 1,
            }
        }
        let s = self.text(start, self.pos, line)?;
        self.pos += 1;
        Ok(Value::Str(s))
    }

    /// `"""..."""`, may span lines; no escapes.
    fn triple_string(&mut self) -> Result<Value, ParseError> {
        let open_line = self.line;
        self.pos += 3;
        let start = self.pos;
        loop {
            match self.peek() {
                None => return self.err(open_line, "unterminated \"\"\" string"),
                Some(b'"') if self.peek_at(1) == Some(b'"') && self.peek_at(2) == Some(b'"') => {
                    break
                }
                Some(b'\n') => {
                    self.line += 1;
                    self.pos += 1;
                }
                Some(_) => self.pos += 1,
            }
        }
        let s = self.text(start, self.pos, open_line)?;
        self.pos += 3;
        Ok(Value::Str(s))
    }

    /// Optional sign and decimal digits; leading zeros are fine.
    fn integer(&mut self) -> Result<Value, ParseError> {
        let line = self.line;
        let negative = match self.peek() {
            Some(b'-') => {
                self.pos += 1;
                true
            }
            Some(b'+') => {
                self.pos += 1;
                false
            }
            _ => false,
        };
        let mut magnitude: i128 = 0;
        let mut digits = 0usize;
        let mut overflow = false;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            self.pos += 1;
            digits += 1;
            match magnitude
                .checked_mul(10)
                .and_then(|m| m.checked_add(i128::from(c - b'0')))
            {
                Some(m) if m <= i128::from(u64::MAX) => magnitude = m,
                _ => overflow = true,
            }
        }
        if digits == 0 {
            return self.err(line, "expecting digits after the sign");
        }
        if matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'.' || c == b'_') {
            return self.err(line, "malformed number: only decimal integers are allowed");
        }
        let value = if negative { -magnitude } else { magnitude };
        if overflow || value < i128::from(i64::MIN) {
            return self.err(line, "number out of range");
        }
        Ok(Value::Int(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Value {
        parse(text).unwrap().get("a").unwrap().clone()
    }

    fn err_line(text: &str) -> (usize, String) {
        let e = parse(text).unwrap_err();
        (e.line, e.message)
    }

    #[test]
    fn first_duplicate_wins_and_keys_are_distinct() {
        let c = parse("a = 1\nb = 2\na = 3\n").unwrap();
        assert_eq!(c.get("a"), Some(&Value::Int(1)));
        assert_eq!(c.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.entries().len(), 3);
        assert_eq!(c.line_of("b"), Some(2));
    }

    #[test]
    fn semicolons_separate_statements() {
        let c = parse("a = 1; b = \"x\";c=2;\n  d = 3 ; # done\n").unwrap();
        assert_eq!(c.get("b"), Some(&Value::Str("x".into())));
        assert_eq!(c.get("c"), Some(&Value::Int(2)));
        assert_eq!(c.get("d"), Some(&Value::Int(3)));
    }

    #[test]
    fn backslashes_are_literal() {
        assert_eq!(one(r#"a = "C:\new\t""#), Value::Str(r"C:\new\t".into()));
        assert_eq!(one(r"a = 'x\'"), Value::Str(r"x\".into()));
    }

    #[test]
    fn integers_allow_sign_and_leading_zeros() {
        assert_eq!(one("a = 007"), Value::Int(7));
        assert_eq!(one("a = -5"), Value::Int(-5));
        assert_eq!(one("a = +5"), Value::Int(5));
        assert_eq!(one("a = 18446744073709551615"), Value::Int(u64::MAX.into()));
        assert_eq!(one("a = -9223372036854775808"), Value::Int(i64::MIN.into()));
        assert!(parse("a = 18446744073709551616").is_err());
        assert!(parse("a = -9223372036854775809").is_err());
        assert!(parse("a = 99999999999999999999999999999999999999999999999").is_err());
    }

    #[test]
    fn comments_after_values_and_crlf() {
        let c = parse("# head\r\na = 1 # one\r\n\r\nb = 'x'#c\r\n").unwrap();
        assert_eq!(c.get("a"), Some(&Value::Int(1)));
        assert_eq!(c.get("b"), Some(&Value::Str("x".into())));
    }

    #[test]
    fn multiline_list_with_comments_and_trailing_comma() {
        let c =
            parse("a = [\n  \"x\", # first\n  # between\n  'y',\n]\nb = []\nc = [1,2]").unwrap();
        assert_eq!(
            c.get("a"),
            Some(&Value::List(vec![
                Value::Str("x".into()),
                Value::Str("y".into())
            ]))
        );
        assert_eq!(c.get("b"), Some(&Value::List(vec![])));
        assert_eq!(
            c.get("c"),
            Some(&Value::List(vec![Value::Int(1), Value::Int(2)]))
        );
        assert_eq!(c.line_of("b"), Some(6));
    }

    #[test]
    fn triple_quoted_strings_span_lines() {
        let c =
            parse("a = \"\"\"one\n'two' \"q\"\n\"\"\"\nb = 1\nc = \"\"\"\"\"\"\nd = \"\"").unwrap();
        assert_eq!(c.get("a"), Some(&Value::Str("one\n'two' \"q\"\n".into())));
        assert_eq!(c.line_of("b"), Some(4));
        assert_eq!(c.get("c"), Some(&Value::Str(String::new())));
        assert_eq!(c.get("d"), Some(&Value::Str(String::new())));
    }

    #[test]
    fn booleans_words_are_rejected() {
        for w in ["true", "false", "yes", "no"] {
            let (line, msg) = err_line(&format!("x = 1\na = {w}\n"));
            assert_eq!(line, 2);
            assert!(msg.contains("0 or 1"), "{msg}");
        }
    }

    #[test]
    fn floats_hex_and_underscores_are_rejected() {
        for v in ["1.5", "0x10", "1e3", "1_000", "-", "+", ".5"] {
            assert!(parse(&format!("a = {v}")).is_err(), "{v} accepted");
        }
    }

    #[test]
    fn tables_and_bad_names_are_rejected() {
        let (line, msg) = err_line("a = 1\n[section]\nb = 2\n");
        assert_eq!(line, 2);
        assert!(msg.contains("expecting a name"), "{msg}");
        assert!(parse("a.b = 1").is_err());
        assert!(parse("1a = 1").is_err());
        assert!(parse("a-b = 1").is_err());
        assert!(parse("a = 1 2").is_err());
        assert!(parse("a 1").is_err());
        assert!(parse("a =\n1").is_err());
        assert!(parse("a = [[1]]").is_err());
        assert!(parse("a = [,]").is_err());
        assert!(parse("a = [1 2]").is_err());
    }

    #[test]
    fn unterminated_strings_and_lists_report_their_opening_line() {
        assert_eq!(err_line("a = 1\nb = \"abc\nc = 2\n").0, 2);
        assert_eq!(err_line("a = 1\nb = 'abc").0, 2);
        assert_eq!(err_line("a = 1\n\nb = \"\"\"abc\n\n").0, 3);
        let (line, msg) = err_line("a = 1\nb = [\n \"x\",\n");
        assert_eq!(line, 2);
        assert!(msg.contains("unterminated list"), "{msg}");
        assert_eq!(err_line("a = [\"x\"\n").0, 1);
    }

    #[test]
    fn empty_and_comment_only_inputs_parse() {
        assert_eq!(parse("").unwrap().entries().len(), 0);
        assert_eq!(parse("\n# x\n   \n\t# y").unwrap().entries().len(), 0);
    }

    #[test]
    fn nul_bytes_and_oversized_input_are_rejected() {
        assert!(parse("a = \"x\0y\"").is_err());
        assert!(parse("a\0 = 1").is_err());
        let big = "#".repeat(MAX_INPUT_LEN + 1);
        assert_eq!(parse(&big).unwrap_err().line, 0);
    }

    #[test]
    fn non_ascii_text_in_strings_and_comments_is_kept() {
        let c = parse("# héllo\na = \"ünï ✓\"").unwrap();
        assert_eq!(c.get("a"), Some(&Value::Str("ünï ✓".into())));
        assert!(parse("ä = 1").is_err());
    }

    /// Cheap stand-in for the fuzzer: many pseudo-random inputs built from the
    /// grammar's own characters must never panic.
    #[test]
    fn garbage_never_panics() {
        const ALPHABET: &[&str] = &[
            "a",
            "b_1",
            " ",
            "\t",
            "\n",
            "\r",
            "=",
            ";",
            "#",
            "\"",
            "'",
            "\"\"\"",
            "[",
            "]",
            ",",
            "-",
            "+",
            "0",
            "9",
            "18446744073709551616",
            ".",
            "x",
            "é",
            "\0",
            "true",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut s = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push_str(ALPHABET[(state % ALPHABET.len() as u64) as usize]);
            }
            let _ = parse(&s);
        }
    }
}
