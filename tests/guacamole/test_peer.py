#!/usr/bin/env python3
"""Self-test of guacd_peer.py (the guacd test double) against REAL servers.

Run as root, after tests/guacamole/setup.sh, with the venv's python:

    bash tests/guacamole/setup.sh
    /var/tmp/exoagent-guac-venv/bin/python tests/guacamole/test_peer.py

What it starts (all on 127.0.0.1, all torn down at the end, even on failure):
  * the user ``exoguactest`` (created if missing; a fresh random password set through
    ``chpasswd`` on stdin on every run, the account locked again at the end);
  * a private OpenSSH ``/usr/sbin/sshd`` on a free port with its own config and host key in a
    temp dir (password auth, PAM, ``internal-sftp``); the system sshd is never touched;
  * TigerVNC ``Xtigervnc :N`` (VNC auth, loopback only) and an Xfce session
    (``dbus-launch --exit-with-session startxfce4``), both running AS ``exoguactest``;
  * the peer (``guacd_peer.py --listen 127.0.0.1:0 --events FILE``).

Then it acts as a Guacamole client over TCP: ssh (frames, typing, upload, listing, download,
resize, nop keep-alive), vnc (Xfce desktop frames, mouse, clipboard, SFTP upload), bad
handshakes, the 15 s handshake and client timeouts (run concurrently with the rest), and a clean
SIGTERM. It ends with the line ``guacamole-peer: N passed, M failed`` and exits non-zero on any
failure. Set EXOGUAC_ARTIFACTS=DIR to keep the last frames as PNG files and the events log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from PIL import Image, ImageChops

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "guacd_peer.py")
USER = "exoguactest"
STREAM_INDEX = "application/vnd.glyptodon.guacamole.stream-index+json"
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout: float, banner: bytes | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if banner is None:
                    return time.monotonic() - start
                s.settimeout(2)
                if s.recv(64).startswith(banner):
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not ready after {timeout} s")


# ----------------------------------------------------------------------------------------------
# Processes: started here, ended here by PID (with their descendants and, for the desktop
# session, every process carrying this run's marker in its environment).


def _proc_table() -> dict[int, int]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    return table


def descendants(pid: int) -> list[int]:
    table = _proc_table()
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in table.items():
            if ppid == parent and child not in out:
                out.append(child)
                frontier.append(child)
    return out


def marked(marker: str) -> list[int]:
    pids = []
    needle = f"EXOGUAC_RUN={marker}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def kill_pids(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _user_pids(uid: int) -> list[int]:
    """Processes of the test user (which exists only for this test)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False



