#!/usr/bin/env python3
"""RSS of each of exoagent's servers holding its connection cap of idle connections, each
with half a request head sent (bounded: cap + 10 connections, closed by the script within a
few seconds, before the servers' 10 s header timeout):
- `web`: the Guacamole web side (`exoagent guacamole-web`) on 127.0.0.1, cap 256;
- `status`: the agent's status API on its Unix socket (`exoagent sandbox` with no services),
  cap 64.

    cargo build --release -p exoagent && python3 bench/server-idle-connections.py [web|status] [BINARY]

Prints a Markdown table row; bench/results/server-idle-connections.md records past runs."""
import json, os, socket, subprocess, sys, tempfile, time

CAP = int(os.environ.get("WEB_CAP", "256"))  # agent/src/services/guacamole/web.rs LIMITS.max_connections
EXTRA = int(os.environ.get("EXTRA", "10"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def hold(proc, connect, cap):
    """Open cap + EXTRA slow connections (half a request head each); return (RSS before, RSS
    holding them, how many the server closed at once, whether it is still alive)."""
    time.sleep(2)
    base = rss_kib(proc.pid)
    socks = []
    for _ in range(cap + EXTRA):
        s = connect()
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        except (BrokenPipeError, ConnectionResetError):
            pass  # over the cap: already closed by the server, counted below
        socks.append(s)
    time.sleep(2)
    held = rss_kib(proc.pid)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    for s in socks:
        s.close()
    return base, held, closed, proc.poll() is None


def status_socket(binary):
    cap = int(os.environ.get("STATUS_CAP", "64"))  # agent/src/httpserve.rs Limits::DEFAULT
    with tempfile.TemporaryDirectory() as d:
        conf = os.path.join(d, "etc/exoagent")
        os.makedirs(conf)
        with open(os.path.join(conf, "config.toml"), "w") as f:
            f.write("[services.jupyterlab]\nenabled = false\n")
        sock = os.path.join(d, "run/exoagent/exoagent.sock")
        proc = subprocess.Popen([binary, "sandbox", d, "--no-fixture-identity"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.1)

            def connect():
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(sock)
                return s
            base, held, closed, alive = hold(proc, connect, cap)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return cap, base, held, closed, alive


def main():
    args = sys.argv[1:]
    mode = args.pop(0) if args and args[0] in ("web", "status") else "web"
    binary = args[0] if args else "target/release/exoagent"
    if mode == "status":
        cap, base, held, closed, alive = status_socket(binary)
        print(f"| {time.strftime('%Y-%m-%d')} | status socket | {os.cpu_count()} cores | "
              f"{cap + EXTRA} | {base / 1024:.1f} MiB | {held / 1024:.1f} MiB | "
              f"{(held - base) / cap:.1f} KiB | {closed} | {'yes' if alive else 'NO'} |")
        return
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        pw = os.path.join(d, "passphrase")
        with open(pw, "w") as f:
            f.write("bench words\n")
        os.chmod(pw, 0o600)
        cfg = os.path.join(d, "web.json")
        with open(cfg, "w") as f:
            json.dump({"listen": f"127.0.0.1:{port}", "guacd": f"127.0.0.1:{free_port()}",
                       "username": "bench", "password_file": pw, "session_timeout_s": 3600,
                       "connections": {}}, f)
        proc = subprocess.Popen([binary, "guacamole-web", "--config", cfg],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            base, held, closed, alive = hold(
                proc, lambda: socket.create_connection(("127.0.0.1", port), timeout=5), CAP)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"| {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores | {CAP + EXTRA} | "
          f"{base / 1024:.1f} MiB | {held / 1024:.1f} MiB | {(held - base) / CAP:.1f} KiB | "
          f"{closed} | {'yes' if alive else 'NO'} |")


if __name__ == "__main__":
    main()
