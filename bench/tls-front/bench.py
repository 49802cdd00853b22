#!/usr/bin/env python3
"""TLS front benchmark: `exoagent front` versus nginx (Debian's) terminating the same TLS in
front of the same backend, plus the direct path as baseline. Run through run.sh, which installs
what is missing and builds exoagent:

    bash bench/tls-front/run.sh [--reps 3] [--duration 5] [--warmup 1] [--conns 1,16,64]
        [--bodies 1k,1m] [--wrk-threads 2] [--ws-round-trips 2000] [--ws-sizes 32,65536]
        [--load-cpus LIST --server-cpus LIST] [--json FILE]

Everything listens on 127.0.0.1 (ports picked free at start). Prints a Markdown report;
bench/results/tls-front.md records past runs.

- Backend: nginx serving two static files (1 KiB and 1 MiB, from memory after the first read)
  on one loopback port, and a Node `ws` echo server on another.
- exoagent: `exoagent front --listen … --backend …` (release build), one for the HTTP backend
  and one for the echo backend; a tokio multi-thread runtime with 1 worker for `front`
  (agent/src/cli/mod.rs; 2 before commit ef49abb), rustls 0.23 with ring.
- nginx front: one nginx, `worker_processes N` (`--nginx-workers`, default 1 = exoagent's
  front workers; 2 was used before the front went to one worker), `listen … ssl`, TLS 1.3
  only, same certificate and key, `proxy_pass` to an `upstream` with `keepalive 32`,
  `proxy_http_version 1.1`, `proxy_set_header Connection ""`, keep-alive limits raised so no
  side closes connections during a run, access log off; the WebSocket server block with the
  usual `Upgrade`/`Connection` map.
- Load: wrk (keep-alive, HTTPS, the same OpenSSL client for both), runs interleaved
  direct/exoagent/nginx with the order rotated each repetition, a warm-up run before each
  measured run, medians over repetitions. WebSocket round trips: Node `ws` client, sequential
  echoes, taking turns over the three paths in slices.
- Front CPU: utime+stime of the front's processes (/proc/PID/stat, all threads; nginx master
  and workers) over each measured run; RSS: VmRSS summed over the front's processes (and PSS
  from smaps_rollup), after start, sampled every 100 ms under load, and after the load.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")
BODIES = {"1k": 1024, "1m": 1024 * 1024}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, what):
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} is not listening on 127.0.0.1:{port}")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Front:
    """A front (or backend) as a set of processes: the started one and its children."""

    def __init__(self, name, proc):
        self.name, self.proc = name, proc

    def pids(self):
        return [self.proc.pid] + children(self.proc.pid)

    def cpu_s(self):
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total / TICK

    def memory_kib(self):
        """(RSS, PSS) in KiB summed over the processes."""
        rss = pss = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Rss:"):
                            rss += int(line.split()[1])
                        elif line.startswith("Pss:"):
                            pss += int(line.split()[1])
            except OSError:
                pass
        return rss, pss


class Sampler(threading.Thread):
    """Highest RSS/PSS of some fronts, every 100 ms, while running."""

    def __init__(self, fronts):
        super().__init__(daemon=True)
        self.fronts, self.peak, self.stop = fronts, {f.name: (0, 0) for f in fronts}, threading.Event()
        self.run_peak = dict(self.peak)  # since the last reset()

    def reset(self):
        self.run_peak = {f.name: (0, 0) for f in self.fronts}

    def run(self):
        while not self.stop.wait(0.1):
            for f in self.fronts:
                rss, pss = f.memory_kib()
                for peak in (self.peak, self.run_peak):
                    old = peak.get(f.name, (0, 0))
                    peak[f.name] = (max(old[0], rss), max(old[1], pss))


def machine_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / TICK  # all but idle and iowait


def write(path, text, mode=None):
    with open(path, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)


def nginx_backend_conf(d, port, root):
    return f"""daemon off;