def remove_stale_ice_sockets(uid: int, directory: str = "/tmp/.ICE-unix") -> None:
    """Remove `uid`'s ICE sockets whose process is gone. xfce4-session listens on
    /tmp/.ICE-unix/<its pid> and leaves the socket behind when it is killed; a later session
    that gets the same pid then cannot listen ("server already running") and exits, and the
    desktop stays blank. A machine that runs the rig many times collects hundreds."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == uid and not (name.isdigit() and os.path.exists(f"/proc/{name}")):
                    os.unlink(path)


class Rig:
    """The real servers and the peer."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="exoguac-")
        os.chmod(self.tmp, 0o711)
        self.marker = secrets.token_hex(8)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.password = "G1-" + secrets.token_urlsafe(12)
        self.vnc_password = secrets.token_hex(4)  # VNC uses 8 characters at most
        self.events = os.path.join(self.tmp, "events.jsonl")
        self.timings: dict[str, float] = {}
        self.pw = None
        self.home = ""
        self.created_files: list[str] = []
        # For guacd 1.3.0 (Debian 11's, Ubuntu 22.04/24.04's): see sshd().
        self.ssh_rsa = False

    # -- user
    def user(self) -> None:
        try:
            self.pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True)
            self.pw = pwd.getpwnam(USER)
        subprocess.run(["chpasswd"], input=f"{USER}:{self.password}\n", text=True, check=True)
        subprocess.run(["usermod", "-U", USER], check=False, capture_output=True)
        self.home = self.pw.pw_dir
        os.makedirs(self.home, exist_ok=True)
        os.chown(self.home, self.pw.pw_uid, self.pw.pw_gid)
        for name in ("guac-upload.bin", "guac-vnc-upload.txt", "guac-typed-marker", "guac-dir",
                     "guac-\u00e9\U0001F600\U00020000\"q"):
            path = os.path.join(self.home, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)

    def user_dir(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chown(path, self.pw.pw_uid, self.pw.pw_gid)
        return path

    def spawn(self, name: str, argv: list[str], as_user: bool = False, env=None,
              stdout=None) -> subprocess.Popen:
        logf = open(os.path.join(self.tmp, f"{name}.log"), "wb")
        kwargs = {}
        if as_user:
            kwargs = dict(user=self.pw.pw_uid, group=self.pw.pw_gid, extra_groups=[],
                          cwd=self.home)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=stdout if stdout is not None else logf, stderr=logf,
                                env=env, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    # -- sshd
    def sshd(self, name: str = "sshd", ssh_rsa: bool | None = None) -> int:
        """Starts a private sshd (``name``: its directory, log and process name) and returns its
        port; the first one's is ``self.ssh_port``. ``ssh_rsa`` defaults to ``self.ssh_rsa``."""
        t = time.monotonic()
        ssh_rsa = self.ssh_rsa if ssh_rsa is None else ssh_rsa
        d = os.path.join(self.tmp, name)
        os.makedirs(d, mode=0o700)
        key = os.path.join(d, "ssh_host_ed25519_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        host_keys = f"HostKey {key}\n"
        if ssh_rsa:
            # guacd 1.3.0 from Debian 11 links libssh2 1.9.0 built against libgcrypt, which
            # offers only ssh-rsa and ssh-dss host keys; OpenSSH >= 8.8 refuses ssh-rsa (SHA-1
            # signatures) by default, so guacd's SSH and SFTP handshakes fail. Only for that
            # guacd: an RSA host key and ssh-rsa allowed again. Ubuntu's libssh2 is built
            # against OpenSSL and offers modern host keys, so Ubuntu instances need no such
            # thing; this is a difference of the test's guacd build, not something exoagent
            # must configure on instances.
            rsa = os.path.join(d, "ssh_host_rsa_key")
            subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", rsa],
                           check=True)
            host_keys += f"HostKey {rsa}\nHostKeyAlgorithms +ssh-rsa\n"
        port = free_port()
        if name == "sshd":
            self.ssh_port = port
        cfg = os.path.join(d, "sshd_config")
        # 127.0.22.1 as well: the loopback address exoagent gives guacd for sshd when it can
        # (docs/guacamole.md, "delayed ACKs off"); bench/file-transfer's --ssh-quickack uses it.
        with open(cfg, "w") as f:
            f.write(f"""# exoagent guacd_peer self-test: a private sshd, loopback only
ListenAddress 127.0.0.1:{port}
ListenAddress 127.0.22.1:{port}
{host_keys.rstrip()}
PidFile {d}/sshd.pid
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication no
UsePAM yes
PermitRootLogin no
AllowUsers {USER}
AuthorizedKeysFile none
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
Subsystem sftp internal-sftp
""")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        subprocess.run(["/usr/sbin/sshd", "-t", "-f", cfg], check=True)
        self.spawn(name, ["/usr/sbin/sshd", "-D", "-e", "-f", cfg])
        wait_tcp(port, 10, b"SSH-2.0-")
        self.timings[f"{name} ready"] = time.monotonic() - t
        return port

    # -- TigerVNC + Xfce
    def desktop(self) -> None:
        t = time.monotonic()
        vnc = self.user_dir("vnc")
        passwd = os.path.join(vnc, "passwd")
        out = subprocess.run(["vncpasswd", "-f"], input=self.vnc_password.encode(),
                             capture_output=True, check=True).stdout
        with open(passwd, "wb") as f:
            f.write(out)
        os.chmod(passwd, 0o600)
        os.chown(passwd, self.pw.pw_uid, self.pw.pw_gid)
        if not os.path.isdir("/tmp/.X11-unix"):
            os.makedirs("/tmp/.X11-unix")
            os.chmod("/tmp/.X11-unix", 0o1777)
        self.display = next(n for n in range(20, 100)
                            if not os.path.exists(f"/tmp/.X{n}-lock")
                            and not os.path.exists(f"/tmp/.X11-unix/X{n}"))
        self.vnc_port = free_port()
        runtime = self.user_dir("xdg-runtime")
        env = {
            "HOME": self.home, "USER": USER, "LOGNAME": USER, "SHELL": "/bin/bash",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "DISPLAY": f":{self.display}",
            "XDG_RUNTIME_DIR": runtime, "EXOGUAC_RUN": self.marker, "LANG": "C.UTF-8",
        }
        self.spawn("xvnc", [
            "Xtigervnc", f":{self.display}", "-rfbport", str(self.vnc_port), "-localhost",
            "-SecurityTypes", "VncAuth", "-PasswordFile", passwd, "-geometry", "1280x800",
            "-depth", "24", "-desktop", "exoguactest", "-nolisten", "tcp",
        ], as_user=True, env=env)
        self.timings["Xvnc RFB banner"] = wait_tcp(self.vnc_port, 15, b"RFB 003.008")
        sock = f"/tmp/.X11-unix/X{self.display}"
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sock} did not appear")
            time.sleep(0.05)
        self.desktop_env = env
        remove_stale_ice_sockets(pwd.getpwnam(USER).pw_uid)
        self.spawn("xfce", ["dbus-launch", "--exit-with-session", "startxfce4"], as_user=True,
                   env=env)
        self.timings["desktop started"] = time.monotonic() - t

    # -- the peer
    def peer(self) -> None:
        t = time.monotonic()
        proc = self.spawn("peer", [sys.executable, PEER, "--listen", "127.0.0.1:0",
                                   "--events", self.events], stdout=subprocess.PIPE)
        line = proc.stdout.readline().decode()
        if not line.startswith("guacd_peer listening on "):
            raise RuntimeError(f"peer did not start: {line!r}")
        self.peer_proc = proc
        self.peer_port = int(line.rsplit(":", 1)[1])
        self.timings["peer listening"] = time.monotonic() - t

    def read_events(self) -> list[dict]:
        with open(self.events) as f:
            return [json.loads(line) for line in f if line.strip()]

    def teardown(self) -> None:
        for name, proc in reversed(self.procs):
            pids = [proc.pid] + descendants(proc.pid)
            kill_pids(pids)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        # The desktop session's daemons (dbus-daemon, xfconfd, ...) leave the process tree.
        kill_pids(marked(self.marker))
        # Nothing of this run may be left running (zombies waiting for init don't count).
        left = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [p for p in marked(self.marker) if _alive(p)]
            if self.pw is not None:
                left += [p for p in _user_pids(self.pw.pw_uid) if _alive(p) and p not in left]
            if not left:
                break
            time.sleep(0.2)
        if left:
            kill_pids(left, grace=2)
        RESULTS.append(("teardown: no process of the run left running", not left, 0.0,
                        f"left: {left}" if left else ""))
        for name in ("guac-upload.bin", "guac-vnc-upload.txt", "guac-typed-marker", "guac-dir",
                     "guac-\u00e9\U0001F600\U00020000\"q"):
            path = os.path.join(self.home, name) if self.home else ""
            if path and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif path and os.path.lexists(path):
                os.remove(path)
        if self.pw is not None:
            subprocess.run(["usermod", "-L", USER], check=False, capture_output=True)
        keep = os.environ.get("EXOGUAC_ARTIFACTS")
        if keep:
            os.makedirs(keep, exist_ok=True)
            for name in os.listdir(self.tmp):
                if name.endswith((".log", ".jsonl", ".png")):
                    shutil.copy(os.path.join(self.tmp, name), keep)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# A Guacamole client


