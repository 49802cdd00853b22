#!/usr/bin/env python3
"""forwarder.py: a userspace Ethernet forwarder that delays every frame, for bench/file-transfer.

This kernel has no ``netem`` qdisc, so the bench adds its round trip here: in the middle network
namespace, between two veth interfaces, every frame read from one (an ``AF_PACKET`` raw socket)
is written unchanged to the other ``--delay-ms`` milliseconds later. Frames, not connections:
TCP on both ends sees the real round trip (2 x delay), ARP and ICMP pass too. Order is kept
(one FIFO per direction; the delay is constant). Nothing is dropped here; the rate limit is
``tc tbf`` on the end hosts' interfaces.

    python3 forwarder.py --a IFACE --b IFACE --delay-ms 25

Needs the interfaces' segmentation and checksum offloads off (run.py does ``ethtool -K``):
with them on, a veth hands a packet socket 64 KiB GSO frames with unfilled checksums, which
cannot be written out as such. Runs until SIGTERM/SIGINT; prints one line of counters then.
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20: do not read back what this host sends
PACKET_OUTGOING = 4
MAX_FRAME = 65536


def open_raw(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernel: the pkttype check below does the same
    # Room for a round trip's worth of frames in flight at 100 Mbit/s and more.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.setblocking(False)
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0

    sa, sb = open_raw(args.a), open_raw(args.b)
    # For each socket: the queue of (due, frame) to write to the OTHER interface.
    out = {sa: (sb, collections.deque()), sb: (sa, collections.deque())}
    counts = {"frames": 0, "bytes": 0, "send_errors": 0, "max_queued": 0}
    running = True

    def stop(_signum, _frame):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"forwarder {args.a} <-> {args.b}, {args.delay_ms} ms each way", flush=True)

    socks = [sa, sb]
    while running:
        now = time.monotonic()
        due = [q[0][0] for _, q in out.values() if q]
        timeout = max(0.0, min(due) - now) if due else 0.5
        try:
            readable, _, _ = select.select(socks, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for s in readable:
            _, queue = out[s]
            while True:
                try:
                    frame, addr = s.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                queue.append((now + delay, frame))
            counts["max_queued"] = max(counts["max_queued"], len(queue))
        now = time.monotonic()
        for s, (dst, queue) in out.items():
            while queue and queue[0][0] <= now:
                _, frame = queue.popleft()
                try:
                    dst.send(frame)
                    counts["frames"] += 1
                    counts["bytes"] += len(frame)
                except OSError:
                    # ENOBUFS from a full device queue: the frame is lost, as on a link.
                    counts["send_errors"] += 1
    print("forwarder done: " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