master_process on;
worker_processes 2;
pid {d}/backend.pid;
error_log {d}/backend-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16 inactive=1h;
    open_file_cache_valid 1h;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    default_type application/octet-stream;
    client_body_temp_path {d}/backend-tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def nginx_front_conf(d, port, ws_port, backend, ws_backend, cert, key, buffering, workers):
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {d}/front.pid;
error_log {d}/front-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/front-tmp/body;
    proxy_temp_path {d}/front-tmp/proxy;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.3;
    upstream backend {{
        server {backend};
        keepalive 32;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' close;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
{buffering}
        }}
    }}
    server {{
        listen 127.0.0.1:{ws_port} ssl;
        location / {{
            proxy_pass http://{ws_backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


# nginx's response buffering: by default a response larger than its 8 × 4 KiB buffers spills to
# a temporary file on disk; a best-practice reverse proxy turns that off (here, and stated).
NGINX_BUFFERING = {
    "nodisk": "            proxy_max_temp_file_size 0;",
    "off": "            proxy_buffering off;",
    "default": "",
}


def tls_parameters(port):
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-brief"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    text = out.stdout + out.stderr
    found = {}
    for key, pattern in [("protocol", r"Protocol version: (\S+)"),
                         ("cipher", r"Ciphersuite: (\S+)"),
                         ("key exchange", r"(?:Negotiated TLS1.3 group|Server Temp Key): ([^\n]+)"),
                         ("signature", r"Signature type: (\S+)")]:
        m = re.search(pattern, text)
        found[key] = m.group(1).strip() if m else "?"
    return found


def run_wrk(args, url, conns, duration, cpus):
    threads = min(conns, args.wrk_threads)
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--latency",
           "--timeout", "10s", "-s", os.path.join(HERE, "report.lua"), url]
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"wrk failed ({proc.returncode}): {err}{out}")
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def median(values):
    return statistics.median(values) if values else float("nan")


def spawn(cmd, log, cpus):
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE,
                            start_new_session=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the exoagent binary")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds (wrk takes whole seconds)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--conns", default="1,16,64")
    p.add_argument("--bodies", default="1k,1m")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--ws-round-trips", type=int, default=2000)
    p.add_argument("--ws-warmup", type=int, default=200)
    p.add_argument("--ws-sizes", default="32,65536")
    p.add_argument("--nginx-buffering", choices=sorted(NGINX_BUFFERING), default="nodisk")
    p.add_argument("--nginx-workers", type=int, default=1,
                   help="nginx front's worker_processes (default 1, as exoagent's front)")
    p.add_argument("--load-cpus", default="", help="taskset CPU list for wrk and the WebSocket client")
    p.add_argument("--server-cpus", default="", help="taskset CPU list for the fronts and backends")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = p.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    bodies = args.bodies.split(",")
    ws_sizes = [int(s) for s in args.ws_sizes.split(",")]

    work = tempfile.mkdtemp(prefix="tls-front-bench-")
    os.chmod(work, 0o755)  # nginx workers run as nobody; the key stays 0600 (read by the master)
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    root = os.path.join(work, "root")
    os.makedirs(root)
    for name, size in BODIES.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(os.urandom(size))
    for sub in ("backend-tmp", "front-tmp/body", "front-tmp/proxy"):
        os.makedirs(os.path.join(work, sub))
    ports = {k: free_port() for k in ("backend", "echo", "exo", "exo_ws", "nginx", "nginx_ws")}
    backend, echo = f"127.0.0.1:{ports['backend']}", f"127.0.0.1:{ports['echo']}"
    write(os.path.join(work, "backend.conf"), nginx_backend_conf(work, ports["backend"], root))
    write(os.path.join(work, "front.conf"), nginx_front_conf(
        work, ports["nginx"], ports["nginx_ws"], backend, echo, cert, key,
        NGINX_BUFFERING[args.nginx_buffering], args.nginx_workers))

    log = open(os.path.join(work, "servers.log"), "w")
    procs = []
    try:
        def start(cmd, port, what):
            proc = spawn(cmd, log, args.server_cpus)
            procs.append(proc)
            wait_port(port, proc, what)
            return proc

        backend_proc = start(["nginx", "-p", work, "-c", os.path.join(work, "backend.conf")],
                             ports["backend"], "backend nginx")
        start(["node", os.path.join(HERE, "ws-echo.mjs"), str(ports["echo"])], ports["echo"], "ws echo")
        exo = Front("exoagent", start([args.bin, "front", "--listen", f"127.0.0.1:{ports['exo']}",
                                       "--backend", backend, "--cert", cert, "--key", key],
                                      ports["exo"], "exoagent front"))
        start([args.bin, "front", "--listen", f"127.0.0.1:{ports['exo_ws']}", "--backend", echo,
               "--cert", cert, "--key", key], ports["exo_ws"], "exoagent front (WebSocket)")
        ngx = Front("nginx", start(["nginx", "-p", work, "-c", os.path.join(work, "front.conf")],
                                   ports["nginx"], "nginx front"))
        time.sleep(0.5)  # nginx workers up
        after_start = {f.name: f.memory_kib() for f in (exo, ngx)}
        backend_front = Front("backend", backend_proc)

        urls = {"direct": f"http://{backend}",
                "exoagent": f"https://127.0.0.1:{ports['exo']}",
                "nginx": f"https://127.0.0.1:{ports['nginx']}"}
        fronts = {"exoagent": exo, "nginx": ngx}
        tls = {name: tls_parameters(ports[name]) for name in ("exo", "nginx")}
        # Same answer through each path.
        for name, url in urls.items():
            for body, size in BODIES.items():
                r = run_wrk(args, f"{url}/{body}", 1, 1, args.load_cpus)
                if r["requests"] == 0 or r["errors_status"] or r["bytes"] < size * r["requests"]:
                    sys.exit(f"{name} /{body}: {r}")

        order = ["direct", "exoagent", "nginx"]
        results = {}  # (body, conns, target) -> list of runs
        sampler = Sampler([exo, ngx])
        sampler.start()
        busy0, wall0 = machine_busy_s(), time.time()
        own_cpu0 = sum(f.cpu_s() for f in (exo, ngx, backend_front))
        wrk_cpu = 0.0
        for body in bodies:
            for c in conns:
                for rep in range(args.reps):
                    rot = order[rep % 3:] + order[:rep % 3]
                    for target in rot:
                        url = f"{urls[target]}/{body}"
                        run_wrk(args, url, c, args.warmup, args.load_cpus)
                        f = fronts.get(target)
                        cpu0 = f.cpu_s() if f else 0
                        b0 = backend_front.cpu_s()
                        r0 = os.times()
                        sampler.reset()
                        r = run_wrk(args, url, c, args.duration, args.load_cpus)
                        r1 = os.times()
                        r["front_rss_peak_kib"] = sampler.run_peak[target][0] if f else 0
                        wrk_cpu += (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
                        r["front_cpu_s"] = (f.cpu_s() - cpu0) if f else 0
                        r["backend_cpu_s"] = backend_front.cpu_s() - b0
                        results.setdefault((body, c, target), []).append(r)
                        print(f"{body} c={c} rep={rep + 1} {target}: {r['requests'] / r['duration_us'] * 1e6:.0f} req/s "
                              f"p50 {r['p50_us']} µs p99 {r['p99_us']} µs front cpu {r['front_cpu_s']:.2f} s",
                              file=sys.stderr)
        sampler.stop.set()
        sampler.join()
        busy_http = machine_busy_s() - busy0
        wall_http = time.time() - wall0
        own_http = sum(f.cpu_s() for f in (exo, ngx, backend_front)) - own_cpu0 + wrk_cpu
        time.sleep(2)
        after_load = {f.name: f.memory_kib() for f in (exo, ngx)}

        ws = {}
        for size in ws_sizes:
            cmd = ["node", os.path.join(HERE, "ws-rtt.mjs"), "--ca", cert, "--size", str(size),
                   "--round-trips", str(args.ws_round_trips), "--warmup", str(args.ws_warmup),
                   f"direct=ws://{echo}/", f"exoagent=wss://127.0.0.1:{ports['exo_ws']}/",
                   f"nginx=wss://127.0.0.1:{ports['nginx_ws']}/"]
            if args.load_cpus:
                cmd = ["taskset", "-c", args.load_cpus] + cmd
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=600)
            if out.returncode != 0:
                sys.exit(f"ws-rtt failed: {out.stderr}")
            ws[size] = json.loads(out.stdout.strip().splitlines()[-1])
        alive = {name: f.proc.poll() is None for name, f in fronts.items()}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    report(args, conns, bodies, ws_sizes, results, ws, tls, after_start, sampler.peak, after_load,
           alive, busy_http, wall_http, own_http)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args),
                       "runs": {f"{b} c={c} {t}": v for (b, c, t), v in results.items()},
                       "ws": ws, "tls": tls, "rss_after_start": after_start, "rss_peak": sampler.peak,
                       "rss_after_load": after_load}, f, indent=1)


