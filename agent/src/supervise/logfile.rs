//! The capped service log written by the shim: one file (mode 0640, append), rotated to
//! `<log>.1` when the next write would pass the cap, and the in-memory stderr tail.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How many stderr lines the tail keeps.
pub const TAIL_LINES: usize = 20;
/// How many characters of each stderr line the tail keeps.
pub const TAIL_LINE_CHARS: usize = 300;

/// An append-only log file with a size cap and one rotated copy.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl RotatingLog {
    /// Open (or create) the log at `path`, rotating once it would grow past `max_bytes`.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            file,
            size,
        })
    }

    /// The rotated copy's path: `<log>.1`.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self, now_ms: u64) -> io::Result<()> {
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        let banner = format!("[exoagent] log rotated at {now_ms}\n");
        self.file.write_all(banner.as_bytes())?;
        self.size = banner.len() as u64;
        Ok(())
    }

    /// Append one chunk (normally one whole line), rotating first when the chunk would take the
    /// file past the cap. A chunk is never split, so a file can pass the cap by at most one chunk.
    pub fn write_chunk(&mut self, chunk: &[u8], now_ms: u64) -> io::Result<()> {
        if self.size > 0 && self.size + chunk.len() as u64 > self.max_bytes {
            self.rotate(now_ms)?;
        }
        self.file.write_all(chunk)?;
        self.size += chunk.len() as u64;
        Ok(())
    }
}

/// The last [`TAIL_LINES`] stderr lines, each cut to [`TAIL_LINE_CHARS`] characters.
#[derive(Debug, Default)]
pub struct StderrTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl StderrTail {
    /// Feed bytes as read from the pipe (lines may arrive in pieces).
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.finish_line();
            } else if self.partial.len() < TAIL_LINE_CHARS * 4 {
                self.partial.push(b);
            }
        }
    }

    fn finish_line(&mut self) {
        let text = String::from_utf8_lossy(&self.partial);
        let line: String = text
            .trim_end_matches('\r')
            .chars()
            .take(TAIL_LINE_CHARS)
            .collect();
        self.partial.clear();
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The kept lines, oldest first, including an unterminated last line.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            let text = String::from_utf8_lossy(&self.partial);
            if out.len() == TAIL_LINES {
                out.remove(0);
            }
            out.push(text.chars().take(TAIL_LINE_CHARS).collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_when_the_next_line_would_pass_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut log = RotatingLog::open(&path, 100).unwrap();
        let line = b"0123456789012345678\n"; // 20 bytes
        for _ in 0..5 {
            log.write_chunk(line, 7).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
        assert!(!RotatingLog::rotated_path(&path).exists());
        log.write_chunk(line, 7).unwrap();
        let old = std::fs::read(RotatingLog::rotated_path(&path)).unwrap();
        assert_eq!(old.len(), 100);
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(new, "[exoagent] log rotated at 7\n0123456789012345678\n");
        // Reopening continues from the current size.
        drop(log);
        let mut log = RotatingLog::open(&path, 100).unwrap();
        for _ in 0..10 {
            log.write_chunk(line, 8).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        let old = std::fs::read_to_string(RotatingLog::rotated_path(&path)).unwrap();
        assert!(old.len() <= 100, "{}", old.len());
    }

    #[test]
    fn oversized_chunk_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut log = RotatingLog::open(&path, 10).unwrap();
        log.write_chunk(&[b'x'; 50], 1).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 50);
    }

    #[test]
    fn tail_keeps_last_lines_truncated() {
        let mut tail = StderrTail::default();
        for i in 0..30 {
            tail.feed(format!("line {i}\n").as_bytes());
        }
        tail.feed(&[b'y'; 1000]);
        tail.feed(b"\npart");
        tail.feed(b"ial");
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 12");
        assert_eq!(lines[18].len(), TAIL_LINE_CHARS);
        assert_eq!(lines[19], "partial");
    }
}
