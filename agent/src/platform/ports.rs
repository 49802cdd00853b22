//! Keeping the services' ports out of the kernel's ephemeral range
//! (`net.ipv4.ip_local_reserved_ports`): a port in that range may be handed to any outgoing
//! connection, and kept for a minute in `TIME_WAIT` after it closes, and a service binding it
//! meanwhile fails with "Address already in use" (Exosphere's Guacamole port 49528 is in
//! Linux's default range, 32768–60999).

use std::io;
use std::path::{Path, PathBuf};

/// Why the ports could not be reserved.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    /// A file under `/proc/sys/net/ipv4` could not be read or written.
    #[error("failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Its contents are not what the kernel writes there.
    #[error("'{path}' holds {text:?}, not {expected}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it holds (first line).
        text: String,
        /// What was expected.
        expected: &'static str,
    },
}

impl PortsError {
    /// A short stable code for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { .. } => "ports-io",
            Self::Malformed { .. } => "ports-malformed",
        }
    }
}

/// The kernel's ephemeral port settings of one network namespace.
#[derive(Debug, Clone)]
pub struct EphemeralPorts {
    dir: PathBuf,
}

impl EphemeralPorts {
    /// The settings in `dir` (`/proc/sys/net/ipv4`, or a copy in tests).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// This process's network namespace's.
    pub fn system() -> Self {
        Self::new(Path::new("/proc/sys/net/ipv4"))
    }

    /// Reserve the ports among `ports` that lie in the ephemeral range and are not reserved
    /// yet, keeping every reservation already there; returns those newly reserved (none: the
    /// file is not written). The kernel then hands them to no outgoing connection; a socket
    /// that holds one already keeps it until it closes.
    pub fn reserve(&self, ports: &[u16]) -> Result<Vec<u16>, PortsError> {
        let range_path = self.dir.join("ip_local_port_range");
        let reserved_path = self.dir.join("ip_local_reserved_ports");
        let (low, high) = parse_range(&range_path, &read(&range_path)?)?;
        let text = read(&reserved_path)?;
        let mut reserved = parse_list(&reserved_path, &text)?;
        let mut added: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|port| (low..=high).contains(port))
            .filter(|port| !reserved.iter().any(|(a, b)| (*a..=*b).contains(port)))
            .collect();
        added.sort_unstable();
        added.dedup();
        if added.is_empty() {
            return Ok(added);
        }
        reserved.extend(added.iter().map(|port| (*port, *port)));
        // Written whole: a write at the start replaces the kernel's list.
        std::fs::write(&reserved_path, format_list(&reserved)).map_err(|source| {
            PortsError::Io {
                action: "write",
                path: reserved_path.clone(),
                source,
            }
        })?;
        Ok(added)
    }
}

fn read(path: &Path) -> Result<String, PortsError> {
    std::fs::read_to_string(path).map_err(|source| PortsError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn malformed(path: &Path, text: &str, expected: &'static str) -> PortsError {
    PortsError::Malformed {
        path: path.to_path_buf(),
        text: text
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect(),
        expected,
    }
}

/// `ip_local_port_range`: two numbers (the kernel separates them with a tab).
fn parse_range(path: &Path, text: &str) -> Result<(u16, u16), PortsError> {
    let expected = "two port numbers";
    let numbers: Vec<u16> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| malformed(path, text, expected))?;
    match numbers[..] {
        [low, high] if low <= high => Ok((low, high)),
        _ => Err(malformed(path, text, expected)),
    }
}

/// `ip_local_reserved_ports`: ports and ranges separated by commas (`8080,49528-49530`), or
/// nothing.
fn parse_list(path: &Path, text: &str) -> Result<Vec<(u16, u16)>, PortsError> {
    let expected = "a comma-separated list of ports and port ranges";
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|entry| {
            let (a, b) = entry.split_once('-').unwrap_or((entry, entry));
            match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                (Ok(a), Ok(b)) if a <= b => Ok((a, b)),
                _ => Err(malformed(path, text, expected)),
            }
        })
        .collect()
}