def encode(*elements) -> bytes:
    return (",".join(f"{len(str(e))}.{e}" for e in elements) + ";").encode()


class Client:
    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[list[str]] = []
        self.changed = asyncio.Event()
        self.screen: Image.Image | None = None
        self.images = 0
        self.last_png: bytes | None = None
        self.img_streams: dict[str, list] = {}
        self.bodies: dict[str, dict] = {}
        self.acks: dict[str, list[tuple[str, int]]] = {}
        self.clip_streams: dict[str, bytearray] = {}
        self.clipboards: list[str] = []
        self.closed = False
        self.answer_sync = True
        # Ack each body and blob at once, as guacamole-common-js's readers do; off to step a
        # download by hand.
        self.auto_ack = True
        self.keepalive = True
        self.nops = 0
        self.opened = time.monotonic()
        self.closed_at: float | None = None

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.task = asyncio.create_task(self._read())
        self.ka = asyncio.create_task(self._keepalive())

    def send(self, *elements) -> None:
        self.writer.write(encode(*elements))

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(4)
            if self.keepalive and not self.closed:
                self.send("nop")

    async def _read(self) -> None:
        import codecs

        dec = codecs.getincrementaldecoder("utf-8")()
        buf = ""
        elements: list[str] = []
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                buf += dec.decode(data)
                pos = 0
                while True:
                    dot = buf.find(".", pos)
                    if dot < 0:
                        break
                    n = int(buf[pos:dot])
                    end = dot + 1 + n
                    if end >= len(buf):
                        break
                    elements.append(buf[dot + 1:end])
                    pos = end + 1
                    if buf[end] == ";":
                        self._handle(elements)
                        elements = []
                buf = buf[pos:]
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self.closed_at = time.monotonic()
            self.changed.set()

    def _handle(self, ins: list[str]) -> None:
        op, a = ins[0], ins[1:]
        self.log.append(ins)
        if op == "sync" and self.answer_sync:
            self.send("sync", a[0])
        elif op == "nop":
            self.nops += 1
        elif op == "size" and a[0] == "0":
            w, h = int(a[1]), int(a[2])
            old = self.screen
            self.screen = Image.new("RGB", (w, h))
            if old is not None:
                self.screen.paste(old, (0, 0))
        elif op == "img":
            self.img_streams[a[0]] = [a[2], int(a[4]), int(a[5]), bytearray(), a[3]]
        elif op == "clipboard":
            self.clip_streams[a[0]] = bytearray()
        elif op == "body":
            self.bodies[a[1]] = {"object": a[0], "mimetype": a[2], "name": a[3],
                                 "data": bytearray(), "done": False}
            if self.auto_ack:
                self.send("ack", a[1], "OK", 0)
        elif op == "blob":
            if a[0] in self.img_streams:
                self.img_streams[a[0]][3] += base64.b64decode(a[1])
            elif a[0] in self.bodies:
                self.bodies[a[0]]["data"] += base64.b64decode(a[1])
                if self.auto_ack:
                    self.send("ack", a[0], "OK", 0)
            elif a[0] in self.clip_streams:
                self.clip_streams[a[0]] += base64.b64decode(a[1])
        elif op == "end":
            if a[0] in self.img_streams:
                layer, x, y, data, mimetype = self.img_streams.pop(a[0])
                assert mimetype == "image/png", mimetype
                img = Image.open(io.BytesIO(bytes(data)))
                img.load()
                if layer == "0" and self.screen is not None:
                    self.screen.paste(img.convert("RGB"), (x, y))
                self.images += 1
                self.last_png = bytes(data)
            elif a[0] in self.bodies:
                self.bodies[a[0]]["done"] = True
            elif a[0] in self.clip_streams:
                self.clipboards.append(self.clip_streams.pop(a[0]).decode("utf-8"))
        elif op == "ack":
            self.acks.setdefault(a[0], []).append((a[1], int(a[2])))
        self.changed.set()

    async def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            if self.closed and not pred():
                value = pred()
                if value:
                    return value
                raise AssertionError(f"{self.name}: connection closed while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: timed out after {timeout} s waiting for "
                                     f"{what}; last instructions: {self.ops()[-12:]}")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))

    def find(self, op: str, start: int = 0) -> list[str] | None:
        for ins in self.log[start:]:
            if ins[0] == op:
                return ins
        return None

    def ops(self) -> list[str]:
        return [i[0] for i in self.log]

    async def handshake(self, protocol: str, values: dict[str, str],
                        size=(1024, 768, 96)) -> list[str]:
        self.send("select", protocol)
        args = await self.wait(lambda: self.find("args"), 5, "args")
        self.send("size", *size)
        self.send("audio", "audio/L16")
        self.send("video")
        self.send("image", "image/png", "image/jpeg")
        self.send("timezone", "UTC")
        self.send("name", "selftest")
        names = args[2:]
        self.send("connect", args[1], *[values.get(n, "") for n in names])
        return args

    async def close(self) -> None:
        self.ka.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.task, 3)

    def type_text(self, text: str) -> None:
        for ch in text:
            keysym = ord(ch) if 0x20 <= ord(ch) <= 0x7E else 0x01000000 | ord(ch)
            self.send("key", keysym, 1)
            self.send("key", keysym, 0)

    def press(self, keysym: int) -> None:
        self.send("key", keysym, 1)
        self.send("key", keysym, 0)

    async def upload(self, stream: int, filename: str, data: bytes, timeout: float = 30,
                     put_object: str | None = None) -> None:
        """A ``file`` upload, or with put_object a ``put`` of the path filename to that object;
        each blob waits for its ack, as guacamole-common-js does for uploads."""
        key = str(stream)
        self.acks.pop(key, None)
        if put_object is None:
            self.send("file", stream, "application/octet-stream", filename)
        else:
            self.send("put", put_object, stream, "text/plain", filename)
        # guacd's messages (src/common-ssh/sftp.c): one ack for the open, one per blob once
        # written, one for the end once closed; never more (checked after each step).
        await self.wait(lambda: len(self.acks.get(key, [])) >= 1, timeout, "file ack")
        assert self.acks[key] == [("SFTP: File opened", 0)], self.acks[key]
        n = 1
        for i in range(0, len(data), 6048):
            self.send("blob", stream, base64.b64encode(data[i:i + 6048]).decode())
            n += 1
            await self.wait(lambda: len(self.acks.get(key, [])) >= n, timeout, f"blob ack {n}")
            assert len(self.acks[key]) == n, self.acks[key][-3:]
            assert self.acks[key][-1] == ("SFTP: OK", 0), self.acks[key][-1]
        self.send("end", stream)
        n += 1
        await self.wait(lambda: len(self.acks.get(key, [])) >= n, timeout, "end ack")
        assert len(self.acks[key]) == n, self.acks[key][-3:]
        assert self.acks[key][-1] == ("SFTP: OK", 0), self.acks[key][-1]

    async def get(self, obj: str, name: str, timeout: float = 30) -> dict:
        self.send("get", obj, name)
        body = await self.wait(
            lambda: next((b for b in self.bodies.values() if b["name"] == name and b["done"]),
                         None), timeout, f"body for {name}")
        del self.bodies[next(k for k, v in self.bodies.items() if v is body)]
        return body


