//! The strict key walk: a TOML table read against a list of known keys, every problem reported
//! with file, line and dotted key, and every good value kept with where it was set.
//!
//! A section's keys are a table of [`Key`]s: a key's name and the code that reads it are one
//! entry, so a key cannot be accepted without being read into its own field.

use std::path::Path;

use toml_edit::{ImDocument, Item, TableLike, Value};

use super::error::{ConfigError, ErrorKind};
use super::values::redact_userinfo;

/// Where a value was set: the index of the file in load order and the 1-based line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Index of the file in load order.
    pub file: usize,
    /// The 1-based line, when known.
    pub line: Option<usize>,
}

/// A value together with where it was set.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Where it was set.
    pub origin: Origin,
}

/// The longest interval any `_s` or `_ms` key may ask for: one year. Far beyond any sensible
/// setting, and far from the overflow of timer arithmetic.
pub const MAX_SECONDS: i64 = 365 * 24 * 3600;
/// The longest interval in milliseconds.
pub const MAX_MILLIS: i64 = MAX_SECONDS * 1000;

/// One key of a section: its name, a valid example value (TOML) and how it is read into the
/// section's fragment `F`.
pub struct Key<F> {
    /// The key's name in the table.
    pub name: &'static str,
    /// A valid value, as TOML text, that is not the default: the key-table tests set it and
    /// check that exactly this key's field changed.
    pub example: &'static str,
    /// Reads the value of `field` into its own field of `F` (leaving it as it was on error).
    pub read: fn(&mut Walker<'_>, &Field<'_>, &mut F),
}

impl<F> Clone for Key<F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F> Copy for Key<F> {}

/// Replace `slot` with `value` when the value was good: later files win key by key, and a bad
/// value (already reported) never erases a good earlier one.
pub fn set<T>(slot: &mut Option<Located<T>>, value: Option<Located<T>>) {
    if value.is_some() {
        *slot = value;
    }
}

/// The value of a setting, if a file set it.
pub fn value<T: Clone>(slot: &Option<Located<T>>) -> Option<T> {
    slot.as_ref().map(|l| l.value.clone())
}

/// The most errors kept from one load: past it they are only counted, so a generated file full
/// of mistakes is reported in bounded time and memory.
pub const MAX_ERRORS: usize = 1000;

/// The 1-based line of a byte offset in `text`. Scans the text: for one lookup; a walk over a
/// file uses a [`LineIndex`].
pub fn line_of(text: &str, offset: usize) -> usize {
    LineIndex::new(text).line(offset)
}

/// Where each line of a text starts, found once, so every line lookup is a binary search
/// rather than a rescan of the file (a file with many errors was quadratic).
#[derive(Debug, Clone)]
pub struct LineIndex {
    /// Byte offsets just after each `\n`.
    starts: Vec<usize>,
    len: usize,
}

impl LineIndex {
    /// Index `text`.
    pub fn new(text: &str) -> Self {
        let starts = text
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        Self {
            starts,
            len: text.len(),
        }
    }

    /// The 1-based line of byte `offset` (past the end: the last line).
    pub fn line(&self, offset: usize) -> usize {
        let offset = offset.min(self.len);
        // Lines before `offset` = newlines at positions < offset = starts <= offset.
        self.starts.partition_point(|&start| start <= offset) + 1
    }
}

/// A key as it appears in a dotted path: bare when TOML allows it, quoted otherwise.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// A short description of a TOML item for messages: its type and, for scalars, its value.
fn describe(item: &Item) -> String {
    match item {
        Item::None => "nothing".to_owned(),
        Item::Value(v) => describe_value(v),
        Item::Table(_) => "table".to_owned(),
        Item::ArrayOfTables(_) => "array of tables".to_owned(),
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string {}", quote(s.value())),
        Value::Integer(i) => format!("integer {}", i.value()),
        Value::Float(x) => format!("float {}", x.value()),
        Value::Boolean(b) => format!("boolean {}", b.value()),
        Value::Datetime(d) => format!("datetime {}", d.value()),
        Value::Array(_) => "array".to_owned(),
        Value::InlineTable(_) => "table".to_owned(),
    }
}

/// A string value quoted and escaped for a one-line message, shortened when long. Credentials
/// in a URL's userinfo are masked first: a refused value is echoed to logs and the console.
pub fn quote(s: &str) -> String {
    const MAX: usize = 40;
    let s = &*redact_userinfo(s);
    if s.chars().count() > MAX {
        let short: String = s.chars().take(MAX).collect();
        format!("{short:?}...")
    } else {
        format!("{s:?}")
    }
}