def report(args, conns, bodies, ws_sizes, results, ws, tls, after_start, peak, after_load,
           alive, busy_http, wall_http, own_http):
    def runs(body, c, t):
        return results.get((body, c, t), [])

    def rate(r, body):
        if body == "1k":
            return r["requests"] / r["duration_us"] * 1e6
        return r["bytes"] / r["duration_us"] * 1e6 / 2**20

    def med(body, c, t, fn):
        return median([fn(r) for r in runs(body, c, t)])

    def span(body, c, t, fn, fmt):
        v = [fn(r) for r in runs(body, c, t)]
        return f"{fmt.format(median(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})" if v else "—"

    print("| metric | direct to backend (plain HTTP) | exoagent front | nginx | exoagent ÷ nginx |")
    print("|---|---|---|---|---|")
    for body in bodies:
        unit = "requests/s" if body == "1k" else "MiB/s"
        fmt = "{:.0f}" if body == "1k" else "{:.1f}"
        for c in conns:
            f = lambda r, b=body: rate(r, b)
            e, n = med(body, c, "exoagent", f), med(body, c, "nginx", f)
            print(f"| {body} body, {c} conn, {unit} (median, min–max) | {span(body, c, 'direct', f, fmt)} | "
                  f"{span(body, c, 'exoagent', f, fmt)} | {span(body, c, 'nginx', f, fmt)} | {e / n:.2f}× |")
        for c in conns:
            for q in ("p50", "p99"):
                g = lambda r, q=q: r[f"{q}_us"]
                e, n = med(body, c, "exoagent", g), med(body, c, "nginx", g)
                print(f"| {body} body, {c} conn, latency {q}, µs | {med(body, c, 'direct', g):.0f} | "
                      f"{e:.0f} | {n:.0f} | {e / n:.2f}× |")
        for c in conns:
            g = lambda r: r["front_cpu_s"] / max(r["requests"], 1) * 1e6
            e, n = med(body, c, "exoagent", g), med(body, c, "nginx", g)
            print(f"| {body} body, {c} conn, front CPU per request, µs | — | {e:.1f} | {n:.1f} | {e / n:.2f}× |")
        for c in conns:
            g = lambda r: r["front_rss_peak_kib"] / 1024
            e, n = med(body, c, "exoagent", g), med(body, c, "nginx", g)
            print(f"| {body} body, {c} conn, front RSS peak during the run, MiB | — | {e:.1f} | {n:.1f} | {e - n:+.1f} MiB |")
        c = 1
        for q in ("p50", "p99"):
            g = lambda r, q=q: r[f"{q}_us"]
            d = med(body, c, "direct", g)
            e, n = med(body, c, "exoagent", g) - d, med(body, c, "nginx", g) - d
            print(f"| {body} body, added latency {q} at 1 conn (front − direct), µs | — | {e:.0f} | {n:.0f} | "
                  f"{(e / n if n else float('nan')):.2f}× |")
    for size in ws_sizes:
        for q in ("p50", "p99"):
            d, e, n = (ws[size][t][f"{q}_us"] for t in ("direct", "exoagent", "nginx"))
            print(f"| WebSocket echo {size} B, round trip {q}, µs | {d:.0f} | {e:.0f} | {n:.0f} | {e / n:.2f}× |")
        for q in ("p50", "p99"):
            d, e, n = (ws[size][t][f"{q}_us"] for t in ("direct", "exoagent", "nginx"))
            print(f"| WebSocket echo {size} B, added {q} (front − direct), µs | — | {e - d:.0f} | {n - d:.0f} | "
                  f"{((e - d) / (n - d) if n != d else float('nan')):.2f}× |")
    for label, mem, idx in [("RSS after start", after_start, 0), ("RSS peak under load (100 ms samples)", peak, 0),
                            ("RSS after the load", after_load, 0), ("PSS after start", after_start, 1),
                            ("PSS peak under load", peak, 1)]:
        e, n = mem["exoagent"][idx] / 1024, mem["nginx"][idx] / 1024
        print(f"| front {label}, MiB (nginx: master + {args.nginx_workers} workers) | — | {e:.1f} | {n:.1f} | {e - n:+.1f} MiB |")
    print(f"| front still running at the end | — | {'yes' if alive['exoagent'] else 'NO'} | "
          f"{'yes' if alive['nginx'] else 'NO'} | — |")
    errors = {t: sum(r[k] for (b, c, tt), rs in results.items() if tt == t for r in rs
                     for k in r if k.startswith("errors_")) for t in ("direct", "exoagent", "nginx")}
    print(f"| wrk errors (all measured runs) | {errors['direct']} | {errors['exoagent']} | {errors['nginx']} | — |")
    print()
    for name, label in (("exo", "exoagent"), ("nginx", "nginx")):
        t = tls[name]
        print(f"TLS with {label}: {t['protocol']}, {t['cipher']}, key exchange {t['key exchange']}, signature {t['signature']} (openssl s_client).  ")
    cpu = os.popen("grep -m1 'model name' /proc/cpuinfo").read().split(":", 1)[-1].strip()
    load = open("/proc/loadavg").read().split()[:3]
    print(f"Machine: {os.cpu_count()} × {cpu}; HTTP phase {wall_http:.0f} s, machine CPU busy {busy_http:.0f} core-s, "
          f"of which about {max(busy_http - own_http, 0):.0f} core-s outside the benchmark's processes "
          f"(~{max(busy_http - own_http, 0) / wall_http:.2f} cores); load average at the end {' '.join(load)}; "
          f"reps {args.reps} × {args.duration:g} s after {args.warmup:g} s warm-up each; wrk threads min(conns, {args.wrk_threads}); "
          f"nginx buffering: {args.nginx_buffering}; nginx workers: {args.nginx_workers}; pinning: load {args.load_cpus or 'none'}, servers {args.server_cpus or 'none'}; "
          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")


if __name__ == "__main__":
    main()
