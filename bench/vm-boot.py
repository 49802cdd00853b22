#!/usr/bin/env python3
"""Boot → JupyterLab answering, in the real VM of tests/vm/ (QEMU under software emulation,
real cloud-init, the OpenStack harness as the cloud), three ways in one run, one after the
other so they do not share the CPU:

1. baked image (exoagent installed, JupyterLab baked): first boot only configures and starts;
2. stock image + exoagent's bootstrap userdata: downloads exoagent (served from this host),
   checks its SHA-256, installs JupyterLab from the same hash-pinned lock, starts it;
3. stock image + a plain serial shell script as userdata doing the same installs (venv, pip
   install of the same lock, start JupyterLab): the peer.

    python3 bench/vm-boot.py [--record]

Time is measured from QEMU's start to JupyterLab's /api answering through a forwarded port.
--record writes bench/results/vm-boot.md.
"""

import argparse
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "vm"))
sys.path.insert(0, str(ROOT / "tests" / "openstack"))
import harness  # noqa: E402
import vm_test  # noqa: E402

STOCK_DIR = vm_test.VM_DIR.parent / (vm_test.VM_DIR.name + "-stock")
# QEMU's user network: the host's loopback as the guest sees it.
HOST_FROM_VM = "169.254.169.2"

PLAIN_SCRIPT = """#!/bin/sh
# The peer: the same installs as exoagent, as a plain serial script.
set -e
echo '{{"status":"running"}}' > /dev/console
python3 -m venv /opt/jupyterlab
curl -fsS -o /opt/jupyterlab/requirements.txt http://{host}:{port}/requirements.txt
/opt/jupyterlab/bin/pip install --disable-pip-version-check --no-input --require-hashes \\
  -r /opt/jupyterlab/requirements.txt
id exouser >/dev/null 2>&1 || useradd -m -s /bin/bash exouser
nohup runuser -u exouser -- /opt/jupyterlab/bin/jupyter lab --no-browser --ip 0.0.0.0 \\
  --port 8888 --ServerApp.token='' > /var/log/jupyterlab.log 2>&1 &
"""


def serve(directory):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(directory), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ensure_stock_image():
    stamp = hashlib.sha256((ROOT / "tests/vm/build-image.sh").read_bytes()).hexdigest()
    stamp_file = STOCK_DIR / "image.stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    subprocess.run(["bash", str(ROOT / "tests/vm/build-image.sh"), str(STOCK_DIR), "--stock"],
                   check=True)
    stamp_file.write_text(stamp)


def time_to_jupyterlab(name, env, token, userdata, image_dir):
    scenario = vm_test.Scenario(name, env, token, userdata)
    try:
        vm = scenario.boot(scenario.start_relay(), image_dir=image_dir)
        vm_test.wait(f"{name}: JupyterLab", lambda: vm_test.jupyter_answers(vm.jupyter_port),
                     2400, vm)
        seconds = time.monotonic() - vm.started
        vm_test.say(f"{name}: JupyterLab answered {seconds:.0f} s after QEMU started")
        return seconds
    finally:
        scenario.close(keep=False)


def main():
    parser = argparse.ArgumentParser(description="VM boot to JupyterLab, three ways")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if harness.main(["up"]) != 0:
        raise SystemExit("the OpenStack harness did not come up")
    exoagent, deb = vm_test.binary()
    vm_test.ensure_image(exoagent, deb)
    ensure_stock_image()
    env = json.loads(harness.ENV_FILE.read_text())
    config = json.loads(harness.SECRETS_FILE.read_text())
    token, _ = harness.token_for(harness.password_auth("demo", config["passwords"]["demo"]),
                                 harness.project_scope("demo"))

    served = Path(tempfile.mkdtemp(prefix="exoagent-bench-served-"))
    shutil.copy(exoagent, served / "exoagent")
    shutil.copy(ROOT / "agent/src/services/jupyterlab/requirements.txt",
                served / "requirements.txt")
    server = serve(served)
    port = server.server_address[1]
    sha256 = hashlib.sha256((served / "exoagent").read_bytes()).hexdigest()

    baked = subprocess.run([str(exoagent), "userdata", "--no-os-updates"], check=True,
                           stdout=subprocess.PIPE).stdout
    bootstrap = subprocess.run(
        [str(exoagent), "userdata", "--no-os-updates", "--delivery", "bootstrap",
         "--binary-url", f"http://{HOST_FROM_VM}:{port}/exoagent", "--binary-sha256", sha256],
        check=True, stdout=subprocess.PIPE).stdout
    plain = PLAIN_SCRIPT.format(host=HOST_FROM_VM, port=port).encode()

    results = {}
    try:
        results["baked"] = time_to_jupyterlab("baked", env, token, baked,
                                              vm_test.VM_DIR)
        results["bootstrap"] = time_to_jupyterlab("bootstrap", env, token,
                                                  bootstrap, STOCK_DIR)
        results["plain"] = time_to_jupyterlab("plain", env, token, plain, STOCK_DIR)
    finally:
        server.shutdown()
        shutil.rmtree(served, ignore_errors=True)

    ratio = results["bootstrap"] / results["plain"]
    report = "\n".join([
        "# Boot → JupyterLab answering, in a real VM",
        "",
        f"Run: `python3 bench/vm-boot.py --record`, {time.strftime('%Y-%m-%d')}. QEMU under "
        "software emulation (TCG, 2 vCPUs, 2 GiB; this machine's nested KVM is unusable), "
        "Debian 12 cloud image built by tests/vm/build-image.sh, real cloud-init with the "
        "OpenStack datasource from the harness's nova-metadata. One after the other in one run. "
        "Seconds from QEMU's start to JupyterLab's `/api` answering through a forwarded port.",
        "",
        "| image and userdata | seconds |",
        "|---|---|",
        f"| baked image, `exoagent userdata` | {results['baked']:.0f} |",
        f"| stock image, `exoagent userdata --delivery bootstrap` | {results['bootstrap']:.0f} |",
        f"| stock image, plain serial shell script (peer) | {results['plain']:.0f} |",
        "",
        f"Stock image, exoagent / plain script: **{ratio:.2f}**. Baked / plain script: "
        f"**{results['baked'] / results['plain']:.2f}**.",
        "",
        "Both stock runs install the same hash-pinned JupyterLab lock with pip (no uv in the "
        "image). exoagent also creates the instance user, generates and publishes the "
        "passphrase, writes JupyterLab's configuration and supervises it; the plain script "
        "does none of that (no password, no token). Times under software emulation are several "
        "times those on real hardware and vary between runs.",
        "",
    ])
    print(report)
    if args.record:
        (ROOT / "bench/results/vm-boot.md").write_text(report)


if __name__ == "__main__":
    main()
