#!/usr/bin/env python3
"""bench/file-transfer: file upload and download through the Guacamole page over a shaped link.

Run as root from the repository, after ``bash tests/browser/setup.sh`` (Chromium, the guacd
double's venv) and ``cargo build -p exoagent``; ``ethtool`` and ``ping`` must be installed:

    python3 bench/file-transfer/run.py [--size-mib 4] [--delays 0,25] [--runs 1]
        [--bin target/debug/exoagent [--bin OTHER ...] | --release] [--guacd double|real]
        [--path streams|blobs] [--ssh-quickack] [--net-only] [--record]

What it builds (all torn down at exit, also on Ctrl-C):

    ns exo-ft-b (browser)        ns exo-ft-m (middle)                   ns exo-ft-i (instance)
    Chromium, driver ── ftb0 ═══ ftm0  forwarder.py (delay)  ftm1 ═══ fti0 ── exoagent guacamole-web
    10.231.0.1/24   tbf 100mbit                                    tbf 100mbit   rig.py: sshd, the
                                                                                 guacd double, Xvnc

* The round trip: this kernel has no ``netem`` (the script checks that ``tc qdisc add ...
  netem`` fails and says so), so ``forwarder.py`` in the middle namespace copies Ethernet
  frames between the two veths through AF_PACKET sockets, holding each for ``delay`` ms
  (``--delays`` are one-way delays: 25 means a 50 ms round trip). TCP sees the real round
  trip; nothing proxies a connection.
* The rate: ``tc tbf rate 100mbit`` on both end interfaces (each direction).
* Checked before the browser runs: ``ping`` (round trip) and a plain TCP transfer with Python
  sockets each way (rate), per delay.
* The transfer: the rig (tests/guacamole/rig.py: the test user, sshd, the guacd double) and
  ``exoagent guacamole-web`` run in the instance namespace; Chromium (headless, the browser
  tests' flags) runs in the browser namespace, logs in, opens the shell connection, uploads a
  file with the page's upload control (the WebSocket blob path: guacamole-common-js's
  BlobWriter, one blob per ack) and downloads it back through the page's file browser; bytes
  checked on disk and in the download. Reported: seconds, KiB/s, and the web side's peak RSS
  (VmHWM) after each transfer.

With several ``--bin``, each binary serves the same runs (e.g. with and without TCP_NODELAY).
``--release`` is ``--bin target/release/exoagent`` (``cargo build --release -p exoagent``).
``--guacd real`` puts the real guacd 1.3.0 (Debian 11's packages, the root of
tests/guacamole/guacd-bullseye.sh, as the browser tests run it with EXOAGENT_GUACD=bullseye) in
the instance namespace instead of the double: rig.py then runs with ``--no-peer --ssh-rsa``
(that guacd's libssh2 needs an ssh-rsa host key). ``--ssh-quickack`` runs every binary twice: guacd
reaching sshd at 127.0.0.1, then at 127.0.22.1 with the route the agent adds on an instance
(delayed ACKs off; services/guacamole/ssh_loopback.rs, docs/guacamole.md). ``--path blobs`` makes the page move files as
blobs over the WebSocket even where the web side offers the HTTP stream endpoints (the old
path, for comparison). ``--record`` writes the table into bench/results/file-transfer.md
between its markers (``--record-section NAME``: between ``<!-- run.py NAME -->`` markers,
a new section at the end of the file the first time), with the load average before and after each transfer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
VENV = os.environ.get("EXOAGENT_GUAC_VENV", "/var/tmp/exoagent-guac-venv")
RIG = os.path.join(REPO, "tests/guacamole/rig.py")
DRIVER = os.path.join(HERE, "browser.mjs")
RESULTS = os.path.join(REPO, "bench/results/file-transfer.md")

NS_B, NS_M, NS_I = "exo-ft-b", "exo-ft-m", "exo-ft-i"
ADDR_B, ADDR_I = "10.231.0.1", "10.231.0.2"
RATE = "100mbit"
WEB_PORT = 49528
GUACD_PORT = 49529
GUACD_SCRIPT = os.path.join(REPO, "tests/guacamole/guacd-bullseye.sh")
IPERF_PORT = 5201

PROCS: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, ns: str | None = None, check: bool = True, capture: bool = False) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout if capture else ""


# ---------------------------------------------------------------------------------------------
# The network


def check_no_netem() -> str:
    """Says whether netem is there (the bench adds delay in userspace either way)."""
    ns = "exo-ft-netem"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "set", "lo", "up", ns=ns)
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                            "netem", "delay", "25ms"], capture_output=True, text=True)
        if r.returncode == 0:
            return "netem is available on this kernel (unused: the forwarder adds the delay)"
        return f"no netem on this kernel: `tc qdisc add dev lo root netem delay 25ms` → {r.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", ns, check=False)


def loopback_quickack() -> None:
    """No delayed ACKs on the instance namespace's loopback (route metric `quickack`, Linux
    3.11+): guacd's SSH connection to sshd (neither sets TCP_NODELAY on it: libssh2's socket is
    guacd's own, sshd sets it for interactive sessions only) otherwise stalls ≈ 40 ms now and
    then, a small segment held by Nagle until the other side's delayed ACK."""
    for dst in ("127.0.0.0/8", "127.0.0.1"):
        sh("ip", "route", "change", "local", dst, "dev", "lo", "table", "local", "proto", "kernel",
           "scope", "host", "src", "127.0.0.1", "quickack", "1", ns=NS_I)