def colours(img: Image.Image) -> int:
    small = img.convert("RGB")
    found = small.getcolors(maxcolors=1 << 16)
    return len(found) if found is not None else 1 << 16


def differs(a: Image.Image, b: Image.Image) -> bool:
    return a.size != b.size or ImageChops.difference(a, b).getbbox() is not None


# ----------------------------------------------------------------------------------------------
# The checks

RESULTS: list[tuple[str, bool, float, str]] = []


@contextlib.asynccontextmanager
async def check(name: str):
    t = time.monotonic()
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure is reported
        RESULTS.append((name, False, time.monotonic() - t, f"{type(e).__name__}: {e}"))
        log(f"FAIL {name}: {type(e).__name__}: {e}")
        traceback.print_exc()
    else:
        RESULTS.append((name, True, time.monotonic() - t, ""))
        log(f"ok   {name} ({time.monotonic() - t:.2f} s)")


async def handshake_timeout_probe(rig: Rig) -> tuple[float, list[str]]:
    """select, then nothing: the peer must close within ~15 s, sending no error."""
    c = Client("timeout-probe")
    await c.open(rig.peer_port)
    c.keepalive = False
    c.send("select", "ssh")
    start = time.monotonic()
    await c.wait(lambda: c.closed, 25, "close after the handshake timeout")
    return time.monotonic() - start, c.ops()


async def client_timeout_probe(rig: Rig) -> tuple[float, list[str]]:
    """A full ssh handshake, then silence (no sync replies, no nop): dropped after ~15 s."""
    c = Client("silent-client")
    await c.open(rig.peer_port)
    c.keepalive = False
    c.answer_sync = False
    await c.handshake("ssh", {"hostname": "127.0.0.1", "port": str(rig.ssh_port),
                              "username": USER, "password": rig.password})
    await c.wait(lambda: c.find("ready"), 10, "ready")
    start = time.monotonic()
    await c.wait(lambda: c.closed, 25, "close after the client timeout")
    return time.monotonic() - start, c.ops()


