//! The configuration schema toolkit: the strict key walk over TOML (file, line and dotted key in
//! every error), the checks across values, and value parsers shared by sections. The generic
//! loader (`config`) and every service's own section (`services::<name>::settings`) are built
//! on it; it knows no section itself.

mod check;
mod error;
pub mod values;
mod walk;

pub use check::Checker;
pub use error::{ConfigError, ConfigErrors, ErrorKind};
pub use walk::{
    key_table_problems, line_of, parse_document, quote, set, value, Field, Key, LineIndex, Located,
    Origin, Walker, MAX_ERRORS, MAX_MILLIS, MAX_SECONDS,
};
