#!/usr/bin/env python3
"""Diagnostic (bench/file-transfer/diag, not a test): download one big file through the real
guacd 1.3.0's SSH SFTP as fast as a client can ack, and say whether it arrived whole. Needs the rig (tests/guacamole/rig.py) and guacd.

stress.py GUACD_PORT SSH_HOST SSH_PORT USER PASSWORD PATH SIZE
"""
import base64, codecs, hashlib, socket, sys, time

def enc(*e):
    return (",".join(f"{len(str(x))}.{x}" for x in e) + ";").encode()

def main():
    gport, host, sport, user, pw, path, size = sys.argv[1:8]
    size = int(size)
    s = socket.create_connection(("127.0.0.1", int(gport)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dec = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    def instructions():
        nonlocal buf
        els = []
        while True:
            data = s.recv(1 << 20)
            if not data:
                return
            buf += dec.decode(data)
            pos = 0
            while True:
                dot = buf.find(".", pos)
                if dot < 0:
                    break
                n = int(buf[pos:dot]); end = dot + 1 + n
                if end >= len(buf):
                    break
                els.append(buf[dot + 1:end]); pos = end + 1
                if buf[end] == ";":
                    yield els; els = []
            buf = buf[pos:]
    it = instructions()
    s.sendall(enc("select", "ssh"))
    args = next(it)
    assert args[0] == "args", args
    vals = {"hostname": host, "port": sport, "username": user, "password": pw, "enable-sftp": "true"}
    s.sendall(enc("size", 1024, 768, 96) + enc("audio") + enc("video") + enc("image", "image/png")
              + enc("timezone", "UTC") + enc("name", "stress")
              + enc("connect", args[1], *[vals.get(n, "") for n in args[2:]]))
    stream = None; got = 0; tail = bytearray(); t0 = None; last_print = time.monotonic()
    for ins in it:
        op = ins[0]
        if op == "sync":
            s.sendall(enc("sync", ins[1]))
        elif op == "filesystem" and t0 is None:
            s.sendall(enc("get", ins[1], path)); t0 = time.monotonic()
        elif op == "body":
            stream = ins[2]; s.sendall(enc("ack", stream, "OK", 0))
        elif op == "blob" and ins[1] == stream:
            d = base64.b64decode(ins[2]); got += len(d)
            tail += d
            if len(tail) > 2 << 20:
                del tail[:len(tail) - (1 << 20)]
            s.sendall(enc("ack", stream, "OK", 0))
            now = time.monotonic()
            if now - last_print > 10:
                print(f"  {got} B, {got / (now - t0) / 1048576:.1f} MiB/s", flush=True); last_print = now
        elif op == "end" and ins[1] == stream:
            break
        elif op in ("error", "disconnect"):
            print("guacd:", ins, flush=True); break
    dt = time.monotonic() - (t0 or time.monotonic())
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 20))); want_tail = hashlib.sha256(f.read()).hexdigest()
    have_tail = hashlib.sha256(bytes(tail[-(1 << 20):])).hexdigest()
    ok = got == size and want_tail == have_tail
    print(f"RESULT {'WHOLE' if ok else 'SHORT'} got {got} of {size} B in {dt:.0f} s "
          f"({got / max(dt, 1e-9) / 1048576:.1f} MiB/s), last MiB {'ok' if want_tail == have_tail else 'differs'}", flush=True)
    return 0 if ok else 1

sys.exit(main())
