//! Kernel uevents for block devices, read from a `NETLINK_KOBJECT_UEVENT` socket (the kernel's
//! multicast group, so no udevd is needed), made async with tokio's `AsyncFd`. Hand-written
//! (about forty lines over `nix`) rather than a udev crate: that would link libudev or pull a
//! dependency tree for one socket and one `SUBSYSTEM=block` test.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;

/// A subscription to the kernel's uevents.
#[derive(Debug)]
pub struct Uevents {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl Uevents {
    /// Open and bind the socket (needs root or `CAP_NET_ADMIN` in the initial namespace).
    pub fn open() -> std::io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        // SAFETY: `fd` is an open socket this function owns; it is moved into the `AsyncFd`,
        // which alone closes it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
        Ok(Self {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Wait for the next uevent of the `block` subsystem.
    pub async fn next_block_event(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            loop {
                match recv(
                    guard.get_inner().as_raw_fd(),
                    &mut self.buf,
                    MsgFlags::empty(),
                ) {
                    Ok(n) => {
                        if is_block_event(&self.buf[..n]) {
                            return Ok(());
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    // The kernel dropped events (receive buffer full): something happened.
                    Err(nix::errno::Errno::ENOBUFS) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Whether a raw uevent (`action@devpath\0KEY=value\0…`) is about a block device.
pub fn is_block_event(message: &[u8]) -> bool {
    message
        .split(|b| *b == 0)
        .any(|field| field == b"SUBSYSTEM=block")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_events_are_told_apart() {
        let add = b"add@/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb\0ACTION=add\0\
                    DEVPATH=/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb\0\
                    SUBSYSTEM=block\0DEVNAME=vdb\0DEVTYPE=disk\0";
        assert!(is_block_event(add));
        let net = b"add@/devices/virtual/net/veth0\0ACTION=add\0SUBSYSTEM=net\0";
        assert!(!is_block_event(net));
        assert!(!is_block_event(b"SUBSYSTEM=blockish\0"));
    }

    /// A real kernel uevent reaches the socket: writing `change` to a block device's `uevent`
    /// file makes the kernel send one (root only; skipped otherwise).
    #[tokio::test]
    async fn the_kernel_sends_block_events_to_the_socket() {
        let trigger = std::path::Path::new("/sys/class/block/loop0/uevent");
        if !nix::unistd::geteuid().is_root() || !trigger.exists() {
            eprintln!("skipped: needs root and /dev/loop0");
            return;
        }
        let mut events = Uevents::open().unwrap();
        std::fs::write(trigger, "change").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), events.next_block_event())
            .await
            .expect("no uevent within 5s")
            .unwrap();
    }
}
