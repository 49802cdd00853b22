//! Configuration errors: each one names the file, the line and the dotted key it is about, and
//! a load reports all of them at once.

use std::fmt;
use std::path::PathBuf;

/// What kind of mistake a [`ConfigError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A file or directory could not be read (permission denied, is a directory, bad UTF-8).
    Unreadable,
    /// The file is not valid TOML.
    Syntax,
    /// A key (or a service name) that exoagent does not know.
    UnknownKey,
    /// A value of the wrong TOML type (`port = "x"`).
    WrongType,
    /// A number outside its allowed range (`port = 70000`).
    OutOfRange,
    /// A value of the right type that is not acceptable (`bind = "nope"`).
    InvalidValue,
    /// A service that this version of exoagent cannot set up was enabled.
    Unavailable,
    /// Values that are fine alone but not together (two services on one port).
    Conflict,
}

impl ErrorKind {
    /// A short stable kebab-case name for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::Syntax => "syntax",
            Self::UnknownKey => "unknown-key",
            Self::WrongType => "wrong-type",
            Self::OutOfRange => "out-of-range",
            Self::InvalidValue => "invalid-value",
            Self::Unavailable => "unavailable",
            Self::Conflict => "conflict",
        }
    }
}

/// One problem in the configuration, located as precisely as the input allows.
///
/// Displays as `FILE:LINE: KEY: MESSAGE`, leaving out the line or key when unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or directory) the problem is in.
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The dotted key, such as `services.jupyterlab.port`, when the problem is about one.
    pub key: Option<String>,
    /// What is wrong, on one line.
    pub message: String,
    /// The class of problem.
    pub kind: ErrorKind,
}

impl ConfigError {
    /// The short stable reason for status reports.
    pub fn reason(&self) -> &'static str {
        "config-invalid"
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found while loading the configuration (never empty when returned as an error),
/// up to [`super::MAX_ERRORS`]; the rest are only counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The problems, file by file in load order, then the checks across files.
    pub errors: Vec<ConfigError>,
    /// How many more problems were found but not listed.
    pub omitted: usize,
}

impl ConfigErrors {
    /// The short stable reason for status reports, tags and console lines.
    pub fn reason(&self) -> &'static str {
        "config-invalid"
    }

    /// The closing line that says how many problems were not listed, when some were not.
    pub fn omitted_line(&self) -> Option<String> {
        (self.omitted > 0).then(|| {
            format!(
                "... and {} more errors not listed (only the first {} are shown)",
                self.omitted,
                super::MAX_ERRORS
            )
        })
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        if let Some(line) = self.omitted_line() {
            write!(f, "\n{line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