async def run_checks(rig: Rig) -> None:
    timeout_task = asyncio.create_task(handshake_timeout_probe(rig))
    silent_task = asyncio.create_task(client_timeout_probe(rig))
    ssh_values = {"hostname": "127.0.0.1", "port": str(rig.ssh_port), "username": USER,
                  "password": rig.password, "enable-sftp": "true"}

    # --- SSH -------------------------------------------------------------------------------
    c = Client("ssh")
    async with check("ssh: handshake, ready, first PNG frame, prompt rendered"):
        await c.open(rig.peer_port)
        t = time.monotonic()
        args = await c.handshake("ssh", ssh_values)
        assert args[1] == "VERSION_1_5_0", args[:2]
        for name in ("hostname", "port", "username", "password", "private-key", "passphrase",
                     "enable-sftp", "sftp-root-directory", "font-size", "color-scheme"):
            assert name in args[2:], name
        ready = await c.wait(lambda: c.find("ready"), 5, "ready")
        assert ready[1].startswith("$") and len(ready[1]) == 37, ready
        rig.timings["ssh ready"] = time.monotonic() - t
        size = await c.wait(lambda: c.find("size"), 10, "size")
        assert size[1:] == ["0", "1024", "768"], size
        await c.wait(lambda: c.images >= 1, 10, "first img")
        rig.timings["ssh first img"] = time.monotonic() - t
        first = Image.open(io.BytesIO(c.last_png))
        assert first.format == "PNG" and first.size[0] > 0
        await c.wait(lambda: colours(c.screen) > 4, 15, "a rendered prompt (non-blank screen)")
        rig.timings["ssh prompt visible"] = time.monotonic() - t
        fs = await c.wait(lambda: c.find("filesystem"), 10, "filesystem object")
        assert fs[1:] == ["0", "/"], fs
        c.screen.save(os.path.join(rig.tmp, "ssh-prompt.png"))

    async with check("ssh: typing 'echo hello-guac' reaches the shell and changes the screen"):
        await asyncio.sleep(0.3)
        before = c.screen.copy()
        n = c.images
        c.type_text("echo hello-guac")
        c.press(0xFF0D)
        await c.wait(lambda: c.images > n and differs(before, c.screen), 10, "a changed frame")
        # A command with a side effect proves the keys reached a real shell.
        c.type_text("touch ~/guac-typed-marker")
        c.press(0xFF0D)
        marker = os.path.join(rig.home, "guac-typed-marker")
        for _ in range(100):
            if os.path.exists(marker):
                break
            await asyncio.sleep(0.1)
        assert os.path.exists(marker), "typed command did not run"
        await asyncio.sleep(0.3)
        typed = [e for e in rig.read_events() if e["event"] == "typed"]
        assert any(e["text"] == "echo hello-guac" and e["submitted"] for e in typed), typed
        c.screen.save(os.path.join(rig.tmp, "ssh-typed.png"))

    payload = os.urandom(200 * 1024 + 123)
    async with check("ssh: upload through a file stream lands in the home directory"):
        t = time.monotonic()
        await c.upload(1, "guac-upload.bin", payload)
        rig.timings["ssh upload 200 KiB"] = time.monotonic() - t
        path = os.path.join(rig.home, "guac-upload.bin")
        with open(path, "rb") as f:
            assert f.read() == payload, "uploaded bytes differ"
        st = os.stat(path)
        assert st.st_uid == rig.pw.pw_uid, "uploaded file not owned by the SSH user"
        ups = [e for e in rig.read_events() if e["event"] == "upload"]
        assert ups and ups[-1]["path"] == path and ups[-1]["size"] == len(payload), ups

    async with check("ssh: directory listing through the filesystem object"):
        os.makedirs(os.path.join(rig.home, "guac-dir"), exist_ok=True)
        os.chown(os.path.join(rig.home, "guac-dir"), rig.pw.pw_uid, rig.pw.pw_gid)
        # A name with a 2-byte character, an emoji, a CJK extension-B ideograph and a quote:
        # guacd writes it as raw UTF-8, escaping only '"' and '\\' (src/common/json.c).
        odd = 'guac-\u00e9\U0001F600\U00020000"q'
        with open(os.path.join(rig.home, odd), "wb"):
            pass
        os.chown(os.path.join(rig.home, odd), rig.pw.pw_uid, rig.pw.pw_gid)
        body = await c.get("0", rig.home)
        assert body["mimetype"] == STREAM_INDEX, body["mimetype"]
        raw = bytes(body["data"])
        assert b"\\u" not in raw, raw
        assert f'guac-\u00e9\U0001F600\U00020000\\"q'.encode() in raw, raw
        listing = json.loads(raw.decode("utf-8", "strict"))
        assert listing.get(f"{rig.home}/{odd}") == "application/octet-stream", listing
        assert listing.get(f"{rig.home}/guac-upload.bin") == "application/octet-stream", listing
        assert listing.get(f"{rig.home}/guac-dir") == STREAM_INDEX, listing

    async with check("ssh: download through the filesystem object"):
        t = time.monotonic()
        body = await c.get("0", f"{rig.home}/guac-upload.bin")
        rig.timings["ssh download 200 KiB"] = time.monotonic() - t
        assert body["mimetype"] == "application/octet-stream", body["mimetype"]
        assert bytes(body["data"]) == payload, "downloaded bytes differ"
        await asyncio.sleep(0.2)
        downs = [e for e in rig.read_events() if e["event"] == "download"]
        assert downs and downs[-1]["size"] == len(payload) and downs[-1]["complete"], downs

    async with check("ssh: download paced as guacd's SFTP: no blob before the first ack, then "
                     "one blob of 4096 bytes per ack, an error ack ends it without end"):
        name = f"{rig.home}/guac-upload.bin"

        async def fence() -> None:
            """A directory get: the double handles one instruction at a time, so its body
            comes after everything the double sent for the instructions before it."""
            mark = len(c.log)
            c.send("get", "0", rig.home)
            listing = await c.wait(lambda: next((i for i in c.log[mark:] if i[0] == "body"
                                                 and i[4] == rig.home), None), 10, "fence body")
            c.send("ack", listing[2], "Done", 0x0300)  # frees the listing stream

        c.auto_ack = False
        try:
            start = len(c.log)
            c.send("get", "0", name)
            body = await c.wait(lambda: next((i for i in c.log[start:] if i[0] == "body"
                                              and i[4] == name), None), 10, "body")
            stream = body[2]

            def blobs() -> list[list[str]]:
                return [i for i in c.log[start:] if i[0] == "blob" and i[1] == stream]

            await fence()
            assert not blobs(), f"{len(blobs())} blobs before the first ack"
            for k in range(1, 4):
                c.send("ack", stream, "OK", 0)
                await fence()
                got = blobs()
                assert len(got) == k, f"{len(got)} blobs after {k} acks"
                assert len(base64.b64decode(got[-1][2])) == 4096, len(base64.b64decode(got[-1][2]))
            c.send("ack", stream, "Cancelled", 0x0300)
            await fence()
            assert len(blobs()) == 3, len(blobs())
            assert not [i for i in c.log[start:] if i[0] == "end" and i[1] == stream], "end sent"
            downs = [e for e in rig.read_events() if e["event"] == "download" and e["path"] == name]
            assert downs and downs[-1]["size"] == 3 * 4096 and not downs[-1]["complete"], downs
        finally:
            c.auto_ack = True
            # Bodies stored while acks were off are not waited for by anything.
            c.bodies.clear()

    async with check("ssh: put of a path through the filesystem object"):
        data = b"put through the filesystem object\n"
        await c.upload(2, f"{rig.home}/guac-dir/put.txt", data, put_object="0")
        with open(os.path.join(rig.home, "guac-dir", "put.txt"), "rb") as f:
            assert f.read() == data
        ups = [e for e in rig.read_events() if e["event"] == "upload"]
        assert ups[-1]["via"] == "put" and ups[-1]["size"] == len(data), ups[-1]

    async with check("ssh: resize from the client"):
        start = len(c.log)
        n = c.images
        c.send("size", 800, 600)
        size = await c.wait(lambda: c.find("size", start), 5, "size after resize")
        assert size[1:] == ["0", "800", "600"], size
        await c.wait(lambda: c.images > n, 5, "a frame after resize")

    async with check("ssh: nop keep-alive after 5 s of quiet"):
        n = c.nops
        await c.wait(lambda: c.nops > n, 8, "nop")

    async with check("ssh: disconnect is logged with the terminal text"):
        c.send("disconnect")
        await c.wait(lambda: c.closed, 5, "close after disconnect")
        await asyncio.sleep(0.3)
        ends = [e for e in rig.read_events()
                if e["event"] == "disconnect" and e["conn"] == ready[1]]
        assert ends and ends[0]["reason"] == "client disconnect", ends
        assert "hello-guac" in ends[0]["screen"], ends[0]["screen"]
        assert ends[0]["keys"] >= len("echo hello-guac") + 1, ends[0]
        assert ends[0]["syncs_acked"] >= 1, ends[0]
    await c.close()

    # --- VNC -------------------------------------------------------------------------------
    v = Client("vnc")
    async with check("vnc: handshake, ready, non-blank Xfce desktop frame"):
        await v.open(rig.peer_port)
        t = time.monotonic()
        args = await v.handshake("vnc", {
            "hostname": "127.0.0.1", "port": str(rig.vnc_port), "password": rig.vnc_password,
            "enable-sftp": "true", "sftp-hostname": "127.0.0.1", "sftp-port": str(rig.ssh_port),
            "sftp-username": USER, "sftp-password": rig.password})
        assert args[1] == "VERSION_1_5_0"
        for name in ("hostname", "port", "password", "username", "enable-sftp", "sftp-hostname",
                     "sftp-port", "sftp-username", "sftp-password", "sftp-root-directory"):
            assert name in args[2:], name
        vready = await v.wait(lambda: v.find("ready"), 5, "ready")
        rig.timings["vnc ready"] = time.monotonic() - t
        size = await v.wait(lambda: v.find("size"), 10, "size")
        assert size[1:] == ["0", "1280", "800"], size
        await v.wait(lambda: v.images >= 1, 10, "first img")
        rig.timings["vnc first img"] = time.monotonic() - t
        # Xfce draws its wallpaper and panel: many colours, unlike Xvnc's plain black screen.
        await v.wait(lambda: colours(v.screen) > 64, 90, "the Xfce desktop")
        await asyncio.sleep(2)  # let the panel finish drawing before the screenshot
        rig.timings["vnc Xfce desktop visible"] = time.monotonic() - t
        v.screen.save(os.path.join(rig.tmp, "vnc-desktop.png"))
        log(f"vnc desktop: {colours(v.screen)} colours")

    async with check("vnc: mouse moves are accepted and the pointer moves on screen"):
        n = v.images
        before = v.screen.copy()
        v.send("mouse", 600, 380, 0)
        await asyncio.sleep(0.2)
        v.send("mouse", 700, 450, 0)
        await v.wait(lambda: v.images > n and differs(before, v.screen), 10,
                     "a frame after moving the mouse")
        assert not v.find("error"), v.find("error")

    async with check("vnc: clipboard to the desktop (read back with xclip) and SFTP upload"):
        text = "guac-clip-" + secrets.token_hex(4)
        v.send("clipboard", 7, "text/plain")
        v.send("blob", 7, base64.b64encode(text.encode()).decode())
        v.send("end", 7)
        await v.wait(lambda: v.find("filesystem"), 10, "filesystem object")
        data = b"uploaded over the VNC connection's SFTP\n"
        await v.upload(3, "guac-vnc-upload.txt", data)
        with open(os.path.join(rig.home, "guac-vnc-upload.txt"), "rb") as f:
            assert f.read() == data
        clips = [e for e in rig.read_events() if e["event"] == "clipboard"]
        assert any(e["text"] == text and e["delivered"] for e in clips), clips
        # What the desktop's applications now paste (TigerVNC serves the X selection).
        pasted = ""
        for _ in range(50):
            proc = await asyncio.create_subprocess_exec(
                "xclip", "-selection", "clipboard", "-o", stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=dict(rig.desktop_env), user=rig.pw.pw_uid,
                group=rig.pw.pw_gid, extra_groups=[])
            pasted = (await proc.communicate())[0].decode(errors="replace")
            if pasted == text:
                break
            await asyncio.sleep(0.1)
        assert pasted == text, f"X clipboard holds {pasted!r}"
        n = v.images
        v.send("mouse", 500, 300, 0)
        await v.wait(lambda: v.images > n, 10, "the VNC session still alive")

    async with check("vnc: the desktop's clipboard (set by xclip) reaches the client"):
        text = "from-the-desktop-" + secrets.token_hex(4)
        env = dict(rig.desktop_env)
        proc = await asyncio.create_subprocess_exec(
            "xclip", "-selection", "clipboard", "-i", stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            user=rig.pw.pw_uid, group=rig.pw.pw_gid, extra_groups=[])
        await proc.communicate(text.encode())  # xclip forks to serve the selection
        await v.wait(lambda: text in v.clipboards, 10, "a clipboard stream from the peer")
        clips = [e for e in rig.read_events() if e["event"] == "clipboard"]
        assert any(e["direction"] == "to-client" and e["text"] == text for e in clips), clips

    async with check("vnc: client resize becomes an RFB SetDesktopSize honoured by TigerVNC"):
        start = len(v.log)
        n = v.images
        v.send("size", 1024, 700)
        size = await v.wait(lambda: v.find("size", start), 10, "size after resize")
        assert size[1:] == ["0", "1024", "700"], size
        await v.wait(lambda: v.images > n and v.screen.size == (1024, 700), 10,
                     "a frame at the new size")

    async with check("vnc: disconnect"):
        v.send("disconnect")
        await v.wait(lambda: v.closed, 5, "close")
        await asyncio.sleep(0.3)
        ends = [e for e in rig.read_events()
                if e["event"] == "disconnect" and e["conn"] == vready[1]]
        assert ends and ends[0]["mouse"] >= 3 and ends[0]["frames"] >= 2, ends
    await v.close()

    # --- Bad handshakes and upstream failures ------------------------------------------------
    async def expect_error(name: str, send, status: str) -> list[str]:
        b = Client(name)
        await b.open(rig.peer_port)
        await send(b)
        err = await b.wait(lambda: b.find("error"), 10, "error")
        assert err[2] == status, err
        await b.wait(lambda: b.closed, 5, "close after the error")
        await b.close()
        return err

    async with check("bad handshake: an instruction other than select -> error 768"):
        async def first_connect(b):
            b.send("connect", "VERSION_1_5_0", "x")
        await expect_error("bad-first", first_connect, "768")

    async with check("bad handshake: a protocol without plugin -> silence, open (as guacd)"):
        b = Client("bad-proto")
        await b.open(rig.peer_port)
        b.send("select", "rdp")
        await asyncio.sleep(3)
        assert not b.closed and not b.log, b.log
        await b.close()

    async with check("bad handshake: wrong number of connect values -> error 768"):
        async def short_connect(b):
            b.send("select", "ssh")
            await b.wait(lambda: b.find("args"), 5, "args")
            b.send("size", 1024, 768, 96)
            b.send("connect", "VERSION_1_5_0", "127.0.0.1")
        err = await expect_error("bad-count", short_connect, "768")
        assert "expected" in err[1], err

    async with check("bad handshake: malformed bytes -> error 768"):
        async def garbage(b):
            b.writer.write(b"x.select;")
        await expect_error("bad-bytes", garbage, "768")

    async with check("ssh: wrong password -> ready, then error 769 and disconnect"):
        async def wrong_pw(b):
            await b.handshake("ssh", dict(ssh_values, password="not-the-password"))
            await b.wait(lambda: b.find("ready"), 5, "ready")
        await expect_error("bad-pw", wrong_pw, "769")

    async with check("vnc: wrong VNC password -> error 769"):
        async def wrong_vnc(b):
            await b.handshake("vnc", {"hostname": "127.0.0.1", "port": str(rig.vnc_port),
                                      "password": "wrongpw1"})
        await expect_error("bad-vnc", wrong_vnc, "769")

    async with check("vnc: SFTP that fails aborts the whole session before drawing (as guacd)"):
        # guac_vnc_client_thread connects SFTP after the VNC server and before the display
        # exists, and aborts on failure: ready, then error (no size, no img), then disconnect.
        holder = {}

        async def sftp_refused(b):
            holder["client"] = b
            await b.handshake("vnc", {
                "hostname": "127.0.0.1", "port": str(rig.vnc_port), "password": rig.vnc_password,
                "enable-sftp": "true", "sftp-hostname": "127.0.0.1", "sftp-port": str(free_port()),
                "sftp-username": USER, "sftp-password": rig.password})
            await b.wait(lambda: b.find("ready"), 5, "ready")
        err = await expect_error("vnc-sftp-refused", sftp_refused, "519")
        ops = [i[0] for i in holder["client"].log]
        assert "size" not in ops[:ops.index("error")] and "img" not in ops, ops
        events = [e for e in rig.read_events() if e["event"] == "sftp_failed"]
        assert events, "no sftp_failed event"
        log(f"vnc with SFTP to a closed port: {err}")

    async with check("no password is ever written to the events log"):
        with open(rig.events) as f:
            text = f.read()
        assert rig.password not in text and rig.vnc_password not in text
        hs = [e for e in rig.read_events() if e["event"] == "handshake"]
        assert hs and all(e["args"].get("password") in ("", "<redacted>") for e in hs), hs

    # --- The concurrent timeout probes -------------------------------------------------------
    async with check("handshake timeout: closed silently after ~15 s (ran concurrently)"):
        took, ops = await timeout_task
        rig.timings["handshake timeout"] = took
        assert 14 <= took <= 20, took
        assert ops == ["args"], ops

    async with check("client timeout: a silent client is dropped after ~15 s"):
        took, ops = await silent_task
        rig.timings["client timeout"] = took
        assert 14 <= took <= 22, took
        assert "ready" in ops and ops[-1] == "disconnect", ops[-5:]

    async with check("ssh: 'exit' in the shell ends the session with disconnect"):
        x = Client("ssh-exit")
        await x.open(rig.peer_port)
        await x.handshake("ssh", ssh_values)
        xready = await x.wait(lambda: x.find("ready"), 5, "ready")
        await x.wait(lambda: colours(x.screen) > 4 if x.screen else False, 15, "a prompt")
        x.type_text("exit")
        x.press(0xFF0D)
        await x.wait(lambda: x.find("disconnect"), 10, "disconnect")
        await x.wait(lambda: x.closed, 5, "close")
        await asyncio.sleep(0.2)
        ends = [e for e in rig.read_events()
                if e["event"] == "disconnect" and e["conn"] == xready[1]]
        assert ends and ends[0]["reason"] == "ssh session ended", ends
        await x.close()

    # --- SIGTERM ----------------------------------------------------------------------------
    async with check("SIGTERM: sessions get disconnect, the peer exits 0"):
        s = Client("sigterm")
        await s.open(rig.peer_port)
        await s.handshake("ssh", ssh_values)
        await s.wait(lambda: s.images >= 1, 10, "a frame")
        t = time.monotonic()
        rig.peer_proc.send_signal(signal.SIGTERM)
        await s.wait(lambda: s.find("disconnect"), 5, "disconnect")
        code = await asyncio.to_thread(rig.peer_proc.wait, 10)
        rig.timings["SIGTERM to exit"] = time.monotonic() - t
        assert code == 0, code
        assert rig.read_events()[-1]["event"] == "shutdown"
        await s.close()


