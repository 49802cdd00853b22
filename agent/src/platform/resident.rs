//! Trimming a long-running process's resident set after its start-up: the pages of its own
//! executable that only the start-up touched (configuration, planning, installing) stay mapped
//! and counted in its RSS for as long as it runs. [`release_executable_pages`] unmaps them from
//! the process (`madvise(MADV_DONTNEED)`); they stay in the page cache, and a page needed again
//! is mapped back on its next use (a minor fault, no disk read while it is cached).
//!
//! Only mappings of the executable that hold the file's bytes unchanged are released: the
//! read-only ones with no private (copied-on-write) page, as `/proc/self/smaps` reports. A
//! relocated read-only region (RELRO: written by the loader, then made read-only) has private
//! pages and is left alone, as is everything writable: dropping those would lose their contents.

use std::path::Path;

/// One mapping of `/proc/self/smaps`, as far as this module needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    /// Private pages (copied on write or never file-backed), kB.
    anonymous_kb: u64,
}

/// Release the executable's unchanged read-only pages from this process's resident set;
/// returns how many bytes of mappings were released.
pub fn release_executable_pages() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for mapping in releasable(&parse_smaps(&smaps), &exe) {
        let length = mapping.end - mapping.start;
        // SAFETY: the range is one whole mapping of this process (from smaps, read just now) of
        // the executable file, readable, never writable, and without a single private page: its
        // contents are exactly the file's, so dropping the pages loses nothing (the next access
        // maps the file's page again). No Rust reference can be invalidated by that.
        let rc = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                length,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            released += length;
        }
    }
    Ok(released)
}

/// The mappings of `exe` that hold its bytes unchanged: readable, not writable, no private page.
fn releasable<'a>(mappings: &'a [Mapping], exe: &'a Path) -> impl Iterator<Item = &'a Mapping> {
    let exe = exe.to_string_lossy();
    mappings.iter().filter(move |m| {
        m.path == exe
            && m.perms.starts_with('r')
            && !m.perms.contains('w')
            && m.anonymous_kb == 0
            && m.end > m.start
    })
}

/// The mappings in `smaps` text (a header line per mapping, then `Key: value kB` lines).
fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            let perms = fields.next().unwrap_or("").to_owned();
            // offset, device, inode, then the path (which may hold spaces).
            let path = fields.skip(3).collect::<Vec<_>>().join(" ");
            out.push(Mapping {
                start,
                end,
                perms,
                path,
                // Unknown until its Anonymous line: counted as private meanwhile.
                anonymous_kb: u64::MAX,
            });
        } else if first == "Anonymous:" {
            if let Some(last) = out.last_mut() {
                last.anonymous_kb = fields
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 42 /usr/bin/exoagent
Size:               1024 kB
Anonymous:             0 kB
55d0c0100000-55d0c0600000 r-xp 00100000 fd:01 42 /usr/bin/exoagent
Size:               5120 kB
Anonymous:             0 kB
55d0c0600000-55d0c0700000 r--p 00600000 fd:01 42 /usr/bin/exoagent
Size:               1024 kB
Anonymous:            64 kB
55d0c0700000-55d0c0710000 rw-p 00700000 fd:01 42 /usr/bin/exoagent
Size:                 64 kB
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1024 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
7f0000400000-7f0000500000 r--p 00000000 fd:01 43 /tmp/a file with spaces
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_unchanged_read_only_mappings_are_released() {
        let mappings = parse_smaps(SMAPS);
        assert_eq!(mappings.len(), 7);
        assert_eq!(mappings[6].path, "/tmp/a file with spaces");
        let chosen: Vec<(usize, &str)> = releasable(&mappings, Path::new("/usr/bin/exoagent"))
            .map(|m| (m.start, m.perms.as_str()))
            .collect();
        // The RELRO region (private pages) and the writable data are left alone.
        assert_eq!(
            chosen,
            [(0x55d0_c000_0000, "r--p"), (0x55d0_c010_0000, "r-xp")]
        );
        // A mapping whose Anonymous line is missing counts as private.
        let cut =
            parse_smaps("55d0c0000000-55d0c0100000 r--p 00000000 fd:01 42 /usr/bin/exoagent\n");
        assert_eq!(releasable(&cut, Path::new("/usr/bin/exoagent")).count(), 0);
    }

    #[test]
    fn releasing_the_test_binarys_pages_keeps_it_running() {
        let released = release_executable_pages().unwrap();
        assert!(released > 0, "nothing released");
        // Code and read-only data (this test's, the parser's, the formatter's) are mapped back
        // on use.
        assert_eq!(format!("{}", parse_smaps(SMAPS).len()), "7");
        assert!(release_executable_pages().unwrap() > 0);
    }
}
