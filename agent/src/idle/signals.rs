//! What the machine shows of people using it, read from the kernel's files: CPU time
//! (`/proc/stat`), disk traffic (`/proc/diskstats`, physical disks only), network traffic
//! (`/proc/net/dev`, loopback left out), established TCP connections on given ports
//! (`/proc/net/tcp{,6}`), processes by name (`/proc/<pid>/comm`) and logins (utmp's
//! `USER_PROCESS` records whose process lives, with when their terminal was last typed at).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Largest kernel file read (a `/proc/net/tcp` with many thousands of sockets is cut there).
const MAX_PROC_BYTES: u64 = 4 << 20;

/// The glibc `struct utmp` on Linux (every 64-bit and 32-bit ABI but x32): 384 bytes.
const UTMP_RECORD: usize = 384;

/// `ut_type` of a logged-in user's session.
const USER_PROCESS: i16 = 7;

/// Cumulative counters at one moment; two of them make rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// CPU time spent busy, all CPUs (USER_HZ ticks).
    pub cpu_busy: u64,
    /// CPU time in all, all CPUs (USER_HZ ticks).
    pub cpu_total: u64,
    /// Bytes read and written on physical disks.
    pub disk_bytes: u64,
    /// Bytes received and sent on every interface but loopback.
    pub network_bytes: u64,
}

/// Rates between two [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Busy share of CPU time, percent of all CPUs.
    pub cpu_percent: f64,
    /// Disk traffic, KiB per second.
    pub disk_kib_per_s: f64,
    /// Network traffic, KiB per second.
    pub network_kib_per_s: f64,
}

impl Counters {
    /// The rates from `earlier` to `self`, `elapsed` apart (counters that went backwards, as
    /// after a device's removal, count as no traffic).
    pub fn rates_since(&self, earlier: &Counters, elapsed: Duration) -> Rates {
        let secs = elapsed.as_secs_f64().max(0.001);
        let total = self.cpu_total.saturating_sub(earlier.cpu_total);
        let busy = self.cpu_busy.saturating_sub(earlier.cpu_busy);
        let kib_per_s = |now: u64, then: u64| now.saturating_sub(then) as f64 / 1024.0 / secs;
        Rates {
            cpu_percent: if total == 0 {
                0.0
            } else {
                busy as f64 * 100.0 / total as f64
            },
            disk_kib_per_s: kib_per_s(self.disk_bytes, earlier.disk_bytes),
            network_kib_per_s: kib_per_s(self.network_bytes, earlier.network_bytes),
        }
    }
}

/// Reads the kernel's files under a root (`/`, or a directory standing in for it in tests).
#[derive(Debug, Clone)]
pub struct HostReader {
    root: PathBuf,
}

impl HostReader {
    /// Read the files under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// A kernel file's text, at most [`MAX_PROC_BYTES`] of it (whole lines are parsed; a cut
    /// last line reads as garbage and is skipped).
    fn read(&self, relative: &str) -> Option<String> {
        use std::io::Read;
        let file = std::fs::File::open(self.root.join(relative)).ok()?;
        let mut bytes = Vec::new();
        file.take(MAX_PROC_BYTES).read_to_end(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The counters now; a file that cannot be read counts as zero for its part.
    pub fn counters(&self) -> Counters {
        let (cpu_busy, cpu_total) = self
            .read("proc/stat")
            .and_then(|text| cpu_times(&text))
            .unwrap_or_default();
        let disks = self.physical_disks();
        let disk_bytes = self
            .read("proc/diskstats")
            .map(|text| disk_bytes(&text, &disks))
            .unwrap_or_default();
        let network_bytes = self
            .read("proc/net/dev")
            .map(|text| network_bytes(&text))
            .unwrap_or_default();
        Counters {
            cpu_busy,
            cpu_total,
            disk_bytes,
            network_bytes,
        }
    }

    /// Block devices backed by hardware (`/sys/block/<name>/device` exists): loop, RAM, zram
    /// and device-mapper devices are left out, so traffic is not counted twice.
    fn physical_disks(&self) -> HashSet<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("sys/block")) else {
            return HashSet::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.path().join("device").exists())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect()
    }

    /// Established TCP connections with either end on one of `ports`.
    pub fn connections_on(&self, ports: &[u16]) -> usize {
        if ports.is_empty() {
            return 0;
        }
        ["proc/net/tcp", "proc/net/tcp6"]
            .iter()
            .filter_map(|file| self.read(file))
            .map(|text| established_on(&text, ports))
            .sum()
    }

    /// Whether a process named `name` runs.
    pub fn process_runs(&self, name: &str) -> bool {
        let Ok(entries) = std::fs::read_dir(self.root.join("proc")) else {
            return false;
        };
        entries.flatten().any(|entry| {
            let is_pid = entry
                .file_name()
                .to_str()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            is_pid
                && std::fs::read(entry.path().join("comm"))
                    .is_ok_and(|comm| comm.strip_suffix(b"\n").unwrap_or(&comm) == name.as_bytes())
        })
    }