def main() -> int:
    if os.geteuid() != 0:
        print("test_peer.py must run as root (it creates a user, runs sshd and Xvnc)",
              file=sys.stderr)
        return 2
    rig = Rig()
    try:
        with_setup = True
        try:
            t = time.monotonic()
            rig.user()
            rig.sshd()
            rig.desktop()
            rig.peer()
            rig.timings["setup total"] = time.monotonic() - t
            log(f"rig up: sshd :{rig.ssh_port}, Xvnc :{rig.display} (rfb {rig.vnc_port}), "
                f"peer :{rig.peer_port}")
        except Exception as e:  # noqa: BLE001
            with_setup = False
            RESULTS.append(("setup", False, 0.0, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
            for name in os.listdir(rig.tmp):
                if name.endswith(".log"):
                    with open(os.path.join(rig.tmp, name), errors="replace") as f:
                        print(f"--- {name}\n{f.read()[-3000:]}")
        if with_setup:
            asyncio.run(run_checks(rig))
    finally:
        if any(not ok for _, ok, _, _ in RESULTS):
            for name in ("peer.log", "sshd.log", "xvnc.log"):
                path = os.path.join(rig.tmp, name)
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        print(f"--- {name} (tail)\n{f.read()[-3000:]}")
        rig.teardown()
    print("\ntimings (s):")
    for k, val in rig.timings.items():
        print(f"  {k:28s} {val:7.3f}")
    passed = sum(1 for _, ok, _, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    for name, ok, secs, err in RESULTS:
        print(f"  {'PASS' if ok else 'FAIL'} {name} ({secs:.2f} s){'  ' + err if err else ''}")
    print(f"guacamole-peer: {passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
