//! The supervision records in a service's run directory: `run.json` (written by the shim once the
//! service is spawned) and `exit.json` (written by the shim once it has ended), both replaced
//! atomically, plus the stable spec hash that decides whether a running service can be adopted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SuperviseError;
use crate::fsutil;

/// File name of the run record inside a run directory.
pub const RUN_FILE: &str = "run.json";
/// File name of the exit record inside a run directory.
pub const EXIT_FILE: &str = "exit.json";

/// `run.json`: who runs the service right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The shim's pid.
    pub shim_pid: u32,
    /// The shim's start time (field 22 of `/proc/<pid>/stat`), guarding against pid reuse.
    pub shim_start_ticks: u64,
    /// The service's main process.
    pub service_pid: u32,
    /// The service main process's start time in clock ticks.
    #[serde(default)]
    pub service_start_ticks: u64,
    /// The service's process group (equal to `service_pid`).
    pub pgid: i32,
    /// [`spec_hash`] of the run spec the service was started from.
    pub spec_hash: String,
    /// When the service was spawned (ms since the epoch).
    pub started_ms: u64,
}

/// `exit.json`: how the last run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status, when the main process exited normally.
    pub code: Option<i32>,
    /// Signal number, when the main process was killed by a signal.
    pub signal: Option<i32>,
    /// When the shim saw the main process end (ms since the epoch).
    pub ended_ms: u64,
    /// The last lines the service wrote to stderr (at most 20, each at most 300 characters).
    pub stderr_tail: Vec<String>,
    /// The main process the record is about (matches `RunRecord::service_pid`).
    #[serde(default)]
    pub service_pid: u32,
    /// Set when the service could not be spawned at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ExitRecord {
    /// How the run ended, in words: `exited with status 3`, `killed by signal 9`.
    pub fn status_text(&self) -> String {
        if let Some(error) = &self.error {
            return error.clone();
        }
        match (self.code, self.signal) {
            (_, Some(signal)) => format!("killed by signal {signal}"),
            (Some(code), None) => format!("exited with status {code}"),
            (None, None) => "ended with an unknown status".to_owned(),
        }
    }

    /// The stderr tail joined by ` | `, cut to at most `max_chars` characters (keeping the end,
    /// which holds the most recent lines). Empty when there is no stderr.
    pub fn tail_text(&self, max_chars: usize) -> String {
        let joined = self
            .stderr_tail
            .iter()
            .map(|l| l.trim_end())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" | ");
        let count = joined.chars().count();
        if count <= max_chars {
            joined
        } else {
            let skip = count - max_chars.saturating_sub(1);
            format!("…{}", joined.chars().skip(skip).collect::<String>())
        }
    }
}

/// A stable 64-bit FNV-1a hash of a serializable value's JSON, as 16 lowercase hex digits.
/// Used for run specs: the JSON of a struct keeps field order, and FNV-1a (unlike
/// `std::hash::DefaultHasher`) is the same in every Rust release, so an upgraded agent still
/// recognises the services an older agent started.
pub fn spec_hash<T: Serialize>(value: &T) -> String {
    // Serializing plain structs of strings and numbers cannot fail; fall back to an empty body
    // (a hash that simply never matches a real one) rather than panic.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    format!("{:016x}", fnv1a64(&bytes))
}

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// Write a record as JSON, atomically.
pub fn write_record<T: Serialize>(path: &Path, record: &T) -> Result<(), SuperviseError> {
    let bytes = serde_json::to_vec(record).map_err(|source| SuperviseError::Record {
        path: path.to_path_buf(),
        source,
    })?;
    // Private: records name pids and spec hashes, nothing anyone else needs.
    fsutil::write_atomic(path, &bytes, 0o600, None).map_err(|source| SuperviseError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Read a record; `Ok(None)` when the file does not exist.
pub fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, SuperviseError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SuperviseError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| SuperviseError::Record {
            path: path.to_path_buf(),
            source,
        })
}

/// Remove a file; a missing file is fine.
pub fn remove_if_exists(path: &Path) -> Result<(), SuperviseError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SuperviseError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `run_dir/run.json`.
pub fn run_file(run_dir: &Path) -> PathBuf {
    run_dir.join(RUN_FILE)
}

/// `run_dir/exit.json`.
pub fn exit_file(run_dir: &Path) -> PathBuf {
    run_dir.join(EXIT_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn spec_hash_is_stable_and_sensitive() {
        #[derive(Serialize)]
        struct S<'a> {
            argv: Vec<&'a str>,
        }
        let a = spec_hash(&S { argv: vec!["a"] });
        assert_eq!(a.len(), 16);
        assert_eq!(a, spec_hash(&S { argv: vec!["a"] }));
        assert_ne!(a, spec_hash(&S { argv: vec!["b"] }));
    }

    #[test]
    fn records_round_trip_atomically_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = run_file(dir.path());
        assert_eq!(read_record::<RunRecord>(&path).unwrap(), None);
        let record = RunRecord {
            shim_pid: 10,
            shim_start_ticks: 11,
            service_pid: 12,
            service_start_ticks: 13,
            pgid: 12,
            spec_hash: "00".into(),
            started_ms: 14,
        };
        write_record(&path, &record).unwrap();
        write_record(&path, &record).unwrap();
        assert_eq!(read_record::<RunRecord>(&path).unwrap(), Some(record));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"{not json").unwrap();
        let err = read_record::<RunRecord>(&path).unwrap_err();
        assert_eq!(err.reason(), "record-invalid");
        assert!(err.to_string().contains("run.json"), "{err}");
    }

    #[test]
    fn exit_texts() {
        let mut exit = ExitRecord {
            code: Some(3),
            signal: None,
            ended_ms: 0,
            stderr_tail: vec!["one".into(), "".into(), "two  ".into()],
            service_pid: 1,
            error: None,
        };
        assert_eq!(exit.status_text(), "exited with status 3");
        assert_eq!(exit.tail_text(400), "one | two");
        assert_eq!(exit.tail_text(4), "…two");
        exit.signal = Some(9);
        exit.code = None;
        assert_eq!(exit.status_text(), "killed by signal 9");
    }
}
