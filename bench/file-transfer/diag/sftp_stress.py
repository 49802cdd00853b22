#!/usr/bin/env python3
"""Diagnostic (bench/file-transfer/diag, not a test): download one big file through the real
guacd 1.3.0's SSH SFTP as fast as a client can ack, and say whether it arrived whole. Run with
the rig's venv python (tests/guacamole/setup.sh): it reuses test_peer's Guacamole client.

sftp_stress.py GUACD_PORT SSH_HOST SSH_PORT USER PASSWORD PATH SIZE
"""
import asyncio, base64, hashlib, os, sys, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../tests/guacamole"))
from test_peer import Client  # noqa: E402

MiB = 1 << 20


class CountingClient(Client):
    """Counts a download's bytes and keeps its last MiB instead of the whole body."""

    def __init__(self) -> None:
        super().__init__("stress")
        self.stream = None
        self.got = 0
        self.tail = bytearray()
        self.ended = False
        self.started = None
        self.last_print = time.monotonic()

    def _handle(self, ins: list[str]) -> None:
        op, a = ins[0], ins[1:]
        if op == "body":
            self.stream = a[1]
            self.started = time.monotonic()
            self.send("ack", a[1], "OK", 0)
        elif op == "blob" and a[0] == self.stream:
            data = base64.b64decode(a[1])
            self.got += len(data)
            self.tail += data
            if len(self.tail) > 2 * MiB:
                del self.tail[:len(self.tail) - MiB]
            self.send("ack", a[0], "OK", 0)
            now = time.monotonic()
            if now - self.last_print > 10:
                print(f"  {self.got} B, {self.got / (now - self.started) / MiB:.1f} MiB/s", flush=True)
                self.last_print = now
        elif op == "end" and a[0] == self.stream:
            self.ended = True
            self.changed.set()
        else:
            if op in ("error", "disconnect"):
                print("guacd:", ins, flush=True)
            super()._handle(ins)


async def main() -> int:
    gport, host, sport, user, pw, path, size = sys.argv[1:8]
    size = int(size)
    c = CountingClient()
    await c.open(int(gport))
    await c.handshake("ssh", {"hostname": host, "port": sport, "username": user, "password": pw,
                              "enable-sftp": "true"})
    fs = await c.wait(lambda: c.find("filesystem"), 60, "filesystem")
    c.send("get", fs[1], path)
    try:
        await c.wait(lambda: c.ended, 3600, "the download's end")
    except AssertionError as e:
        print(e, flush=True)
    dt = time.monotonic() - (c.started or time.monotonic())
    await c.close()
    with open(path, "rb") as f:
        f.seek(max(0, size - MiB))
        want_tail = hashlib.sha256(f.read()).hexdigest()
    tail_ok = hashlib.sha256(bytes(c.tail[-MiB:])).hexdigest() == want_tail
    ok = c.got == size and tail_ok
    print(f"RESULT {'WHOLE' if ok else 'SHORT'} got {c.got} of {size} B in {dt:.0f} s "
          f"({c.got / max(dt, 1e-9) / MiB:.1f} MiB/s), last MiB {'ok' if tail_ok else 'differs'}", flush=True)
    return 0 if ok else 1


sys.exit(asyncio.run(main()))
