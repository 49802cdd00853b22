#!/usr/bin/env python3
"""Cloud API calls made by exoagent per instance boot, per state change and while idle, with
many agents against one real Nova; side by side with Exosphere's console polling.

    python3 bench/openstack-calls.py [--agents 8] [--idle 300] [--record]

Brings up the real-OpenStack harness (tests/openstack/), boots N servers as `demo`, and runs N
release-build agents in sandboxes at once, each with its server's identity (metadata service
through the harness's metadata proxy), the access-rule-restricted credential and a real
JupyterLab. Calls are counted on the server side, from gunicorn's access logs of Keystone, Nova
and nova-metadata, attributed by User-Agent (`exoagent/…` versus the peer's).

Phases: boot (agents start → every server shows setup:complete and jupyterlab:ready), state
changes (each agent's JupyterLab is hung with SIGSTOP → degraded, then SIGCONT → ready: two
changes per agent), idle (no change for --idle seconds).

The peer is what Exosphere does instead, with one browser tab open on each instance
(reference/exosphere.md §2.4): `os-getConsoleOutput` for the setup status every 15 s until it
sees `complete`, and for resource usage every 2 min; and, when the status changes, one metadata
write of `exoSetup` from the browser. It runs in the same run against the same Nova; it is
told "complete" when the agent completes (the fake virt driver's console holds no status
lines). Without a tab open the peer makes no calls and records nothing at all.

--record writes bench/results/openstack-calls.md.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "openstack"))
import harness  # noqa: E402  (the harness's HTTP and token helpers)

PEER_AGENT = "exosphere-peer/bench"
ACCESS = re.compile(r'"(\S+) (\S+) HTTP/[\d.]+" (\d+) \S+ "[^"]*" "([^"]*)"\s*$')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AccessLogs:
    """Requests seen by Keystone, Nova and nova-metadata since a mark."""

    FILES = {"keystone": "keystone-access.log", "nova": "nova-api-access.log",
             "metadata": "nova-metadata-access.log"}

    def __init__(self):
        self.offsets = {}

    def mark(self):
        self.offsets = {name: self.path(name).stat().st_size for name in self.FILES}

    def path(self, name):
        return harness.LOG / self.FILES[name]

    def since_mark(self):
        """[(service, method, path, status, user_agent)] since the mark."""
        out = []
        for name in self.FILES:
            with open(self.path(name), "rb") as f:
                f.seek(self.offsets[name])
                for line in f.read().decode(errors="replace").splitlines():
                    found = ACCESS.search(line)
                    if found:
                        method, path, status, agent = found.groups()
                        out.append((name, method, path, int(status), agent))
        return out


def kind_of(service, method, path):
    if service == "keystone":
        return "keystone token" if path.startswith("/v3/auth/tokens") else f"keystone {method}"
    if service == "metadata":
        return f"metadata {method} {path.split('?')[0].rsplit('/', 1)[-1]}"
    if "/tags" in path:
        return f"nova {method} tag"
    if "/metadata" in path:
        return f"nova {method} metadata"
    if path.endswith("/action"):
        return "nova console log"
    return f"nova {method} other"


class Agent:
    def __init__(self, binary, server, clouds):
        self.binary = binary
        self.server = server
        self.dir = Path(tempfile.mkdtemp(prefix="exoagent-bench-os-"))
        self.port = free_port()
        (self.dir / "etc/exoagent").mkdir(parents=True)
        (self.dir / "etc/exoagent/config.toml").write_text(
            f'[services.jupyterlab]\nenabled = true\nbind = "127.0.0.1"\nport = {self.port}\n\n'
            f"[supervise]\nliveness_interval_s = 1\nliveness_failures = 2\n\n"
            f'[cloud]\nmetadata_url = "{harness.METADATA_PROXY}/{server}"\n'
            f'clouds_yaml = "{clouds}"\ncloud_name = "agent-tags"\n')
        self.process = None

    def start(self):
        self.out = open(self.dir / "agent.log", "wb")
        self.process = subprocess.Popen(
            [self.binary, "sandbox", "--no-fixture-identity", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    def status(self):
        done = subprocess.run([self.binary, "--sandbox-dir", str(self.dir), "status", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return {}

    def stop(self):
        if self.process:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait()
        subprocess.run([self.binary, "--sandbox-dir", str(self.dir), "down", "--grace", "5"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Peer(threading.Thread):
    """Exosphere with a tab open on one instance."""

    def __init__(self, server, token, stop):
        super().__init__(daemon=True)
        self.server, self.token, self.stop_event = server, token, stop
        self.complete = threading.Event()

    def console(self):
        harness.http("POST", f"{harness.COMPUTE}/servers/{self.server}/action", self.token,
                     {"os-getConsoleOutput": {}}, headers={"User-Agent": PEER_AGENT})

    def write_status(self, status):
        value = json.dumps({"status": status, "epoch": int(time.time() * 1000)})
        harness.http("PUT", f"{harness.COMPUTE}/servers/{self.server}/metadata/exoSetup",
                     self.token, {"meta": {"exoSetup": value}},
                     headers={"User-Agent": PEER_AGENT})

    def run(self):
        started = time.monotonic()
        next_status, next_usage, reported = started, started, None
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_status and reported != "complete":
                self.console()
                seen = "complete" if self.complete.is_set() else "running"
                if seen != reported:
                    self.write_status(seen)
                    reported = seen
                next_status = now + 15
            if now >= next_usage:
                self.console()
                next_usage = now + 120
            self.stop_event.wait(0.5)


def wait(what, check, budget):
    deadline = time.monotonic() + budget
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)




def tally(requests, servers):
    """Per phase: calls by kind for agents and peer, and per-server spread for agents."""
    by = {"exoagent": Counter(), "peer": Counter()}
    per_server = Counter()
    for service, method, path, status, agent in requests:
        who = "exoagent" if agent.startswith("exoagent/") else \
            "peer" if agent == PEER_AGENT else None
        if who is None:
            continue
        by[who][kind_of(service, method, path)] += 1
        if who == "exoagent":
            for server in servers:
                if server in path:
                    per_server[server] += 1
    return by, per_server


def main():
    parser = argparse.ArgumentParser(description="exoagent's cloud API calls, counted")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--idle", type=int, default=300, help="idle window, seconds")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    if harness.main(["up"]) != 0:
        raise SystemExit("the OpenStack harness did not come up")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "exoagent"], cwd=ROOT,
                   check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = str((ROOT / target / "release" / "exoagent").resolve())
    env = json.loads(harness.ENV_FILE.read_text())
    config = json.loads(harness.SECRETS_FILE.read_text())
    token, _ = harness.token_for(harness.password_auth("demo", config["passwords"]["demo"]),
                                 harness.project_scope("demo"))

    servers = []
    for i in range(args.agents):
        status, _, body = harness.http("POST", f"{harness.COMPUTE}/servers", token, {"server": {
            "name": f"bench-{i}", "imageRef": env["image_id"], "flavorRef": env["flavor_id"],
            "networks": [{"uuid": env["network_id"]}]}})
        servers.append(body["server"]["id"])

    def all_active():
        states = [harness.http("GET", f"{harness.COMPUTE}/servers/{s}", token)[2]["server"]
                  ["status"] for s in servers]
        if "ERROR" in states:
            raise SystemExit("a server went to ERROR")
        return all(state == "ACTIVE" for state in states)
    wait("servers ACTIVE", all_active, 300)

    agents = [Agent(binary, s, env["clouds_yaml"]) for s in servers]
    stop_peers = threading.Event()
    peers = [Peer(s, token, stop_peers) for s in servers]
    logs = AccessLogs()
    results = {}
    try:
        # Boot.
        logs.mark()
        t0 = time.monotonic()
        for agent, peer in zip(agents, peers):
            agent.start()
            peer.start()
        ready = {"exoagent:setup:complete", "exoagent:jupyterlab:ready"}
        for agent, peer in zip(agents, peers):
            wait("an agent to complete",
                 lambda: agent.status().get("setup", {}).get("state") == "complete", 600)
            peer.complete.set()
        wait("Nova to show every server ready",
             lambda: all(harness.agent_tags(token, s) == ready for s in servers), 300)
        boot_seconds = time.monotonic() - t0
        time.sleep(16)  # let every peer see "complete" once
        results["boot"] = (tally(logs.since_mark(), servers), boot_seconds)

        # Two state changes per agent.
        logs.mark()
        t0 = time.monotonic()
        for agent in agents:
            pid = agent.status()["services"][0]["pid"]
            os.kill(pid, signal.SIGSTOP)
            wait("degraded in Nova", lambda: "exoagent:jupyterlab:degraded"
                 in harness.agent_tags(token, agent.server), 120)
            os.kill(pid, signal.SIGCONT)
            wait("ready in Nova", lambda: harness.agent_tags(token, agent.server) == ready, 120)
        time.sleep(3)
        results["changes"] = (tally(logs.since_mark(), servers), time.monotonic() - t0)

        # Idle.
        logs.mark()
        time.sleep(args.idle)
        results["idle"] = (tally(logs.since_mark(), servers), args.idle)
    finally:
        stop_peers.set()
        for agent in agents:
            agent.stop()
        for s in servers:
            harness.http("DELETE", f"{harness.COMPUTE}/servers/{s}", token)

    report = render(args, results)
    print(report)
    if args.record:
        out = ROOT / "bench" / "results" / "openstack-calls.md"
        out.write_text(report)
        print(f"recorded in {out}")


def render(args, results):
    n = args.agents
    lines = [
        "# Cloud API calls: exoagent versus Exosphere's console polling",
        "",
        f"Run: `python3 bench/openstack-calls.py --agents {n} --idle {args.idle} --record`, "
        f"{time.strftime('%Y-%m-%d')}, {n} instances on the real-OpenStack harness "
        "(tests/openstack/), 2 cores. Counted from Keystone's, Nova's and nova-metadata's "
        "access logs by User-Agent.",
        "",
        "| phase | duration | exoagent: Nova calls / instance | exoagent: Keystone tokens / instance "
        "| exoagent: metadata-service calls / instance | exoagent per-instance spread (Nova) "
        "| Exosphere tab: Nova calls / instance |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, label in (("boot", "boot → ready"), ("changes", "2 state changes"),
                         ("idle", f"idle {args.idle} s")):
        (by, per_server), seconds = results[phase]
        agent, peer = by["exoagent"], by["peer"]
        nova = sum(v for k, v in agent.items() if k.startswith("nova"))
        keystone = agent["keystone token"]
        metadata = sum(v for k, v in agent.items() if k.startswith("metadata"))
        spread = sorted(per_server.values()) or [0]
        peer_nova = sum(peer.values())
        lines.append(
            f"| {label} | {seconds:.0f} s | {nova / n:.1f} | {keystone / n:.1f} | "
            f"{metadata / n:.1f} | {spread[0]}–{spread[-1]} | {peer_nova / n:.1f} |")
    lines += ["", "Breakdown (all instances together):", ""]
    for phase in ("boot", "changes", "idle"):
        (by, _), _ = results[phase]
        for who in ("exoagent", "peer"):
            items = ", ".join(f"{k} {v}" for k, v in sorted(by[who].items())) or "none"
            lines.append(f"- {phase}, {who}: {items}")
    lines += [
        "",
        "Reading it: exoagent's calls follow state changes only (each change of one subject is "
        "one tag PUT, one tag DELETE and the metadata values that changed); an idle instance "
        "makes none, however many instances there are. The Exosphere peer polls the whole "
        "console log on a timer for as long as a tab is open, and records nothing when none is.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