fn format_list(ranges: &[(u16, u16)]) -> String {
    let entries: Vec<String> = ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    format!("{}\n", entries.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(range: &str, reserved: &str) -> (tempfile::TempDir, EphemeralPorts) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ip_local_port_range"), range).unwrap();
        std::fs::write(dir.path().join("ip_local_reserved_ports"), reserved).unwrap();
        let ports = EphemeralPorts::new(dir.path());
        (dir, ports)
    }

    fn reserved(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("ip_local_reserved_ports")).unwrap()
    }

    #[test]
    fn ports_in_the_range_are_added_to_what_is_reserved() {
        let (dir, ports) = settings("32768\t60999\n", "8080,40000-40002\n");
        let added = ports.reserve(&[49528, 8888, 40001, 49528, 60999]).unwrap();
        assert_eq!(
            added,
            [49528, 60999],
            "8888 is outside, 40001 reserved already"
        );
        assert_eq!(reserved(&dir), "8080,40000-40002,49528,60999\n");
        assert!(ports.reserve(&[49528]).unwrap().is_empty(), "idempotent");
    }

    #[test]
    fn nothing_to_reserve_writes_nothing() {
        let (dir, ports) = settings("32768\t60999\n", "\n");
        assert!(ports.reserve(&[8888, 5901]).unwrap().is_empty());
        assert_eq!(reserved(&dir), "\n");
        assert_eq!(ports.reserve(&[49528]).unwrap(), [49528]);
        assert_eq!(reserved(&dir), "49528\n");
    }

    #[test]
    fn a_malformed_file_is_named_and_left_alone() {
        let (dir, ports) = settings("32768\n", "\n");
        let e = ports.reserve(&[49528]).unwrap_err();
        assert_eq!(e.reason(), "ports-malformed");
        assert!(e.to_string().contains("ip_local_port_range"), "{e}");
        let (dir2, ports2) = settings("32768 60999\n", "8080,x-1\n");
        let e = ports2.reserve(&[49528]).unwrap_err();
        assert!(e.to_string().contains("ip_local_reserved_ports"), "{e}");
        assert_eq!(reserved(&dir2), "8080,x-1\n", "left as it was");
        drop(dir);
    }

    /// The real kernel, in a network namespace of the test's own (a thread's: `/proc/sys/net`
    /// shows the namespace of the thread that opens it, and `ip` inherits it): with the range
    /// cut to four ports and two reserved, outgoing connections get only the other two.
    #[test]
    fn the_kernel_hands_a_reserved_port_to_no_outgoing_connection() {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "FAIL, not run: a network namespace needs root"
        );
        let seen = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "40000 40003").unwrap();
            let reserved = EphemeralPorts::system()
                .reserve(&[40001, 40002, 8080])
                .unwrap();
            assert_eq!(reserved, [40001, 40002]);
            let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports");
            assert_eq!(text.unwrap().trim(), "40001-40002", "the kernel's own form");
            let listener = std::net::TcpListener::bind("127.0.0.1:50000").unwrap();
            let mut held = Vec::new();
            for _ in 0..6 {
                match std::net::TcpStream::connect("127.0.0.1:50000") {
                    Ok(stream) => held.push(stream),
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{e}");
                        break;
                    }
                }
            }
            drop(listener);
            let mut ports: Vec<u16> = held
                .iter()
                .map(|s| s.local_addr().unwrap().port())
                .collect();
            ports.sort_unstable();
            ports
        })
        .join()
        .unwrap();
        assert_eq!(seen, [40000, 40003]);
    }

    #[test]
    fn a_missing_file_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = EphemeralPorts::new(dir.path())
            .reserve(&[49528])
            .unwrap_err();
        assert_eq!(e.reason(), "ports-io");
    }
}