    /// Logins whose process lives and whose terminal was typed at within `within` of `now`
    /// (a terminal that cannot be looked at counts as typed at: the login is not ignored).
    pub fn recent_logins(&self, now: SystemTime, within: Duration) -> usize {
        let Ok(bytes) = std::fs::read(self.root.join("run/utmp")) else {
            return 0;
        };
        user_sessions(&bytes)
            .into_iter()
            .filter(|session| self.root.join(format!("proc/{}", session.pid)).exists())
            .filter(|session| {
                let Some(tty) = terminal_path(&session.line) else {
                    return true;
                };
                match std::fs::metadata(self.root.join(tty)).and_then(|m| m.accessed()) {
                    Ok(typed) => now.duration_since(typed).unwrap_or_default() < within,
                    Err(_) => true,
                }
            })
            .count()
    }
}

/// Busy and total CPU ticks from `/proc/stat`'s first line (`cpu user nice system idle iowait
/// irq softirq steal …`; guest time is already inside user time).
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if fields.len() < 4 {
        return None;
    }
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some((busy, busy + idle))
}

/// Bytes read and written on `disks` from `/proc/diskstats` (sectors are 512 bytes there
/// whatever the device's own sector size).
fn disk_bytes(diskstats: &str, disks: &HashSet<String>) -> u64 {
    diskstats
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = fields.get(2)?;
            if !disks.contains(*name) {
                return None;
            }
            let read: u64 = fields.get(5)?.parse().ok()?;
            let written: u64 = fields.get(9)?.parse().ok()?;
            Some((read + written) * 512)
        })
        .sum()
}

/// Bytes received and sent on every interface but `lo` from `/proc/net/dev`.
fn network_bytes(dev: &str) -> u64 {
    dev.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            if name.trim() == "lo" {
                return None;
            }
            let fields: Vec<u64> = counters
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            Some(fields.first()? + fields.get(8)?)
        })
        .sum()
}

/// Established sockets (state `01`) with either address's port in `ports`, from one
/// `/proc/net/tcp` or `tcp6` table (`sl local rem st …`, addresses `HEX:PORT`).
fn established_on(table: &str, ports: &[u16]) -> usize {
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state)) =
                (fields.get(1), fields.get(2), fields.get(3))
            else {
                return false;
            };
            *state == "01"
                && [port(local), port(remote)]
                    .iter()
                    .flatten()
                    .any(|p| ports.contains(p))
        })
        .count()
}

/// One login from utmp.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UserSession {
    pid: i32,
    line: String,
}

/// The `USER_PROCESS` records of a utmp file (`ut_type` at 0, `ut_pid` at 4, `ut_line` at 8,
/// 32 bytes); a short last record is ignored.
fn user_sessions(utmp: &[u8]) -> Vec<UserSession> {
    utmp.chunks_exact(UTMP_RECORD)
        .filter(|record| i16::from_ne_bytes([record[0], record[1]]) == USER_PROCESS)
        .map(|record| {
            let pid = i32::from_ne_bytes([record[4], record[5], record[6], record[7]]);
            let line = &record[8..40];
            let end = line.iter().position(|&b| b == 0).unwrap_or(line.len());
            UserSession {
                pid,
                line: String::from_utf8_lossy(&line[..end]).into_owned(),
            }
        })
        .filter(|session| session.pid > 0)
        .collect()
}