# What the agent does on an instance (services/guacamole/ssh_loopback.rs, docs/guacamole.md):
# guacd reaches sshd at a loopback address of its own whose route has delayed ACKs off.
SSH_QUICKACK_ADDR = "127.0.22.1"


def ssh_quickack_route() -> None:
    """The agent's route for its SSH loopback address, the same argv, in the instance namespace."""
    sh("ip", "-n", NS_I, "-4", "route", "replace", "local", SSH_QUICKACK_ADDR, "dev", "lo",
       "table", "local", "proto", "static", "scope", "host", "src", SSH_QUICKACK_ADDR,
       "quickack", "1")


def net_up() -> None:
    for ns in (NS_B, NS_M, NS_I):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "link", "add", "ftb0", "netns", NS_B, "type", "veth", "peer", "ftm0", "netns", NS_M)
    sh("ip", "link", "add", "fti0", "netns", NS_I, "type", "veth", "peer", "ftm1", "netns", NS_M)
    for ns, dev in ((NS_B, "ftb0"), (NS_M, "ftm0"), (NS_M, "ftm1"), (NS_I, "fti0")):
        # Frames must be plain 1500-byte Ethernet with real checksums for the forwarder.
        sh("ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off",
           ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
    for dev in ("ftm0", "ftm1"):
        sh("ip", "link", "set", dev, "promisc", "on", ns=NS_M)
        sh("sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1", ns=NS_M)
    sh("ip", "addr", "add", f"{ADDR_B}/24", "dev", "ftb0", ns=NS_B)
    sh("ip", "addr", "add", f"{ADDR_I}/24", "dev", "fti0", ns=NS_I)
    for ns, dev in ((NS_B, "ftb0"), (NS_I, "fti0")):
        # burst: above rate/HZ; latency bounds the queue (the sender's TCP sees back-pressure
        # through TSQ long before, so it drops nothing in practice).
        sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst", "32kb",
           "latency", "100ms", ns=ns)


def net_down() -> None:
    for ns in (NS_B, NS_M, NS_I):
        sh("ip", "netns", "del", ns, check=False)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; waits for the process either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Forwarder:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.delay_ms = None

    def set(self, delay_ms: float) -> None:
        self.stop()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS_M, sys.executable, os.path.join(HERE, "forwarder.py"),
             "--a", "ftm0", "--b", "ftm1", "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE, text=True)
        PROCS.append(self.proc)
        line = self.proc.stdout.readline()
        if not line.startswith("forwarder"):
            raise RuntimeError(f"forwarder did not start: {line!r}")
        self.delay_ms = delay_ms

    def stop(self) -> str:
        if not self.proc:
            return ""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        self.proc = None
        return out.strip()


def ping_rtt() -> float:
    out = sh("ping", "-c", "10", "-i", "0.2", "-q", ADDR_I, ns=NS_B, capture=True)
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
    if not m:
        raise RuntimeError(f"ping gave no summary: {out}")
    return float(m.group(2))


SINK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
mode = sys.argv[3]
c, _ = s.accept()
if mode == "recv":
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode())
else:
    total = int(sys.argv[4]); buf = b"\0" * (1 << 20); sent = 0
    while sent < total:
        k = c.send(buf[: min(len(buf), total - sent)]); sent += k
