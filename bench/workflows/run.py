#!/usr/bin/env python3
"""Time to a working workflow notebook: exoagent's workflows without Docker beside Exosphere's
recipe (repo2docker), in one run, on this machine (no VM, no emulation).

    python3 bench/workflows/run.py [--samples 3] [--exoagent target/release/exoagent]

The workflow is one repository served on loopback by `git daemon`: `requirements.txt`
(six==1.16.0), `runtime.txt` (this machine's Python), an executable `postBuild`, a notebook.

- exoagent, cold: a fresh sandbox and fresh uv/pip caches; `exoagent sandbox` from start until
  `exoagent status` says JupyterLab is ready (clone, venv, the hash-pinned JupyterLab lock,
  requirements, postBuild, JupyterLab answering at the workflow path).
- exoagent, warm: the same sandbox after `exoagent down`: the environment built for that commit
  is reused, so this is the agent's start plus JupyterLab's.
- Exosphere's recipe (ansible/roles/workflow/tasks/main.yml), the steps that run here: a venv
  with `six jupyter-repo2docker` from a fresh pip cache ("install"), then the clone its role
  makes and `jupyter-repo2docker --no-build --debug --no-run <checkout>` (detect the buildpacks,
  render the Dockerfile) ("render").
- Not measured: repo2docker's `docker build` and running the image. It pulls its base image from
  Docker Hub and its environment from conda-forge, neither reachable here; on a real instance
  that is where most of its time goes, plus installing Docker itself (Exosphere's docker role).

Prints one JSON line with every sample and the medians; bench/results/workflows.md records a run.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, **kwargs):
    return subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, **kwargs)


def make_repo(base):
    work = base / "demo-work"
    work.mkdir(parents=True)
    python = shutil.which("python3")
    out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, check=True)
    version = out.stdout.strip()
    files = {
        "requirements.txt": ("six==1.16.0\n", False),
        "runtime.txt": (f"python-{version}\n", False),
        "postBuild": ("#!/bin/sh\nset -e\npython -c 'import six' && touch built-ok\n", True),
        "demo.ipynb": (json.dumps({"cells": [], "metadata": {}, "nbformat": 4,
                                   "nbformat_minor": 5}), False),
    }
    for name, (content, executable) in files.items():
        (work / name).write_text(content)
        if executable:
            (work / name).chmod(0o755)
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "-C", str(work)]
    run(git + ["init", "-q", "-b", "main"])
    run(git + ["add", "-A"])
    run(git + ["commit", "-q", "-m", "workflow"])
    run(["git", "clone", "-q", "--bare", str(work), str(base / "demo.git")])


class GitDaemon:
    def __init__(self, base):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["git", "daemon", "--export-all", "--reuseaddr", "--listen=127.0.0.1",
             f"--port={self.port}", f"--base-path={base}", str(base)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self):
        return f"git://127.0.0.1:{self.port}/demo.git"

    def stop(self):
        self.process.kill()
        self.process.wait()


def ready(exoagent, sandbox):
    out = subprocess.run([exoagent, "--sandbox-dir", str(sandbox), "status", "--json"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode not in (0, 1, 2, 3):
        return None
    try:
        status = json.loads(out.stdout)
    except ValueError:
        return None
    states = [s["state"] for s in status.get("services", [])]
    if "failed" in states:
        raise RuntimeError(f"workflow failed: {out.stdout}")
    return states == ["ready"]


def exoagent_start(exoagent, sandbox, env, log):
    started = time.monotonic()
    agent = subprocess.Popen([exoagent, "sandbox", str(sandbox)], env=env,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready(exoagent, sandbox):
            if agent.poll() is not None:
                raise RuntimeError("exoagent sandbox exited")
            if time.monotonic() - started > 1200:
                raise RuntimeError("not ready after 1200 s")
            time.sleep(0.2)
        return time.monotonic() - started
    finally:
        agent.terminate()
        agent.wait()
        subprocess.run([exoagent, "--sandbox-dir", str(sandbox), "down", "--grace", "5"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def exoagent_sample(exoagent, url, work):
    sandbox = work / "sandbox"
    (sandbox / "etc/exoagent").mkdir(parents=True)
    (sandbox / "etc/exoagent/config.toml").write_text(
        "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\n"
        f"port = {free_port()}\nstart_timeout_s = 600\nworkflow_repository = \"{url}\"\n"
        "workflow_ref = \"main\"\nworkflow_path = \"/lab/tree/demo.ipynb\"\n")
    env = dict(os.environ, UV_CACHE_DIR=str(work / "uv-cache"),
               PIP_CACHE_DIR=str(work / "pip-cache"))
    with open(work / "agent.log", "ab") as log:
        cold = exoagent_start(exoagent, sandbox, env, log)
        warm = exoagent_start(exoagent, sandbox, env, log)
    return cold, warm


def repo2docker_sample(url, work):
    env = dict(os.environ, PIP_CACHE_DIR=str(work / "pip-cache"))
    venv = work / "repo2docker-venv"
    started = time.monotonic()
    run([sys.executable, "-m", "venv", str(venv)], env=env)
    run([str(venv / "bin/pip"), "install", "-q", "six", "jupyter-repo2docker"], env=env,
        stdout=subprocess.DEVNULL)
    install = time.monotonic() - started
    # Exosphere's role clones first (`workflow_local_download`: the Ansible git module into
    # /opt/workflow), then hands repo2docker the checkout. (Given the URL, repo2docker first
    # asks iqss.github.io for Dataverse installations, which is unreachable here.)
    started = time.monotonic()
    checkout = work / "workflow"
    run(["git", "clone", "-q", "--branch", "main", url, str(checkout)], env=env)
    rendered = subprocess.run(
        [str(venv / "bin/jupyter-repo2docker"), "--no-build", "--debug", "--no-run",
         "--image-name", "exosphere-workflow", str(checkout)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    render = time.monotonic() - started
    ok = rendered.returncode == 0 and "FROM" in (rendered.stdout + rendered.stderr)
    if not ok:
        tail = (rendered.stdout + rendered.stderr)[-800:]
        print(f"repo2docker --no-build failed ({rendered.returncode}):\n{tail}", file=sys.stderr)
    return install, (render if ok else None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--exoagent", default=str(ROOT / "target/release/exoagent"))
    args = parser.parse_args()
    exoagent = str(Path(args.exoagent).resolve())
    base = Path(tempfile.mkdtemp(prefix="exoagent-bench-wf-"))
    make_repo(base / "repos")
    daemon = GitDaemon(base / "repos")
    samples = {"exoagent_cold_s": [], "exoagent_warm_s": [], "repo2docker_install_s": [],
               "repo2docker_render_s": []}
    load = [os.getloadavg()[0]]
    try:
        for i in range(args.samples):
            # Alternate which goes first, so neither always runs on a warmer machine.
            order = ["exoagent", "repo2docker"] if i % 2 == 0 else ["repo2docker", "exoagent"]
            for who in order:
                work = base / f"{who}-{i}"
                work.mkdir()
                if who == "exoagent":
                    cold, warm = exoagent_sample(exoagent, daemon.url(), work)
                    samples["exoagent_cold_s"].append(round(cold, 1))
                    samples["exoagent_warm_s"].append(round(warm, 1))
                else:
                    install, render = repo2docker_sample(daemon.url(), work)
                    samples["repo2docker_install_s"].append(round(install, 1))
                    if render is not None:
                        samples["repo2docker_render_s"].append(round(render, 1))
                shutil.rmtree(work, ignore_errors=True)
                load.append(os.getloadavg()[0])
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    medians = {k: (statistics.median(v) if v else None) for k, v in samples.items()}
    print(json.dumps({"samples": samples, "median": medians,
                      "load_1min": [round(x, 2) for x in load],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
