//! Checks across values after the merge: each problem reported at the file and line that set
//! the winning value.

use std::path::PathBuf;

use super::error::{ConfigError, ErrorKind};
use super::walk::Origin;

/// Turns origins into error locations and collects the problems.
pub struct Checker<'a> {
    files: &'a [PathBuf],
    errors: Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    /// A checker for values set by `files` (in load order).
    pub fn new(files: &'a [PathBuf]) -> Self {
        Self {
            files,
            errors: Vec::new(),
        }
    }

    fn file(&self, origin: Origin) -> PathBuf {
        self.files.get(origin.file).cloned().unwrap_or_default()
    }

    /// `FILE:LINE` (or `FILE`) of `origin`, for messages that point at another value.
    pub fn at(&self, origin: Origin) -> String {
        match origin.line {
            Some(line) => format!("{}:{line}", self.file(origin).display()),
            None => self.file(origin).display().to_string(),
        }
    }

    /// Report a problem with the value of `key` set at `origin`.
    pub fn error(&mut self, origin: Origin, key: String, kind: ErrorKind, message: String) {
        self.errors.push(ConfigError {
            file: self.file(origin),
            line: origin.line,
            key: Some(key),
            message,
            kind,
        });
    }

    /// The problems found.
    pub fn finish(self) -> Vec<ConfigError> {
        self.errors
    }
}