c.close()
"""

SOURCE = r"""
import socket, sys, time
host, port, mode, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
c = socket.create_connection((host, port)); t = time.monotonic()
if mode == "send":
    buf = b"\0" * (1 << 20); sent = 0
    while sent < total:
        sent += c.send(buf[: min(len(buf), total - sent)])
    c.shutdown(socket.SHUT_WR)
    got = int(c.recv(64) or b"0")
    assert got == total, (got, total)
else:
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    assert n == total, (n, total)
print(time.monotonic() - t)
"""


def tcp_rate(direction: str, total: int) -> float:
    """Mbit/s of one plain TCP transfer, browser → instance ("up") or back ("down")."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", NS_I, sys.executable, "-c", SINK, ADDR_I, str(IPERF_PORT),
         "recv" if direction == "up" else "send", str(total)],
        stdout=subprocess.PIPE, text=True)
    PROCS.append(server)
    try:
        assert server.stdout.readline().startswith("listening")
        out = sh(sys.executable, "-c", SOURCE, ADDR_I, str(IPERF_PORT),
                 "send" if direction == "up" else "recv", str(total), ns=NS_B, capture=True)
        server.wait(timeout=30)
        return total * 8 / float(out.strip()) / 1e6
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# ---------------------------------------------------------------------------------------------
# The rig, the web side, the browser


class Rig:
    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS_I, os.path.join(VENV, "bin/python"), RIG, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        PROCS.append(self.proc)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("rig.py printed no JSON line (its stderr above)")
        self.info = json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RealGuacd:
    """guacd 1.3.0 from the bullseye root, in the instance namespace on GUACD_PORT."""

    def __init__(self, tmp: str) -> None:
        self.log_path = os.path.join(tmp, "guacd.log")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS_I, "bash", GUACD_SCRIPT, "run", str(GUACD_PORT)],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        PROCS.append(self.proc)
        deadline = time.monotonic() + 180  # the first run builds the root
        probe = ("import socket; s = socket.create_connection(('127.0.0.1', %d), timeout=2); "
                 "s.sendall(b'6.select,3.ssh;'); assert b'4.args,' in s.recv(4096)" % GUACD_PORT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"guacd-bullseye.sh exited: {open(self.log_path).read()[-2000:]}")
            if subprocess.run(["ip", "netns", "exec", NS_I, "python3", "-c", probe],
                              capture_output=True).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("guacd 1.3.0 not answering within 180 s")
            time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc)


class Web:
    def __init__(self, binary: str, info: dict, tmp: str, guacd: str,
                 ssh_host: str = "127.0.0.1") -> None:
        pw = os.path.join(tmp, "guacamole-password")
        with open(pw, "w") as f:
            f.write(info["password"] + "\n")
        os.chmod(pw, 0o600)
        config = {
            "listen": f"{ADDR_I}:{WEB_PORT}",
            "guacd": guacd,
            "username": info["user"],
            "password_file": pw,
            "session_timeout_s": 3600,
            "connections": {"shell": {"protocol": "ssh", "parameters": {
                "hostname": ssh_host, "port": str(info["ssh_port"]),
                "username": info["user"], "password": "${GUAC_PASSWORD}",
                "enable-sftp": "true"}}},
        }
        cfg = os.path.join(tmp, "guacamole-web.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        self.log_path = os.path.join(tmp, "guacamole-web.log")
        # As the instance user, as on an instance: the user guacd's SFTP logs in as, whose
        # completed uploads the web side renames from <name>.incomplete-upload into place.
        user = pwd.getpwnam(info["user"])
        for path in (tmp, pw, cfg):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS_I, "setpriv", f"--reuid={user.pw_uid}",
             f"--regid={user.pw_gid}", "--init-groups", binary, "guacamole-web", "--config", cfg],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        PROCS.append(self.proc)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"guacamole-web exited: {open(self.log_path).read()[-2000:]}")
            r = subprocess.run(["ip", "netns", "exec", NS_I, "python3", "-c",
                                "import urllib.request,sys; urllib.request.urlopen("
                                f"'http://{ADDR_I}:{WEB_PORT}/guacamole/api/exoagent/health', timeout=2)"],
                               capture_output=True)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("guacamole-web not healthy within 30 s")
            time.sleep(0.3)

    def pid(self) -> int:
        # `ip netns exec` and `setpriv` exec the binary: the child is the web side itself.
        return self.proc.pid

    def hwm_kib(self) -> int:
        with open(f"/proc/{self.pid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        stop_process(self.proc)


def browser_run(info: dict, src: str, name: str, size: int, path: str) -> dict:
    """One upload and one download through the page, by browser.mjs in the browser namespace."""
    env = dict(os.environ, FT_BASE=f"http://{ADDR_I}:{WEB_PORT}", FT_USER=info["user"],
               FT_PASSWORD=info["password"], FT_HOME=info["home"], FT_FILE=src, FT_NAME=name,
               FT_SIZE=str(size), FT_PATH=path)
    r = subprocess.run(["ip", "netns", "exec", NS_B, "node", DRIVER], env=env,
                       capture_output=True, text=True, timeout=2 * 900 + 120)
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"browser.mjs failed ({r.returncode}): {r.stdout[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cleanup() -> None:
    for p in PROCS:
        if p.poll() is None:
            with contextlib.suppress(Exception):
                p.terminate()
                p.wait(timeout=10)
        if p.poll() is None:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=5)
    net_down()