/// `dev/<line>` for a utmp line such as `pts/3` or `tty1`; none for a line that could lead
/// elsewhere (`..`, absolute) or is empty.
fn terminal_path(line: &str) -> Option<String> {
    let safe = !line.is_empty()
        && !line.starts_with('/')
        && line
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    safe.then(|| format!("dev/{line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_iowait_as_idle_and_steal_as_busy() {
        let stat = "cpu  100 5 50 800 40 3 2 10 7 0\ncpu0 1 2 3 4\nintr 1\n";
        assert_eq!(cpu_times(stat), Some((170, 1010)));
        assert_eq!(cpu_times("nothing\n"), None);
        let earlier = Counters {
            cpu_busy: 100,
            cpu_total: 1000,
            ..Counters::default()
        };
        let later = Counters {
            cpu_busy: 150,
            cpu_total: 1200,
            disk_bytes: 2048,
            network_bytes: 10 * 1024,
        };
        let rates = later.rates_since(&earlier, Duration::from_secs(2));
        assert_eq!(rates.cpu_percent, 25.0);
        assert_eq!(rates.disk_kib_per_s, 1.0);
        assert_eq!(rates.network_kib_per_s, 5.0);
        // Counters going backwards (a device removed) are no traffic, not a wrap-around.
        let rates = earlier.rates_since(&later, Duration::from_secs(1));
        assert_eq!(rates.disk_kib_per_s, 0.0);
    }

    #[test]
    fn disk_traffic_counts_only_the_listed_disks_in_512_byte_sectors() {
        let stats = "   7       0 loop0 13403 3559 589790 706 2172 1143 1053341 652 0 684\n \
                     253       0 vda 100 0 8 10 50 0 4 20 0 30\n \
                     253       1 vda1 100 0 8 10 50 0 4 20 0 30\n";
        let disks: HashSet<String> = ["vda".to_owned()].into();
        assert_eq!(disk_bytes(stats, &disks), 12 * 512);
    }

    #[test]
    fn network_traffic_leaves_loopback_out() {
        let dev = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n    \
                   lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
                   eth0: 300 3 0 0 0 0 0 0 200 2 0 0 0 0 0 0\n";
        assert_eq!(network_bytes(dev), 500);
    }

    #[test]
    fn established_connections_match_either_port_and_nothing_else() {
        let table = "  sl  local_address rem_address   st tx_queue\n   \
            0: 0100007F:12D6 00000000:0000 0A 0\n   \
            1: 0100007F:12D6 0100007F:9C40 01 0\n   \
            2: 0100007F:9C40 0100007F:12D6 01 0\n   \
            3: 0100007F:170D 0100007F:9C41 06 0\n   \
            4: 0100007F:0016 0100007F:9C42 01 0\n";
        // 0x12D6 = 4822 (guacd), 0x170D = 5901 (a VNC display), 0x16 = 22.
        assert_eq!(established_on(table, &[4822]), 2);
        assert_eq!(
            established_on(table, &[5901]),
            0,
            "TIME_WAIT is not a session"
        );
        assert_eq!(established_on(table, &[4822, 22]), 3);
        assert_eq!(established_on("garbage\nmore garbage\n", &[4822]), 0);
    }

    fn utmp_record(kind: i16, pid: i32, line: &str) -> Vec<u8> {
        let mut record = vec![0u8; UTMP_RECORD];
        record[0..2].copy_from_slice(&kind.to_ne_bytes());
        record[4..8].copy_from_slice(&pid.to_ne_bytes());
        record[8..8 + line.len()].copy_from_slice(line.as_bytes());
        record
    }

    #[test]
    fn logins_are_live_user_processes_typed_at_recently() {
        let root = tempfile::tempdir().unwrap();
        let mut utmp = utmp_record(2, 0, "~"); // BOOT_TIME
        utmp.extend(utmp_record(USER_PROCESS, 4242, "pts/0"));
        utmp.extend(utmp_record(USER_PROCESS, 4243, "pts/1"));
        utmp.extend(utmp_record(USER_PROCESS, 4244, "tty1"));
        utmp.extend(utmp_record(8, 4245, "pts/2")); // DEAD_PROCESS
        utmp.extend(utmp_record(USER_PROCESS, 4246, "../etc/passwd"));
        utmp.extend([0u8; 100]); // a short tail
        std::fs::create_dir_all(root.path().join("run")).unwrap();
        std::fs::write(root.path().join("run/utmp"), &utmp).unwrap();
        for pid in [4242, 4243, 4245, 4246] {
            std::fs::create_dir_all(root.path().join(format!("proc/{pid}"))).unwrap();
        }
        std::fs::create_dir_all(root.path().join("dev/pts")).unwrap();
        let now = SystemTime::now();
        let old = now - Duration::from_secs(7200);
        for (tty, typed) in [("pts/0", now), ("pts/1", old)] {
            let file = std::fs::File::create(root.path().join("dev").join(tty)).unwrap();
            file.set_times(std::fs::FileTimes::new().set_accessed(typed))
                .unwrap();
        }
        let reader = HostReader::new(root.path());
        // pts/0 typed at now; pts/1 two hours ago; tty1's process is gone; pts/2 logged out;
        // the odd line's terminal cannot be looked at, so it counts.
        assert_eq!(reader.recent_logins(now, Duration::from_secs(3600)), 2);
        assert_eq!(reader.recent_logins(now, Duration::from_secs(3 * 3600)), 3);
        assert_eq!(
            user_sessions(&utmp).len(),
            4,
            "every USER_PROCESS record with a pid"
        );
        assert_eq!(terminal_path("../etc/passwd"), None);
        assert_eq!(terminal_path("pts/3").as_deref(), Some("dev/pts/3"));
    }

    #[test]
    fn processes_are_found_by_their_name() {
        let root = tempfile::tempdir().unwrap();
        for (pid, comm) in [
            ("12", "rserver\n"),
            ("13", "rsession\n"),
            ("self", "rsession\n"),
        ] {
            std::fs::create_dir_all(root.path().join("proc").join(pid)).unwrap();
            std::fs::write(root.path().join("proc").join(pid).join("comm"), comm).unwrap();
        }
        let reader = HostReader::new(root.path());
        assert!(reader.process_runs("rsession"));
        assert!(!reader.process_runs("rstudio"));
        std::fs::remove_file(root.path().join("proc/13/comm")).unwrap();
        assert!(
            !reader.process_runs("rsession"),
            "only numbered entries are processes"
        );
    }

    #[test]
    fn the_machine_running_the_tests_reads_without_error() {
        let reader = HostReader::new(Path::new("/"));
        let first = reader.counters();
        assert!(first.cpu_total > 0, "{first:?}");
        assert!(reader.process_runs(
            std::fs::read_to_string("/proc/self/comm")
                .unwrap()
                .trim_end()
        ));
    }
}