/// One key being read: its dotted path, its line and its item.
pub struct Field<'t> {
    /// The dotted key, e.g. `services.jupyterlab.port`.
    pub path: String,
    /// The 1-based line of the key.
    pub line: Option<usize>,
    /// The value.
    pub item: &'t Item,
}

/// Walks one parsed file, collecting a fragment and every error.
pub struct Walker<'a> {
    index: usize,
    path: &'a Path,
    lines: LineIndex,
    errors: Vec<ConfigError>,
    /// Errors past [`MAX_ERRORS`], counted but not kept.
    omitted: usize,
}

impl Walker<'_> {
    /// The line of a span of this file.
    pub fn line(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        span.map(|s| self.lines.line(s.start))
    }

    /// Report a problem with `field`.
    pub fn error(&mut self, field: &Field<'_>, kind: ErrorKind, message: String) {
        if self.errors.len() >= MAX_ERRORS {
            self.omitted += 1;
            return;
        }
        self.errors.push(ConfigError {
            file: self.path.to_path_buf(),
            line: field.line,
            key: Some(field.path.clone()),
            message,
            kind,
        });
    }

    /// `value`, remembering that `field` set it.
    pub fn located<T>(&self, field: &Field<'_>, value: T) -> Located<T> {
        Located {
            value,
            origin: Origin {
                file: self.index,
                line: field.line,
            },
        }
    }

    /// Report that `field` has the wrong TOML type.
    pub fn wrong_type(&mut self, field: &Field<'_>, expected: &str) {
        let found = describe(field.item);
        self.error(
            field,
            ErrorKind::WrongType,
            format!("invalid type {found}, expected {expected}"),
        );
    }

    /// The entries of a table, each checked against `known`; unknown keys are reported with
    /// `unknown` as their message.
    pub fn entries<'t>(
        &mut self,
        prefix: Option<&str>,
        table: &'t dyn TableLike,
        known: &[&str],
        unknown: &str,
    ) -> Vec<(&'t str, Field<'t>)> {
        let mut out = Vec::new();
        for (key, item) in table.iter() {
            let path = match prefix {
                Some(prefix) => format!("{prefix}.{}", key_segment(key)),
                None => key_segment(key),
            };
            let key_span = table.key(key).and_then(|k| k.span());
            let line = self.line(key_span.or_else(|| item.span()));
            let field = Field { path, line, item };
            if known.contains(&key) {
                out.push((key, field));
            } else {
                self.error(&field, ErrorKind::UnknownKey, unknown.to_owned());
            }
        }
        out
    }

    /// `field` as a table, or a wrong-type error.
    pub fn table<'t>(&mut self, field: &Field<'t>) -> Option<&'t dyn TableLike> {
        match field.item.as_table_like() {
            Some(table) => Some(table),
            None => {
                self.wrong_type(field, "a table");
                None
            }
        }
    }

    /// A boolean key.
    pub fn boolean(&mut self, field: &Field<'_>) -> Option<Located<bool>> {
        match field.item.as_bool() {
            Some(b) => Some(self.located(field, b)),
            None => {
                self.wrong_type(field, "a boolean (true or false)");
                None
            }
        }
    }

    /// An integer key within `range`; `expected` describes the range.
    pub fn integer(
        &mut self,
        field: &Field<'_>,
        range: std::ops::RangeInclusive<i64>,
        expected: &str,
    ) -> Option<Located<i64>> {
        let Some(i) = field.item.as_integer() else {
            self.wrong_type(field, expected);
            return None;
        };
        if range.contains(&i) {
            Some(self.located(field, i))
        } else {
            self.error(
                field,
                ErrorKind::OutOfRange,
                format!("invalid value {i}, expected {expected}"),
            );
            None
        }
    }

    /// An integer key with a minimum (and the type's or the interval cap's maximum).
    pub fn count<T: TryFrom<i64>>(
        &mut self,
        field: &Field<'_>,
        min: i64,
        max: i64,
        unit: &str,
    ) -> Option<Located<T>> {
        let expected = if unit.is_empty() {
            format!("an integer from {min} to {max}")
        } else {
            format!("an integer from {min} to {max} ({unit})")
        };
        let located = self.integer(field, min..=max, &expected)?;
        // The range check above keeps the value inside T for every caller.
        let value = T::try_from(located.value).ok()?;
        Some(Located {
            value,
            origin: located.origin,
        })
    }

    /// A number of seconds, at least `min`, at most a year.
    pub fn seconds(&mut self, field: &Field<'_>, min: i64) -> Option<Located<u64>> {
        self.count(field, min, MAX_SECONDS, "seconds")
    }

    /// A number of milliseconds, at least `min`, at most a year.
    pub fn millis(&mut self, field: &Field<'_>, min: i64) -> Option<Located<u64>> {
        self.count(field, min, MAX_MILLIS, "milliseconds")
    }

    /// A count of at least `min`.
    pub fn u32_at_least(&mut self, field: &Field<'_>, min: i64) -> Option<Located<u32>> {
        self.count(field, min, i64::from(u32::MAX), "")
    }

    /// A TCP port, 1 to 65535.
    pub fn port(&mut self, field: &Field<'_>) -> Option<Located<u16>> {
        let located = self.integer(field, 1..=65535, "a port 1-65535")?;
        let value = u16::try_from(located.value).ok()?;
        Some(Located {
            value,
            origin: located.origin,
        })
    }

    /// An IP address (`bind` of every service that listens).
    pub fn ip_address(&mut self, field: &Field<'_>) -> Option<Located<std::net::IpAddr>> {
        self.parsed(field, "an IP address", |v| v.parse().ok())
    }

    /// An array of IP addresses or CIDR blocks (`trusted_proxies` of the Guacamole web side and
    /// of the TLS front).
    pub fn cidrs(&mut self, field: &Field<'_>) -> Option<Located<Vec<crate::model::Cidr>>> {
        self.parsed_array(
            field,
            "an array of IP addresses or CIDR blocks",
            "an IP address or CIDR block, e.g. \"10.0.0.7\" or \"10.0.0.0/24\"",
            |v| v.parse().ok(),
        )
    }

    /// A service's `start_timeout_s`: 1 to 3600 seconds.
    pub fn start_timeout_s(&mut self, field: &Field<'_>) -> Option<Located<u64>> {
        self.count(field, 1, 3600, "seconds")
    }

    /// An array of strings, each of which must pass `parse`; every bad element is reported
    /// at its own index (`key[2]`). `expected_array` and `expected` describe what is accepted.
    pub fn parsed_array<T>(
        &mut self,
        field: &Field<'_>,
        expected_array: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<Located<Vec<T>>> {
        let Some(array) = field.item.as_array() else {
            self.wrong_type(field, expected_array);
            return None;
        };
        let mut values = Vec::new();
        let mut ok = true;
        for (i, value) in array.iter().enumerate() {
            let item = Item::Value(value.clone());
            let element = Field {
                path: format!("{}[{i}]", field.path),
                line: self.line(value.span()).or(field.line),
                item: &item,
            };
            match self.parsed(&element, expected, &parse) {
                Some(parsed) => values.push(parsed.value),
                None => ok = false,
            }
        }
        ok.then(|| self.located(field, values))
    }

    /// A string key whose text must pass `parse`; `expected` describes what is accepted.
    pub fn parsed<T>(
        &mut self,
        field: &Field<'_>,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<Located<T>> {
        let Some(s) = field.item.as_str() else {
            self.wrong_type(field, expected);
            return None;
        };
        match parse(s) {
            Some(value) => Some(self.located(field, value)),
            None => {
                let shown = quote(s);
                self.error(
                    field,
                    ErrorKind::InvalidValue,
                    format!("invalid value {shown}, expected {expected}"),
                );
                None
            }
        }
    }
}

