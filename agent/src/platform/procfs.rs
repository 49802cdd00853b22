//! Process identity from `/proc/<pid>/stat`: the start time in clock ticks (field 22), which
//! together with the pid names one process for its whole life and guards against pid reuse.

use std::path::PathBuf;

/// The parts of `/proc/<pid>/stat` that supervision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: the one-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Field 5: the process group id.
    pub pgrp: i32,
    /// Field 22: when the process started, in clock ticks after boot.
    pub start_ticks: u64,
}

/// Parse the text of a `/proc/<pid>/stat` file. The command name (field 2) is in parentheses and
/// may itself contain spaces and parentheses, so fields are counted after the LAST `)`.
/// `None` when the text is not shaped like a stat line.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let close = text.rfind(')')?;
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    // `rest` starts at field 3 (state).
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgrp = rest.next()?.parse().ok()?;
    // Fields 6..=21 are skipped; field 22 is the 17th item after field 5.
    let start_ticks = rest.nth(16)?.parse().ok()?;
    Some(ProcStat {
        state,
        pgrp,
        start_ticks,
    })
}

fn stat_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/stat"))
}

/// Read and parse `/proc/<pid>/stat`; `None` when the process does not exist (or the file is not
/// readable or not understood).
pub fn read_stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(stat_path(pid)).ok()?;
    parse_stat(&text)
}

/// The start ticks of a running process, `None` when it does not exist.
pub fn start_ticks(pid: u32) -> Option<u64> {
    read_stat(pid).map(|s| s.start_ticks)
}

/// `ticks` (a start time from `/proc/<pid>/stat`) as seconds since boot; `None` when the clock
/// tick rate is unknown.
pub fn ticks_as_seconds(ticks: u64) -> Option<f64> {
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

/// Whether the process `pid` that started at `start_ticks` is still running (exists, is the same
/// process, and is not a zombie waiting to be reaped).
pub fn is_alive(pid: u32, start_ticks: u64) -> bool {
    match read_stat(pid) {
        Some(stat) => stat.start_ticks == start_ticks && !matches!(stat.state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_stat_line() {
        let line = "1234 (python3) S 1 1234 1234 0 -1 4194560 1000 0 0 0 12 3 0 0 20 0 1 0 \
                    987654 12345678 2000 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 \
                    17 1 0 0 0 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 1234);
        assert_eq!(stat.start_ticks, 987654);
    }

    #[test]
    fn parses_command_names_with_spaces_and_parentheses() {
        let line = "42 (evil) (name Z 9) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.state, 'R');
        assert_eq!(stat.pgrp, 77);
        assert_eq!(stat.start_ticks, 555);
    }

    #[test]
    fn rejects_malformed_lines() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("42 (short) S 1 2"), None);
        assert_eq!(
            parse_stat("42 (x) S 1 x 3 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5"),
            None
        );
    }

    #[test]
    fn own_process_is_alive_and_matches_real_proc() {
        let me = std::process::id();
        let ticks = start_ticks(me).unwrap();
        assert!(is_alive(me, ticks));
        assert!(!is_alive(me, ticks + 1));
        assert_eq!(read_stat(me).unwrap().pgrp, nix::unistd::getpgrp().as_raw());
    }

    #[test]
    fn reaped_child_is_not_alive_and_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait until it has exited but is not reaped yet: a zombie.
        let ticks = loop {
            match read_stat(pid) {
                Some(s) if s.state == 'Z' => break s.start_ticks,
                Some(_) => std::thread::yield_now(),
                None => panic!("child vanished before being reaped"),
            }
        };
        assert!(!is_alive(pid, ticks));
        child.wait().unwrap();
        assert!(!is_alive(pid, ticks));
        assert_eq!(read_stat(0), None);
    }
}
