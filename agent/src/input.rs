//! Reading files the agent does not control (configuration, Exosphere's choices, config drive
//! documents): regular files only, opened without blocking and read up to a cap, so a FIFO, a
//! device or a huge file gives a clear error instead of a hang or an exhausted memory.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest configuration file (or Exosphere choices file) read: 1 MiB. A real one is a
/// few hundred bytes; the cap keeps a runaway generator from stalling validation.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// The largest config drive document read: 16 MiB (Nova caps user data at 64 KiB, and the
/// JSON documents are far smaller).
pub const MAX_DRIVE_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Why an input file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A FIFO, socket or device: reading it could block forever or never end.
    #[error("not a regular file (it is a {0})")]
    NotRegular(&'static str),
    /// Bigger than the cap.
    #[error("larger than the limit of {limit} bytes")]
    TooLarge {
        /// The cap, in bytes.
        limit: u64,
    },
    /// Anything the OS reported (missing, permission denied, is a directory, bad UTF-8).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ReadError {
    /// A short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotRegular(_) => "not-regular-file",
            Self::TooLarge { .. } => "file-too-large",
            Self::Io(_) => "unreadable",
        }
    }

    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Read the regular file at `path` as UTF-8, refusing anything else and anything above `limit`
/// bytes. Symlinks are followed.
pub fn read_capped(path: &Path, limit: u64) -> Result<String, ReadError> {
    // O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting; the type
    // is then checked on the opened descriptor, so a swap after the check cannot fool it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_dir() {
        // What read(2) says for a directory, as before this check existed.
        return Err(io::Error::from_raw_os_error(libc::EISDIR).into());
    }
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "FIFO"
        } else if kind.is_socket() {
            "socket"
        } else if kind.is_char_device() {
            "character device"
        } else if kind.is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(ReadError::NotRegular(what));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge { limit });
    }
    // The file may grow after the check: read at most one byte past the cap to notice.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer ever opens it: a blocking open would never return (the test run's own
        // timeout catches that).
        let e = read_capped(&fifo, 100).unwrap_err();
        assert_eq!(e.reason(), "not-regular-file");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn files_above_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, "x".repeat(101)).unwrap();
        let e = read_capped(&path, 100).unwrap_err();
        assert_eq!(e.reason(), "file-too-large");
        assert!(e.to_string().contains("100 bytes"), "{e}");
        std::fs::write(&path, "x".repeat(100)).unwrap();
        assert_eq!(read_capped(&path, 100).unwrap().len(), 100);
    }

    #[test]
    fn devices_directories_and_missing_files_are_told_apart() {
        let e = read_capped(Path::new("/dev/null"), 100).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_capped(dir.path(), 100).unwrap_err();
        assert!(e.to_string().contains("os error 21"), "{e}");
        let e = read_capped(&dir.path().join("none"), 100).unwrap_err();
        assert!(e.is_not_found());
    }
}