impl<'a> Walker<'a> {
    /// A walker over the file at position `index` of the load order.
    pub fn new(index: usize, path: &'a Path, text: &'a str) -> Self {
        Self {
            index,
            path,
            lines: LineIndex::new(text),
            errors: Vec::new(),
            omitted: 0,
        }
    }

    /// The problems found so far, sorted by line (tables and dotted keys can make the walk
    /// order differ from the text order).
    pub fn finish(self) -> Vec<ConfigError> {
        self.finish_counted().0
    }

    /// As [`Walker::finish`], with the number of problems found past [`MAX_ERRORS`] and not
    /// kept.
    pub fn finish_counted(self) -> (Vec<ConfigError>, usize) {
        let mut errors = self.errors;
        errors.sort_by_key(|e| e.line);
        (errors, self.omitted)
    }

    /// Read every entry of `table` (at dotted `prefix`) with `keys` into `out`; a key not in
    /// `keys` is an unknown-key error whose message lists the known ones after `context`.
    pub fn section<F>(
        &mut self,
        prefix: &str,
        table: &dyn TableLike,
        keys: &[Key<F>],
        context: &str,
        out: &mut F,
    ) {
        let names: Vec<&str> = keys.iter().map(|k| k.name).collect();
        let unknown = format!("{context}, expected one of: {}", names.join(", "));
        for (name, field) in self.entries(Some(prefix), table, &names, &unknown) {
            if let Some(key) = keys.iter().find(|k| k.name == name) {
                (key.read)(self, &field, out);
            }
        }
    }
}