def main() -> int:
    ap = argparse.ArgumentParser(description="file transfer through the Guacamole page over a shaped link")
    ap.add_argument("--size-mib", type=float, default=4)
    ap.add_argument("--delays", default="0,25", help="one-way delays in ms (25 = 50 ms round trip)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--bin", action="append", help="exoagent binaries to compare")
    ap.add_argument("--release", action="store_true", help="use target/release/exoagent")
    ap.add_argument("--guacd", choices=("double", "real"), default="double",
                    help="the guacd double (default) or the real guacd 1.3.0 from bullseye")
    ap.add_argument("--path", choices=("streams", "blobs"), default="streams",
                    help="the page's file path: HTTP streams when offered (default), or blobs")
    ap.add_argument("--net-only", action="store_true", help="only build and check the link")
    ap.add_argument("--loopback-quickack", action="store_true",
                    help="no delayed ACKs on the instance namespace's loopback (guacd ↔ sshd)")
    ap.add_argument("--ssh-quickack", action="store_true",
                    help="what the agent does on an instance: guacd reaches sshd at 127.0.22.1, "
                         "whose own route has delayed ACKs off (docs/guacamole.md)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--record-section", metavar="NAME",
                    help="record between <!-- run.py NAME --> markers (appended to the file when "
                         "absent) instead of the first section's")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, tc, the rig)")
    for tool in ("ethtool", "ping", "tc", "node"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing")
    if args.bin and args.release:
        sys.exit("--bin and --release: choose one")
    binaries = args.bin or [os.path.join(REPO, "target/release/exoagent" if args.release
                                         else "target/debug/exoagent")]
    for binary in binaries:
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is not an executable (build it first)")
    delays = [float(d) for d in args.delays.split(",")]
    size = int(args.size_mib * 1024 * 1024)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    net_down()  # leftovers of an interrupted run
    report: dict = {"size": size, "netem": check_no_netem(), "link": [], "transfers": [],
                    "guacd": args.guacd, "path": args.path, "load_start": os.getloadavg(),
                    "loopback_quickack": args.loopback_quickack}
    # Each binary once with guacd reaching sshd at 127.0.0.1 and, with --ssh-quickack, once more
    # at the agent's own address (side by side in one run).
    ssh_hosts = ["127.0.0.1"] + ([SSH_QUICKACK_ADDR] if args.ssh_quickack else [])
    log(report["netem"])
    tmp = tempfile.mkdtemp(prefix="exo-ft-")
    forwarder = Forwarder()
    rig = web = guacd = None
    try:
        net_up()
        if args.loopback_quickack:
            loopback_quickack()
        if args.ssh_quickack:
            ssh_quickack_route()
        for d in delays:
            forwarder.set(d)
            rtt = ping_rtt()
            total = 64 << 20
            up, down = tcp_rate("up", total), tcp_rate("down", total)
            link = {"delay_ms": d, "ping_rtt_ms": rtt, "tcp_up_mbit": up, "tcp_down_mbit": down,
                    "tcp_bytes": total}
            report["link"].append(link)
            log(f"link at {d} ms one way: ping {rtt:.1f} ms, TCP 64 MiB up {up:.1f} Mbit/s, "
                f"down {down:.1f} Mbit/s; {forwarder.stop()}")
        if args.net_only:
            print(json.dumps(report))
            return 0

        rig = Rig("--no-peer", "--ssh-rsa") if args.guacd == "real" else Rig()
        info = rig.info
        if args.guacd == "real":
            guacd = RealGuacd(tmp)
            guacd_addr = f"127.0.0.1:{GUACD_PORT}"
        else:
            guacd_addr = f"127.0.0.1:{info['peer_port']}"
        src = os.path.join(tmp, "payload.bin")
        with open(src, "wb") as f:
            f.write(os.urandom(size))
        digest = sha256(src)
        for binary, ssh_host in [(b, h) for b in binaries for h in ssh_hosts]:
            web = Web(binary, info, tmp, guacd_addr, ssh_host)
            base_kib = web.hwm_kib()
            for d in delays:
                forwarder.set(d)
                for run in range(args.runs):
                    name = f"exo browser ft {int(d)}ms {run} {os.urandom(3).hex()}.bin"
                    load_before = os.getloadavg()[0]
                    r = browser_run(info, src, name, size, args.path)
                    target = os.path.join(info["home"], name)
                    ok = os.path.getsize(target) == size and sha256(target) == digest
                    os.remove(target)
                    if not ok or r["download_sha256"] != digest:
                        raise RuntimeError(f"bytes differ after the run: {r}")
                    r.update(binary=binary, ssh_host=ssh_host, delay_ms=d, run=run, rss_base_kib=base_kib,
                             rss_peak_kib=web.hwm_kib(), load=(load_before, os.getloadavg()[0]))
                    report["transfers"].append(r)
                    log(f"{os.path.basename(binary)} sshd at {ssh_host}, {d} ms: upload {r['upload_s']:.2f} s "
                        f"({size / 1024 / r['upload_s']:.0f} KiB/s), download {r['download_s']:.2f} s "
                        f"({size / 1024 / r['download_s']:.0f} KiB/s), peak RSS {r['rss_peak_kib']} KiB")
                forwarder.stop()
            web.stop()
            web = None
        print(json.dumps(report))
        if args.record:
            record(report, sys.argv[1:], args.record_section)
        return 0
    finally:
        if web:
            web.stop()
        if guacd:
            guacd.stop()
        if rig:
            rig.stop()
        forwarder.stop()
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def record(report: dict, argv: list[str], section: str | None) -> None:
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python3 bench/file-transfer/run.py "
             f"{' '.join(argv)}`; file {report['size'] / 1048576:g} MiB; guacd: "
             f"{'the real guacd 1.3.0 (bullseye)' if report['guacd'] == 'real' else 'the double'}; "
             f"page path: {'blobs over the WebSocket' if report['path'] == 'blobs' else 'HTTP streams'}; "
             f"load average at start {report['load_start'][0]:.2f} (1 min), {report['load_start'][1]:.2f} (5 min); "
             f"{report['netem'].rstrip('.')}.", "",
             "| one-way delay | ping RTT | plain TCP up | plain TCP down |", "|---|---|---|---|"]
    for l in report["link"]:
        lines.append(f"| {l['delay_ms']:g} ms | {l['ping_rtt_ms']:.1f} ms | {l['tcp_up_mbit']:.1f} Mbit/s "
                     f"| {l['tcp_down_mbit']:.1f} Mbit/s |")
    lines += ["", "| binary | guacd → sshd at | RTT | upload | download | web side RSS at start → peak | load before → after |",
              "|---|---|---|---|---|---|---|"]
    for r in report["transfers"]:
        s = report["size"] / 1024
        lines.append(f"| `{os.path.basename(r['binary'])}` | {r.get('ssh_host', '127.0.0.1')} | {2 * r['delay_ms']:g} ms | {r['upload_s']:.2f} s, "
                     f"{s / r['upload_s']:.0f} KiB/s | {r['download_s']:.2f} s, {s / r['download_s']:.0f} KiB/s "
                     f"| {r['rss_base_kib'] / 1024:.1f} → {r['rss_peak_kib'] / 1024:.1f} MiB "
                     f"| {r['load'][0]:.1f} → {r['load'][1]:.1f} |")
    begin, finish = (f"<!-- run.py {section} -->", f"<!-- /run.py {section} -->") if section else (
        "<!-- run.py -->", "<!-- /run.py -->")
    text = open(RESULTS).read() if os.path.exists(RESULTS) else ""
    if begin not in text:
        # A new section goes at the end of the file.
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"{begin}\n{finish}\n"
    start, end = text.index(begin), text.index(finish)
    text = text[: start] + begin + "\n" + "\n".join(lines) + "\n" + text[end:]
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
