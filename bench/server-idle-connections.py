#!/usr/bin/env python3
"""RSS of the Guacamole web side (`exoagent guacamole-web`) holding its connection cap of idle
connections, each with half a request head sent (loopback only, bounded: cap + 10 connections,
closed by the script within a few seconds, before the server's 10 s header timeout).

    cargo build --release -p exoagent && python3 bench/server-idle-connections.py [BINARY]

Prints a Markdown table row; bench/results/server-idle-connections.md records past runs."""
import json, os, socket, subprocess, sys, tempfile, time

CAP = int(os.environ.get("CAP", "256"))  # agent/src/services/guacamole/web.rs LIMITS.max_connections
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


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/exoagent"
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
            time.sleep(2)
            base = rss_kib(proc.pid)
            socks = []
            for _ in range(CAP + EXTRA):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /guacamole/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(s)
            time.sleep(2)
            held = rss_kib(proc.pid)
            # Connections over the cap were closed at once.
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
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"| {time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores | {CAP + EXTRA} | "
          f"{base / 1024:.1f} MiB | {held / 1024:.1f} MiB | {(held - base) / CAP:.1f} KiB | "
          f"{closed} | {'yes' if alive else 'NO'} |")


if __name__ == "__main__":
    main()