/// Parse `text` (the file at position `index` of the load order) into a TOML document, or a
/// syntax error.
pub fn parse_document(path: &Path, text: &str) -> Result<ImDocument<String>, ConfigError> {
    ImDocument::parse(text.to_owned()).map_err(|e| {
        let message = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        ConfigError {
            file: path.to_path_buf(),
            line: e.span().map(|s| line_of(text, s.start)),
            key: None,
            message: format!("TOML syntax error: {message}"),
            kind: ErrorKind::Syntax,
        }
    })
}

/// Checks a key table, for tests: every key's example is accepted and changes the fragment,
/// names are unique, and no key writes into another key's field (read after another key, it
/// must leave that key's effect in place). Returns the problems found.
pub fn key_table_problems<F: Default + PartialEq>(section: &str, keys: &[Key<F>]) -> Vec<String> {
    let read = |order: &[&Key<F>]| -> (F, Vec<ConfigError>) {
        let mut fragment = F::default();
        let mut errors = Vec::new();
        for key in order {
            let text = format!("[{section}]\n{} = {}\n", key.name, key.example);
            let doc = match parse_document(Path::new("keys.toml"), &text) {
                Ok(doc) => doc,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let mut walker = Walker::new(0, Path::new("keys.toml"), &text);
            if let Some(table) = doc.as_table().get(section).and_then(Item::as_table_like) {
                walker.section(section, table, keys, "unknown key", &mut fragment);
            }
            errors.extend(walker.finish());
        }
        (fragment, errors)
    };
    let mut problems = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if keys[..i].iter().any(|k| k.name == key.name) {
            problems.push(format!("{} is listed twice", key.name));
        }
        let (alone, errors) = read(&[key]);
        if let Some(e) = errors.first() {
            problems.push(format!("{}: example refused: {e}", key.name));
        }
        if alone == F::default() {
            problems.push(format!("{}: reading it changes nothing", key.name));
        }
        for other in keys.iter().filter(|k| k.name != key.name) {
            if read(&[other, key]).0 == alone {
                problems.push(format!("{} overwrites what {} set", key.name, other.name));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based() {
        let text = "a\nb\nc";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 2), 2);
        assert_eq!(line_of(text, 4), 3);
        assert_eq!(line_of(text, 99), 3);
    }

    #[test]
    fn the_line_index_agrees_with_a_scan() {
        let text = "a\n\nbc\nd\n";
        let index = LineIndex::new(text);
        for offset in 0..text.len() + 3 {
            let end = offset.min(text.len());
            let scanned = text[..end].matches('\n').count() + 1;
            assert_eq!(index.line(offset), scanned, "offset {offset}");
        }
        assert_eq!(LineIndex::new("").line(0), 1);
    }

    #[test]
    fn errors_past_the_cap_are_counted_not_kept() {
        let text = "x = 1\n".repeat(MAX_ERRORS + 5);
        let mut w = Walker::new(0, Path::new("a.toml"), &text);
        let item = Item::None;
        for line in 0..MAX_ERRORS + 5 {
            let field = Field {
                path: "x".into(),
                line: Some(line + 1),
                item: &item,
            };
            w.error(&field, ErrorKind::UnknownKey, "unknown".into());
        }
        let (errors, omitted) = w.finish_counted();
        assert_eq!(errors.len(), MAX_ERRORS);
        assert_eq!(omitted, 5);
    }

    #[test]
    fn credentials_in_refused_values_are_masked() {
        let shown = quote("http://user:hunter2@example.org:8775/x");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("user"), "{shown}");
        assert!(shown.contains("***@example.org"), "{shown}");
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        assert_eq!(key_segment("port"), "port");
        assert_eq!(key_segment("a b"), "\"a b\"");
        assert_eq!(key_segment("a\nb"), "\"a\\nb\"");
    }
}
