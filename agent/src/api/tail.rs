//! Reading the last lines of a log with bounded memory: blocks from the end, never the whole file.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

const BLOCK: u64 = 64 * 1024;

/// The last `lines` lines of `path` (at most `max_bytes` of them), or `None` when it does not
/// exist. A final line without a newline counts as a line.
pub fn tail_lines(path: &Path, lines: usize, max_bytes: u64) -> io::Result<Option<Vec<u8>>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if lines == 0 {
        return Ok(Some(Vec::new()));
    }
    let len = file.metadata()?.len();
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    // Newlines needed: the one ending the line before the first we keep, plus one per kept
    // line except a last line without a newline.
    let wanted = lines + usize::from(ends_with_newline(&mut file, len)?);
    loop {
        if count_newlines(&buf) >= wanted || start == 0 || buf.len() as u64 >= max_bytes {
            break;
        }
        let step = BLOCK.min(start);
        start -= step;
        file.seek(SeekFrom::Start(start))?;
        let mut block = vec![0u8; step as usize];
        file.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
    }
    Ok(Some(last_lines(&buf, lines, max_bytes)))
}

fn ends_with_newline(file: &mut File, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut byte = [0u8; 1];
    file.read_exact(&mut byte)?;
    Ok(byte[0] == b'\n')
}

fn count_newlines(buf: &[u8]) -> usize {
    buf.iter().filter(|&&b| b == b'\n').count()
}

/// The last `lines` lines of `buf`, cut to at most `max_bytes` from the end (on a line start
/// where possible).
fn last_lines(buf: &[u8], lines: usize, max_bytes: u64) -> Vec<u8> {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let mut seen = 0;
    let mut cut = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == lines {
                cut = i + 1;
                break;
            }
        }
    }
    let mut out = buf[cut..].to_vec();
    if out.len() as u64 > max_bytes {
        let drop = out.len() - max_bytes as usize;
        let start = out[drop..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(drop, |p| drop + p + 1);
        out.drain(..start);
    }
    out
}

/// How many lines `text` holds (a final line without a newline counts).
pub fn line_count(text: &[u8]) -> usize {
    let newlines = count_newlines(text);
    if text.last().is_some_and(|&b| b != b'\n') {
        newlines + 1
    } else {
        newlines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(content: &str, lines: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, content).unwrap();
        String::from_utf8(tail_lines(&path, lines, 1 << 20).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn tails_count_lines_from_the_end() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\nb\nc\n", 10), "a\nb\nc\n");
        assert_eq!(tail("", 3), "");
        assert_eq!(tail("a\n", 0), "");
    }

    #[test]
    fn tails_span_blocks() {
        let content: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&content, 3), "line 49997\nline 49998\nline 49999\n");
        let many = tail(&content, 20_000);
        assert_eq!(line_count(many.as_bytes()), 20_000);
        assert!(many.starts_with("line 30000\n"));
    }

    #[test]
    fn a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(tail_lines(&dir.path().join("nope"), 5, 100)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_byte_cap_bounds_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let content: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &content).unwrap();
        let out = tail_lines(&path, 10_000, 1000).unwrap().unwrap();
        assert!(out.len() <= 1000);
        assert!(out.ends_with(b"line 9999\n"));
        assert!(out.starts_with(b"line "));
    }
}
