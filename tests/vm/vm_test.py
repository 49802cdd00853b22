#!/usr/bin/env python3
"""The VM test: a real Debian VM (QEMU, software emulation) with real systemd and cloud-init
boots the baked image as a server of the real-OpenStack harness and is observed through Nova,
its serial console and forwarded ports. Debian 12 runs scenarios 2–7; Debian 13 runs the
JupyterLab flow (2–4) and the config-drive flow (5) on its own image, through the same code;
Debian 11 runs the JupyterLab flow (2–4) and the web desktop (8) on its own image.

    python3 tests/vm/vm_test.py [--keep] [--only SCENARIO]...

1. Brings up the OpenStack harness; builds the .deb (installer/package/build.sh) and, per
   Debian release the selected scenarios boot, the image (tests/vm/build-image.sh: exoagent
   installed from that .deb; JupyterLab baked, and on Debian 11 also the desktop and
   Guacamole) unless one for this exoagent binary, release, bake list and recipe exists. With
   the web-desktop scenario, the Guacamole client page (web/guacamole/dist, embedded by the
   binary) is built first.
2. Boots a Nova server (fake virt driver) with userdata from `exoagent userdata` asking for
   JupyterLab and Nova reporting through the access-rule-restricted credential; the VM takes
   that server's identity: DMI says OpenStack Nova with the server's UUID, and
   http://169.254.169.254 is forwarded to the harness's metadata relay for that server, which
   signs requests as Neutron's metadata proxy does. cloud-init's OpenStack datasource reads the
   real nova-metadata.
3. Checks: Nova shows exoagent:setup:complete and exoagent:jupyterlab:ready; JupyterLab answers
   through a forwarded port; the serial console holds Exosphere-decodable status lines ending in
   `complete`; the passphrase is in os-server-password.
4. Reboots (ACPI power-off, boot the same disk again): JupyterLab comes back, the passphrase is
   unchanged and was posted once, the tags are still exactly right.
5. A second server boots with a config drive only (an ISO labelled config-2 holding the
   documents nova-metadata serves for it) and no metadata service: cloud-init's ConfigDrive
   datasource and the agent's own read-only mount of the ISO supply the identity; Nova shows it
   ready.
6. A third server boots with userdata from the drop-in for Exosphere's template (the bootstrap
   variant, whose download URL leads nowhere, so the baked agent must be used), rendered as
   Exosphere renders it (tests/exosphere/userdata.py) with an SSH key, no OS updates, neither
   Guacamole nor desktop, a workflow (repository and ref in the choices, `exoCustomWorkflow`
   in the server's metadata, as Exosphere's launcher sets them) and the credential files:
   the console ends in `complete`, the
   passphrase is published, and over SSH as exouser with that key: the choices file holds
   plain JSON and the agent read it, the credential files are exouser's and 0400, nothing was
   downloaded; cloud-init's runcmd ended with the wait for the agent's setup, whose
   `complete` is in cloud-init's output log; the login banner's hook is in /etc/update-motd.d,
   pam_motd ran it at the SSH logins, `exoagent motd` shows the finished setup and JupyterLab
   ready, and, the agent stopped, the one line saying so; Exosphere's host touches: tty1
   autologin of exouser (getty@tty1 drop-in, byte
   for byte Exosphere's), cloud-init's logs 0640, exouser in group `debian`, the base packages
   present. Volumes as Exosphere's auto-mount-volumes role handles them: the server has three
   extra raw disks whose virtio serial is a made-up volume UUID, each named before boot by
   `exoVolumes::<uuid>` server metadata set through the real Nova API: a blank one is
   formatted ext4 (label = name cut to 16 bytes, UUID = volume UUID) and mounted at
   /media/volume/<name, non-word runs → `-`>, exouser's and writable; an LVM physical volume
   and a partitioned disk are reported left alone (`signature`, `partition-table`). After a
   reboot the volume is mounted again with its file; hot-unplugged through the QEMU monitor
   (ACPI PCI hot-plug) it is unmounted and its mount point removed; a fourth disk, named
   first, is hot-plugged and mounted. After power-off the LVM and partitioned images hash as
   before (their first MiB, and the whole image: the partition starts at 1 MiB).
   The workflow: a repository with requirements.txt, runtime.txt, postBuild and a notebook,
   served by a real `git daemon` on the host (the guest reaches it through QEMU's gateway,
   169.254.169.2), is cloned as exouser and built into an environment (postBuild ran in it,
   /data is exouser's); the token line decoded with Exosphere's own rules and the path from
   `exoCustomWorkflow` (never overwritten) make Exosphere's link, which opens JupyterLab
   logged in; the notebook is served and its kernel imports the required package. After the
   reboot the environment is reused, not rebuilt, and the same link works.
   `cloud-init status --wait` (over SSH) returns `status: done`, and the wait's `setup:
   complete` precedes cloud-init's closing line in its output log. Last, the package is
   upgraded while JupyterLab runs: a second .deb of the same build at a higher version
   (`<version>+upgrade1`, cargo-deb over build.sh's staging) is copied in and installed with
   `apt-get install` (a local file, no network); its scripts restart the agent (new MainPID
   and InvocationID), `exoagent status --wait` says complete again, JupyterLab keeps its
   process (same pid, start time and argv) and a kernel started through its REST API keeps a
   value set before the upgrade; Exosphere's link still opens JupyterLab.
7. `exosphere-error`: the same template with a workflow repository the git daemon does not
   have: the console's last status line is `error`, `cloud-init status --wait` exits non-zero
   with `status: error`, `cloud-init status --long` names the failed runcmd, cloud-init's
   output log holds `exoagent: setup error: jupyterlab: workflow-clone-failed: …` before its
   closing line, and the status API says the same. No volumes, no reboot.
8. `exosphere-desktop-debian11`: Exosphere's template (bootstrap variant, unreachable URL) with
   Guacamole and the desktop chosen (`guac_enabled`, `gui_enabled`; `exoGuac` in the server's
   metadata), an SSH key and the credential files, no workflow, on the Debian 11 image with
   TigerVNC + Xfce and guacd 1.3.0 baked from bullseye's packages (the `package` route). The
   console's last status line is `complete`; then Chromium on the host
   (tests/browser/vm-desktop.mjs, the browser tests' set-up) does what Exosphere does through
   the forwarded Guacamole port (49528): the token POST with the passphrase from
   os-server-password, the desktop link (connected, the Xfce desktop drawn: > 64 colours,
   screenshots saved) and the shell link, where `clear; echo exo$((6*7)) | tee ~/<marker>` is
   typed and the terminal's first row, selected with the mouse, reaches the page's clipboard
   as `exo42`. Over SSH as exouser: the choices file, the marker file (`exo42`, exouser's),
   the desktop and Guacamole ready in the status API, cloud-init's restart of sshd
   (`set-passwords`, for `ssh_pwauth`) done before Guacamole's web side started, Debian's own guacd.service masked (no
   guacd of the package's user, exoagent's never refused its address), /home/exouser exouser's,
   exouser in the `debian` group and the Xfce session started with it, and ~/openrc.sh and ~/.config/openstack/clouds.yaml `400 exouser:exouser` (cloud-init 20.4
   has no `write_files` `defer`: the agent completes them). `metadata-debian11` runs
   2–4 on the same image (JupyterLab on Debian 11's Python 3.9, the lock's 3.9 pins).

Prints timings (QEMU start → Nova shows complete; for the volumes, QEMU start → seen
mounted, and monitor command → seen unmounted or mounted; apt-get → complete again after the
upgrade; QEMU start → console error and → cloud-init done; QEMU start → console complete,
→ token, → desktop drawn and → shell echoed in Chromium) for bench/. Another release's keys
carry its version (`debian11_`, `debian13_`). Exits non-zero on any failure, with the serial
log's tail.
"""

import argparse
import base64
import hashlib
import http.cookiejar
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "openstack"))
import harness  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "exosphere"))
import userdata as exosphere  # noqa: E402

VM_DIR = Path(os.environ.get("EXOAGENT_VM_DIR", "/var/tmp/exoagent-vm"))
# The Debian releases the test boots (build-image.sh's RELEASE), by version.
RELEASES = {"11": "bullseye", "12": "bookworm", "13": "trixie"}
DEFAULT_RELEASE = "12"
# What `exoagent bake` pre-installs in each release's image (build-image.sh's EXOAGENT_BAKE):
# JupyterLab everywhere; Debian 11's image also has the web desktop (TigerVNC + Xfce, guacd
# 1.3.0 from bullseye's packages), so one image serves both its scenarios.
BAKE = {"11": "jupyterlab desktop guacamole"}
DEFAULT_BAKE = "jupyterlab"
# Where the browser scripts put screenshots (as tests/browser's tests do).
ARTIFACTS = ROOT / os.environ.get("EXOAGENT_TEST_ARTIFACTS", "target/test-artifacts")
READY = {"exoagent:setup:complete", "exoagent:jupyterlab:ready"}


class Failure(Exception):
    pass


def say(message):
    print(f"[vm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(client_page=False):
    """The release binary and the .deb made from it (installer/package/build.sh builds both;
    the binary for glibc 2.28 and later, under target/x86_64-unknown-linux-gnu/). With
    `client_page`, the Guacamole client page (web/guacamole/dist, which the binary embeds) is
    built first (installer/dev/build-web.sh: nothing to do when it is current)."""
    if client_page:
        subprocess.run(["bash", "installer/dev/build-web.sh"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    packages = subprocess.run(["bash", "installer/package/build.sh"], cwd=ROOT, check=True,
                              stdout=subprocess.PIPE, text=True).stdout.split()
    deb = next(Path(p) for p in packages if p.endswith(".deb"))
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return (ROOT / target / "x86_64-unknown-linux-gnu" / "release" / "exoagent").resolve(), \
        deb.resolve()


def image_dir(release=DEFAULT_RELEASE):
    """Where the baked image of a Debian release lives: VM_DIR for Debian 12 (the image every
    scenario used before there were others), VM_DIR-debian<N> for the others."""
    if release not in RELEASES:
        raise Failure(f"release: {release!r} is not one of {', '.join(RELEASES)}")
    return VM_DIR if release == DEFAULT_RELEASE else Path(f"{VM_DIR}-debian{release}")


def ensure_image(exoagent, deb, release=DEFAULT_RELEASE, bake=DEFAULT_BAKE):
    """Builds the baked image of `release`, with `bake` (the services `exoagent bake`
    pre-installs, space-separated) baked, unless the cached one was built from the same binary,
    release, bake list and recipe; returns its directory."""
    directory = image_dir(release)
    # The binary, not the .deb's bytes (which carry build times), plus what shapes the package,
    # the release and the variant (the bake list is part of it).
    digest = hashlib.sha256()
    digest.update(f"release={RELEASES[release]} variant=baked bake={bake}\n".encode())
    digest.update(exoagent.read_bytes())
    shaping = [*sorted((ROOT / "installer/package").rglob("*")),
               *sorted((ROOT / "installer/systemd").rglob("*"))]
    for script in [ROOT / "tests/vm/build-image.sh", *shaping]:
        if script.is_file():
            digest.update(script.read_bytes())
    stamp = digest.hexdigest()
    stamp_file = directory / "image.stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp \
            and (directory / "root.raw").exists():
        return directory
    say(f"building the Debian {release} image in {directory} (mmdebstrap, exoagent from its "
        f".deb, baked: {bake})")
    started = time.monotonic()
    stamp_file.unlink(missing_ok=True)
    # The stamp's bake list, whatever the caller's EXOAGENT_BAKE says.
    subprocess.run(["bash", str(ROOT / "tests/vm/build-image.sh"), str(directory), str(deb),
                    RELEASES[release]], check=True, env={**os.environ, "EXOAGENT_BAKE": bake})
    stamp_file.write_text(stamp)
    say(f"Debian {release} image built in {time.monotonic() - started:.0f} s")
    return directory


def status_lines(serial_text):
    """Exosphere's parser (src/Helpers/ExoSetupStatus.elm): per line, first '{' to last '}'."""
    found = []
    for line in serial_text.splitlines():
        start, end = line.find("{"), line.rfind("}")
        if start < 0 or end < start:
            continue
        try:
            value = json.loads(line[start:end + 1])
        except ValueError:
            continue
        status = value.get("status", value.get("exoSetup")) if isinstance(value, dict) else None
        if isinstance(status, str):
            found.append(status)
    return found


class Vm:
    def __init__(self, run_dir, server, relay_port, mac, config_drive=None, image_dir=None,
                 disks=()):
        self.image_dir = image_dir or VM_DIR
        # Extra disks, attached at every start: {id: (raw image, serial)}; hot-plug and unplug
        # keep it current, so a later start boots with the hardware the guest last had.
        self.disks = {disk_id: (path, serial) for disk_id, path, serial in disks}
        self.mac = mac
        self.config_drive = config_drive
        self.run_dir = run_dir
        self.server = server
        self.relay_port = relay_port
        self.jupyter_port = free_port()
        self.ssh_port = free_port()
        # Guacamole's web side ([services.guacamole] port), as Exosphere reaches it through
        # the UAP (`https://http-<ip>-49528.<uap host>`).
        self.guacamole_port = free_port()
        self.serial = run_dir / "serial.log"
        self.overlay = run_dir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image_dir / "root.raw"), str(self.overlay)], check=True)
        self.process = None
        self.boots = 0

    def start(self):
        self.boots += 1
        netdev = (f"user,id=n0,net=169.254.169.0/24,hostfwd=tcp:127.0.0.1:{self.jupyter_port}-:8888"
                  f",hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
                  f",hostfwd=tcp:127.0.0.1:{self.guacamole_port}-:49528")
        if self.relay_port:
            # http://169.254.169.254 → this server's metadata relay (one socat per connection).
            netdev += f",guestfwd=tcp:169.254.169.254:80-cmd:socat - TCP:127.0.0.1:{self.relay_port}"
        else:
            # No metadata service: connections are closed at once, and never reach whatever
            # answers 169.254.169.254 on this host's own network.
            netdev += ",guestfwd=tcp:169.254.169.254:80-cmd:true"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
            "-m", "2048", "-nographic", "-no-reboot",
            "-kernel", str(self.image_dir / "vmlinuz"),
            "-initrd", str(self.image_dir / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2",
            "-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
            "-smbios", "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,"
                       f"uuid={self.server}",
            "-serial", f"file:{self.serial}.{self.boots}",
            "-monitor", f"unix:{self.run_dir / 'monitor.sock'},server,nowait",
        ]
        if self.config_drive:
            argv += ["-drive", f"file={self.config_drive},if=virtio,format=raw,readonly=on"]
        # QEMU creates -device disks before if=virtio ones: without a slot of their own past
        # the root disk's they would take vda and the root disk a later name.
        for slot, (disk_id, (path, serial)) in enumerate(self.disks.items(), start=0x10):
            argv += ["-drive", f"file={path},if=none,id=drive-{disk_id},format=raw",
                     "-device", f"virtio-blk-pci,drive=drive-{disk_id},id=disk-{disk_id},"
                                f"serial={serial},addr={slot:#x}"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=open(self.run_dir / "qemu.out", "ab"),
                                        stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def serial_text(self):
        text = ""
        for boot in range(1, self.boots + 1):
            path = Path(f"{self.serial}.{boot}")
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def monitor(self, command):
        """One HMP command over the monitor socket; returns QEMU's reply (the text between
        the echoed command and the next prompt). Raises Failure on a reply saying Error."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.run_dir / "monitor.sock"))

            def until_prompt():
                data = b""
                while not data.endswith(b"(qemu) "):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data.decode(errors="replace")

            until_prompt()  # the banner
            s.sendall(command.encode() + b"\n")
            reply = until_prompt()
        # HMP echoes the line (with terminal escapes) before answering.
        reply = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", reply).replace("\r", "")
        lines = [line for line in reply.split("\n") if line.strip()
                 and line.strip() != "(qemu)" and command not in line]
        reply = "\n".join(lines)
        if "error" in reply.lower():
            raise Failure(f"QEMU monitor `{command}`: {reply}")
        return reply

    def hot_plug(self, disk_id, path, serial):
        self.monitor(f"drive_add 0 if=none,id=drive-{disk_id},file={path},format=raw")
        self.monitor(f"device_add virtio-blk-pci,drive=drive-{disk_id},id=disk-{disk_id},"
                     f"serial={serial}")
        self.disks[disk_id] = (path, serial)

    def hot_unplug(self, disk_id):
        """Asks the guest to eject the disk (ACPI PCI hot-plug); QEMU removes the device and
        its drive once the guest has let go."""
        self.monitor(f"device_del disk-{disk_id}")
        del self.disks[disk_id]

    def power_off(self, budget=300):
        self.monitor("system_powerdown")
        try:
            self.process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise Failure("the guest did not power off on ACPI request")

    def kill(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait(what, check, budget, vm, interval=5):
    deadline = time.monotonic() + budget
    while True:
        if vm.process.poll() is not None:
            raise Failure(f"QEMU exited while waiting for {what}")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {budget} s waiting for {what}")
        time.sleep(interval)




def booted_release(vm, release):
    """The guest's serial getty shows /etc/issue's `Debian GNU/Linux <release>`: the scenario
    ran on the release it claims, not on another image."""
    wanted = f"Debian GNU/Linux {release} "
    wait(f"the serial console's login prompt to name Debian {release}",
         lambda: wanted in vm.serial_text(), 120, vm)


def jupyter_answers_any(port):
    """JupyterLab answers on the port, with or without a login (403 without a token)."""
    try:
        status, _, _ = open_like_a_browser(f"http://127.0.0.1:{port}/api")
        return status in (200, 403)
    except OSError:
        return False


def jupyter_answers(port):
    try:
        status, _, body = harness.http("GET", f"http://127.0.0.1:{port}/api", timeout=10)
        return status == 200 and bool(body and body.get("version"))
    except OSError:
        return False


def server_password(token, server):
    _, _, body = harness.http("GET", f"{harness.COMPUTE}/servers/{server}/os-server-password",
                              token)
    return (body or {}).get("password", "")


class Scenario:
    """One server of the harness and the VM that boots as it."""

    def __init__(self, name, env, token, userdata, metadata=None, server_fields=None,
                 image_dir=None):
        """server_fields: more of the create request (a `key_name`, say); image_dir: the image
        its VM boots (VM_DIR's, Debian 12, when None)."""
        self.env, self.token = env, token
        self.image_dir = image_dir
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"exoagent-vm-{name}-"))
        server = {"name": f"exoagent-vm-{name}", "imageRef": env["image_id"],
                  "flavorRef": env["flavor_id"], "networks": [{"uuid": env["network_id"]}],
                  "user_data": base64.b64encode(userdata).decode()}
        if metadata:
            server["metadata"] = metadata
        server.update(server_fields or {})
        status, _, body = harness.http("POST", f"{harness.COMPUTE}/servers", token,
                                       {"server": server})
        if status != 202:
            raise Failure(f"server create: {status} {body}")
        self.server = body["server"]["id"]
        self.metadata = metadata or {}
        self.relay = self.vm = None
        for _ in range(120):
            _, _, shown = harness.http("GET", f"{harness.COMPUTE}/servers/{self.server}", token)
            if shown["server"]["status"] == "ACTIVE":
                break
            time.sleep(1)
        # The VM's NIC gets the server's Neutron port MAC, as on a cloud: cloud-init matches
        # network_data.json's links to NICs by MAC.
        _, _, ports = harness.http(
            "GET", f"{harness.NETWORK}/v2.0/ports?device_id={self.server}", token)
        self.mac = ports["ports"][0]["mac_address"]

    def start_relay(self):
        port = free_port()
        self.relay = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/openstack/relay.py"), "metadata",
             "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:8775",
             "--secret-file", str(harness.STATE / "metadata-secret"),
             "--tenant", self.env["projects"]["demo"], "--instance", self.server],
            stdout=subprocess.DEVNULL, stderr=open(self.run_dir / "relay.log", "wb"))
        for _ in range(50):
            if harness.port_in_use(port):
                break
            time.sleep(0.1)
        return port

    def config_drive(self):
        """An ISO labelled config-2 with the documents nova-metadata serves for the server."""
        relay_port = self.start_relay()
        latest = self.run_dir / "drive" / "openstack" / "latest"
        latest.mkdir(parents=True)
        for name in ["meta_data.json", "network_data.json", "vendor_data2.json", "user_data"]:
            url = f"http://127.0.0.1:{relay_port}/openstack/latest/{name}"
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url) as r:
                (latest / name).write_bytes(r.read())
        self.relay.kill()
        self.relay.wait()
        self.relay = None
        iso = self.run_dir / "config-drive.iso"
        subprocess.run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "config-2",
                        "-joliet", "-rock", str(self.run_dir / "drive")], check=True)
        return iso

    def boot(self, relay_port, config_drive=None, image_dir=None, disks=()):
        self.vm = Vm(self.run_dir, self.server, relay_port, self.mac, config_drive,
                     image_dir or self.image_dir, disks)
        say(f"booting server {self.server} (TCG); serial: {self.vm.serial}.1")
        self.vm.start()
        return self.vm

    def wait_ready_in_nova(self):
        wait("Nova to show setup complete and JupyterLab ready",
             lambda: harness.agent_tags(self.token, self.server) == READY, 1500, self.vm)
        ready = time.monotonic() - self.vm.started
        say(f"ready in Nova {ready:.0f} s after QEMU started")
        wait("JupyterLab through the forwarded port",
             lambda: jupyter_answers(self.vm.jupyter_port), 300, self.vm)
        lines = status_lines(self.vm.serial_text())
        if not lines or lines[-1] != "complete":
            raise Failure(f"console status lines: {lines}")
        return ready

    def close(self, keep):
        if self.vm:
            self.vm.kill()
        if self.relay:
            self.relay.kill()
        harness.http("DELETE", f"{harness.COMPUTE}/servers/{self.server}", self.token)
        if not keep:
            subprocess.run(["rm", "-rf", str(self.run_dir)], check=False)


def with_metadata_service_and_reboot(scenario):
    vm = scenario.boot(scenario.start_relay())
    first_ready = scenario.wait_ready_in_nova()
    passphrase = server_password(scenario.token, scenario.server)
    if len(passphrase.split()) != 11:
        raise Failure(f"os-server-password holds {passphrase!r}, not an 11-word passphrase")
    say("rebooting (ACPI power-off, same disk)")
    vm.power_off()
    vm.start()
    wait("JupyterLab back after the reboot", lambda: jupyter_answers(vm.jupyter_port), 1200, vm)
    reboot_ready = time.monotonic() - vm.started
    if server_password(scenario.token, scenario.server) != passphrase:
        raise Failure("the passphrase changed across a reboot")
    posts = (scenario.run_dir / "relay.log").read_text().count(
        '"POST /openstack/latest/password')
    if posts != 1:
        raise Failure(f"the passphrase was posted {posts} times")
    wait("tags still exactly right",
         lambda: harness.agent_tags(scenario.token, scenario.server) == READY, 300, vm)
    say(f"after the reboot JupyterLab answered {reboot_ready:.0f} s after QEMU started")
    return {"metadata_first_boot_ready_s": round(first_ready),
            "metadata_reboot_jupyterlab_s": round(reboot_ready)}


def with_config_drive_only(scenario):
    """No metadata service at all: cloud-init's ConfigDrive datasource and the agent's own
    mount of the ISO (iso9660, read-only) supply the identity; Nova reporting still works."""
    scenario.boot(None, scenario.config_drive())
    ready = scenario.wait_ready_in_nova()
    if "DataSourceConfigDrive" not in scenario.vm.serial_text():
        raise Failure("cloud-init did not use the config drive")
    return {"config_drive_first_boot_ready_s": round(ready)}


# The Exosphere scenario's extra disks: (id, Exosphere volume name, what is on the disk).
# `data` is blank (the agent formats and mounts it), `lvm` is an LVM physical volume and
# `parts` has a partition table (both must be left untouched), `more` is hot-plugged later.
VOLUMES = [("data", "Research Data (2026)", "blank"), ("lvm", "lvm pv", "lvm"),
           ("parts", "partitioned", "partition-table"), ("more", "Scratch #2", "blank")]
VOLUME_BUDGET = 120  # s for the agent to act on a disk once the guest sees it
UNPLUG_BUDGET = 60
DISK_BYTES = 256 << 20
AUTOLOGIN_DROPIN = "/etc/systemd/system/getty@tty1.service.d/autologin.conf"
# Exosphere's console-setup drop-in, byte for byte (the doubled backslash is systemd's escape
# for agetty's `\u`, as in systemd's own getty@.service).
AUTOLOGIN = ("[Service]\nExecStart=\n"
             "ExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --noclear --autologin exouser %I $TERM\n")
CLOUD_INIT_LOGS = ["/var/log/cloud-init.log", "/var/log/cloud-init-output.log"]
BASE_PACKAGES = ["haveged", "gnupg", "python3-venv", "cron", "zip"]


def mount_point(name):
    """Exosphere's auto-mount-volumes path for a volume name."""
    return "/media/volume/" + re.sub(r"\W+", "-", name)


def fs_label(name):
    """ext4 labels hold 16 bytes: the name cut there (never inside a character)."""
    return name.encode()[:16].decode(errors="ignore")


def first_mib_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(1 << 20)).hexdigest()


def whole_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def make_disk(path, content):
    """A sparse raw image: blank, a real LVM physical volume, or a partition table (GPT, one
    partition, nothing in it)."""
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    if content == "lvm":
        loop = subprocess.run(["losetup", "--find", "--show", str(path)], check=True,
                              capture_output=True, text=True).stdout.strip()
        try:
            # No udevd on this host: LVM must neither ask udev for devices nor wait for it.
            subprocess.run(
                ["pvcreate", "-q", "--config", "devices { obtain_device_list_from_udev = 0 } "
                 "activation { udev_sync = 0 udev_rules = 0 }", loop],
                check=True, capture_output=True,
                env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"})
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)
    elif content == "partition-table":
        subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\n,\n", text=True,
                       check=True, capture_output=True)
    blkid = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True,
                           text=True).stdout
    wanted = {"blank": "", "lvm": "TYPE=LVM2_member", "partition-table": "PTTYPE=gpt"}[content]
    if wanted not in blkid or (content == "blank" and blkid.strip()):
        raise Failure(f"{path}: blkid says {blkid!r}, expected {content}")


def name_volume(token, server, volume_id, name):
    """Exosphere's volume name: server metadata `exoVolumes::<uuid>` = {"name": …}, through
    the real Nova API (whose key pattern must accept the key)."""
    key = f"exoVolumes::{volume_id}"
    if not re.fullmatch(r"[a-zA-Z0-9-_:. ]{1,255}", key):
        raise Failure(f"Nova would refuse the metadata key {key!r}")
    value = json.dumps({"name": name})
    url = f"{harness.COMPUTE}/servers/{server}/metadata/{key}"
    status, _, body = harness.http("PUT", url, token, {"meta": {key: value}})
    if status != 200 or (body or {}).get("meta") != {key: value}:
        raise Failure(f"Nova metadata {key}: {status} {body}")
    status, _, body = harness.http("GET", url, token)
    if status != 200 or (body or {}).get("meta") != {key: value}:
        raise Failure(f"Nova metadata {key} read back: {status} {body}")


class Volume:
    """One extra disk: a raw image whose virtio serial is its (made-up) volume UUID."""

    def __init__(self, run_dir, disk_id, name, content):
        self.id, self.name, self.content = disk_id, name, content
        self.volume_id = str(uuid.uuid4())
        self.path = run_dir / f"volume-{disk_id}.raw"
        self.mount_point = mount_point(name)
        make_disk(self.path, content)
        self.sha256 = first_mib_sha256(self.path)
        self.whole_sha256 = whole_sha256(self.path)

    @property
    def serial(self):
        # Nova gives the volume UUID as the serial. This QEMU accepts all 36 characters for
        # virtio-blk (checked: `info qtree` shows them); the guest sees the first 20, the
        # size of virtio-blk's ID field, as on a cloud.
        return self.volume_id

    def drive(self):
        return (self.id, self.path, self.serial)


# The workflow picked in Exosphere's launcher for the Exosphere scenario: a repository with
# repo2docker's files (requirements.txt, runtime.txt, postBuild) and a notebook, served by a
# real `git daemon` on the host's loopback, which the guest reaches through QEMU's user-mode
# gateway (169.254.169.2 is forwarded to the host's 127.0.0.1).
WORKFLOW_REF = "main"
WORKFLOW_NOTEBOOK = "demo.ipynb"
# The path a researcher types into Exosphere's workflow form; the link leads there.
WORKFLOW_PATH = f"/lab/tree/{WORKFLOW_NOTEBOOK}"
SIX = "1.16.0"
WORKFLOW_FILES = [
    ("requirements.txt", f"six=={SIX}\n", False),
    ("runtime.txt", "python-3.11\n", False),
    # Runs as exouser in the checkout, the environment first on PATH (repo2docker's contract).
    ("postBuild", "#!/bin/sh\nset -e\n"
                  "python -c 'import six, sys; print(six.__version__, sys.prefix)' > built-by\n",
     True),
    (WORKFLOW_NOTEBOOK, json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {},
                   "outputs": [], "source": ["import six, sys\n",
                                             "print('six', six.__version__, 'in', sys.prefix)"]}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                    "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}), False),
]


class WorkflowRepository:
    """A bare repository `demo.git` with WORKFLOW_FILES on `main`, served by `git daemon` on
    127.0.0.1; `url` is how the guest names it."""

    def __init__(self, work):
        base = work / "git"
        source = work / "workflow-source"
        source.mkdir(parents=True)

        def git(*args, cwd=source):
            subprocess.run(["git", "-c", "user.name=exosphere-test", "-c",
                            "user.email=test@example.invalid", *args], cwd=cwd, check=True,
                           capture_output=True)

        git("init", "-q", "-b", WORKFLOW_REF)
        for name, content, executable in WORKFLOW_FILES:
            (source / name).write_text(content)
            if executable:
                (source / name).chmod(0o755)
        git("add", "-A")
        git("commit", "-q", "-m", "workflow")
        base.mkdir()
        git("clone", "-q", "--bare", str(source), str(base / "demo.git"), cwd=work)
        self.port = free_port()
        # git-daemon itself: `git daemon` runs it as a child that killing `git` would leave
        # running (and holding whatever this process holds open) after the test.
        exec_path = subprocess.run(["git", "--exec-path"], check=True, capture_output=True,
                                   text=True).stdout.strip()
        self.daemon = subprocess.Popen(
            [str(Path(exec_path) / "git-daemon"), "--export-all", "--reuseaddr",
             "--listen=127.0.0.1",
             f"--port={self.port}", f"--base-path={base}", str(base)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(work / "git-daemon.log", "wb"))
        for _ in range(100):
            if harness.port_in_use(self.port):
                break
            time.sleep(0.1)
        else:
            raise Failure("git daemon did not listen")
        self.url = f"git://169.254.169.2:{self.port}/demo.git"

    def close(self):
        self.daemon.kill()
        self.daemon.wait()


def open_like_a_browser(url):
    """GET following redirects with a cookie jar, as a browser opens a link: (status, final
    URL, body)."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        with opener.open(url, timeout=60) as response:
            return response.status, response.geturl(), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.geturl(), error.read().decode(errors="replace")


SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
               "-o", "LogLevel=ERROR"]


def ssh_as_exouser(vm, key_file, command, timeout=120):
    """`command` (a shell line: outside values in it must be shlex.quote'd) as exouser over
    the forwarded SSH port, with the key Exosphere put in the template."""
    try:
        return subprocess.run(
            ["ssh", "-i", str(key_file), "-p", str(vm.ssh_port), *SSH_OPTIONS,
             "exouser@127.0.0.1", command],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 255, "", "ssh timed out")


def scp_to_vm(vm, key_file, source, target):
    subprocess.run(["scp", "-q", "-i", str(key_file), "-P", str(vm.ssh_port), *SSH_OPTIONS,
                    str(source), f"exouser@127.0.0.1:{target}"],
                   stdin=subprocess.DEVNULL, check=True, timeout=300)


def console_complete(vm):
    lines = status_lines(vm.serial_text())
    if lines and lines[-1] == "error":
        raise Failure(f"setup reported error: {lines}")
    return bool(lines) and lines[-1] == "complete"


def completed_before_finished(lines):
    """`grep -n` lines of cloud-init's output log: the wait's `setup: complete` before
    cloud-init's closing `Cloud-init v. … finished at` line."""
    done = [int(line.split(":")[0]) for line in lines if ":setup: complete" in line]
    finished = [int(line.split(":")[0]) for line in lines if "finished at" in line]
    return bool(done) and bool(finished) and done[0] < finished[0]


def deb_version(deb):
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                          capture_output=True, text=True).stdout.strip()


def upgrade_package(deb, out_dir):
    """A genuine upgrade of `deb`: the same build (installer/package/build.sh's staging and
    manifest, through the same pinned cargo-deb) at a higher package version."""
    out_dir.mkdir(parents=True, exist_ok=True)
    version = deb_version(deb)
    upstream, _, revision = version.rpartition("-")
    subprocess.run(["cargo", "deb", "-p", "exoagent", "--target", "x86_64-unknown-linux-gnu",
                    "--no-build", "--no-strip", "--deb-version", f"{upstream}+upgrade1-{revision}", "--output",
                    f"{out_dir}/"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    upgrade = next(out_dir.glob("*.deb"))
    newer = deb_version(upgrade)
    if subprocess.run(["dpkg", "--compare-versions", newer, "gt", version]).returncode != 0:
        raise Failure(f"{upgrade.name}: {newer} is not newer than {version}")
    return upgrade


# Run in the VM by the workflow environment's Python, as exouser: one cell in a kernel
# JupyterLab started, through its connection file in the Jupyter runtime directory.
KERNEL_CLIENT = """
import sys
import jupyter_client
kernel_id, code = sys.argv[1], sys.argv[2]
client = jupyter_client.BlockingKernelClient()
client.load_connection_file(jupyter_client.find_connection_file(f"kernel-{kernel_id}.json"))
client.start_channels()
client.wait_for_ready(timeout=60)
out = []
def hook(message):
    if message["msg_type"] == "stream":
        out.append(message["content"]["text"])
    elif message["msg_type"] == "error":
        out.append(message["content"]["ename"] + ": " + message["content"]["evalue"])
reply = client.execute_interactive(code, timeout=60, output_hook=hook)
client.stop_channels()
print(reply["content"]["status"], "".join(out).strip())
"""


def jupyter_api(port, token, method, path, body=None):
    """JupyterLab's REST API with the token (as `Authorization: token …`): (status, JSON)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def upgrade_while_jupyterlab_runs(vm, key_file, upgrade, check, ssh, token):
    """`apt-get install` of a newer exoagent .deb (a local file) while JupyterLab runs with a
    kernel holding a value. The package's scripts restart the agent (new MainPID and
    InvocationID); JupyterLab keeps its process and the kernel its state. Returns the time
    from the install to `exoagent status --wait` saying complete again."""
    new_version = deb_version(upgrade)
    check("dpkg-query -W -f '${Version}' exoagent", lambda out: out and out != new_version)
    unit = "systemctl show exoagent.service -p MainPID -p InvocationID --value"

    def unit_now():
        main_pid, invocation = check(unit, lambda out: len(out.split("\n")) == 2).split("\n")
        if not main_pid.isdigit() or main_pid == "0" or not invocation:
            raise Failure(f"exoagent.service: MainPID {main_pid!r} InvocationID {invocation!r}")
        return main_pid, invocation

    def jupyterlab():
        """JupyterLab's pid (the status API's) and its `ps` line (start time, argv)."""
        snapshot = json.loads(check("sudo -n exoagent status --json", lambda out: True))
        pid = next((s.get("pid") for s in snapshot["services"]
                    if s["service"] == "jupyterlab" and s["state"] == "ready"), None)
        if not isinstance(pid, int):
            raise Failure(f"no ready JupyterLab with a pid in {snapshot['services']}")
        line = check(f"ps -o lstart=,user=,args= -p {pid}",
                     lambda out: " exouser " in out and "/bin/jupyter-lab " in out
                     and "/bin/sh " not in out)
        return pid, line

    environment = "/opt/exoagent/workflows/current/venv"

    def in_kernel(kernel_id, code):
        return check(f"{environment}/bin/python -c {shlex.quote(KERNEL_CLIENT)} "
                     f"{shlex.quote(kernel_id)} {shlex.quote(code)}", lambda out: True)

    agent_before = unit_now()
    jupyterlab_before = jupyterlab()
    status, kernel = jupyter_api(vm.jupyter_port, token, "POST", "/api/kernels",
                                 {"name": "python3"})
    if status != 201 or not isinstance(kernel, dict) or not re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            str(kernel.get("id"))):
        raise Failure(f"POST /api/kernels: {status} {kernel}")
    kernel_id = kernel["id"]
    value = int.from_bytes(os.urandom(6), "big")
    reply = in_kernel(kernel_id, f"x = {value}; print(x)")
    if reply != f"ok {value}":
        raise Failure(f"kernel {kernel_id}: setting x gave {reply!r}")
    say(f"before the upgrade: agent pid {agent_before[0]}, JupyterLab pid "
        f"{jupyterlab_before[0]}, kernel {kernel_id} holds x = {value}")

    target = f"/tmp/{upgrade.name}"
    scp_to_vm(vm, key_file, upgrade, target)
    started = time.monotonic()
    # A local file: apt-get must need no network (its dependencies are installed).
    installed = check("sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                      "--no-install-recommends -o DPkg::Lock::Timeout=120 "
                      f"{shlex.quote(target)} 2>&1", lambda out: True)
    check("dpkg-query -W -f '${Version}' exoagent", lambda out: out == new_version)
    agent_after = unit_now()
    if agent_after[0] == agent_before[0] or agent_after[1] == agent_before[1]:
        raise Failure(f"the agent did not restart on upgrade: {agent_before} → {agent_after}\n"
                      f"{installed}")
    result = ssh("exoagent status --wait --timeout 300s", timeout=330)
    if result.returncode != 0:
        raise Failure(f"after the upgrade `exoagent status --wait` gave {result.returncode}: "
                      f"{result.stdout}{result.stderr}")
    upgrade_s = time.monotonic() - started
    jupyterlab_after = jupyterlab()
    if jupyterlab_after != jupyterlab_before:
        raise Failure(f"JupyterLab was restarted by the upgrade: {jupyterlab_before} → "
                      f"{jupyterlab_after}")
    status, kernels = jupyter_api(vm.jupyter_port, token, "GET", "/api/kernels")
    if status != 200 or kernel_id not in [k.get("id") for k in kernels]:
        raise Failure(f"kernel {kernel_id} not listed after the upgrade: {status} {kernels}")
    reply = in_kernel(kernel_id, "print(x)")
    if reply != f"ok {value}":
        raise Failure(f"kernel {kernel_id} after the upgrade: {reply!r}, expected x = {value}")
    say(f"upgraded to {new_version}: agent pid {agent_before[0]} → {agent_after[0]}, complete "
        f"again {upgrade_s:.0f} s after apt-get started; JupyterLab pid {jupyterlab_after[0]} "
        f"unchanged, kernel {kernel_id} still holds x = {value}")
    return upgrade_s


def with_exosphere_template(scenario, key_file, workflow, upgrade):
    """Exosphere's drop-in, rendered as Exosphere does; checked from inside over SSH. The
    server has three extra disks named through `exoVolumes::` metadata: a blank one the agent
    must format and mount (kept across a reboot, then hot-unplugged), an LVM physical volume
    and a partitioned disk it must leave alone; a fourth is hot-plugged later. A workflow was
    picked: its notebook opens through Exosphere's link, before and after the reboot."""
    volumes = {disk_id: Volume(scenario.run_dir, disk_id, name, content)
               for disk_id, name, content in VOLUMES}
    data, lvm, parts, more = (volumes[i] for i in ["data", "lvm", "parts", "more"])
    # Named before the VM boots, as Exosphere names a volume when it attaches it.
    for volume in [data, lvm, parts]:
        name_volume(scenario.token, scenario.server, volume.volume_id, volume.name)
    vm = scenario.boot(scenario.start_relay(), disks=[v.drive() for v in [data, lvm, parts]])
    wait("the console to say complete", lambda: console_complete(vm), 1500, vm)
    ready = time.monotonic() - vm.started
    say(f"Exosphere template: complete {ready:.0f} s after QEMU started")
    if len(server_password(scenario.token, scenario.server).split()) != 11:
        raise Failure("no passphrase in os-server-password")

    def ssh(command, timeout=120):
        return ssh_as_exouser(vm, key_file, command, timeout)

    def diagnosis():
        return ssh("sudo -n exoagent status --json; lsblk -o NAME,SERIAL,FSTYPE,LABEL,MOUNTPOINTS;"
                   " sudo -n journalctl -b --no-pager -u exoagent.service | tail -40;"
                   " sudo -n dmesg | grep -iE 'virtio|vd[a-z]|pci|acpi' | tail -20").stdout

    def check(command, good, strip=True, about_cloud_init=False):
        result = ssh(command)
        out = result.stdout.strip() if strip else result.stdout
        try:
            passed = result.returncode == 0 and good(out)
        except (ValueError, KeyError, TypeError):
            passed = False
        if not passed:
            more_text = ssh("sudo -n cloud-init status --long; sudo -n cat "
                            "/var/lib/cloud/instance/cloud-config.txt; sudo -n grep -iE "
                            "'write_files|defer|merg|WARN|Trace' /var/log/cloud-init.log | tail -40"
                            ).stdout if about_cloud_init else diagnosis()
            raise Failure(f"in the VM, `{command}` gave {result.returncode}: {out!r} "
                          f"{result.stderr.strip()!r}\n{more_text}")
        return out

    wait("SSH as exouser with the key Exosphere put in the template",
         lambda: ssh("true").returncode == 0, 300, vm)
    # Deferred files are written late in cloud-final, after the agent may be done; and the
    # userdata must not have made cloud-init fail anywhere.
    # `cloud-init status --wait` returns once cloud-init is done: with the template's wait
    # (checked below) only after the agent's setup ended.
    waited = ssh("cloud-init status --wait", timeout=900)
    if waited.returncode != 0 or waited.stdout.strip().split("\n")[-1] != "status: done":
        raise Failure(f"cloud-init status --wait: {waited.returncode} {waited.stdout!r} "
                      f"{waited.stderr!r}\n{ssh('cloud-init status --long').stdout}")
    status = ssh("cloud-init status --long").stdout
    if "status: done" not in status:
        raise Failure(f"cloud-init did not finish cleanly:\n{status}")
    logs_private = (f"stat -c %a {' '.join(CLOUD_INIT_LOGS)}",
                    lambda out: out.split("\n") == ["640"] * len(CLOUD_INIT_LOGS))
    checks = [
        ("cat /etc/exoagent/exosphere-choices.json",
         lambda out: json.loads(out) == {"guac_enabled": False, "gui_enabled": False,
                                         "workflow_source_repository": workflow.url,
                                         "workflow_repo_version": WORKFLOW_REF}),
        ("stat -c '%a %U:%G' /home/exouser/openrc.sh /home/exouser/.config/openstack/clouds.yaml",
         lambda out: out.split("\n") == ["400 exouser:exouser"] * 2),
        ("sudo -n exoagent validate",
         lambda out: "/etc/exoagent/exosphere-choices.json" in out),
        ("test ! -e /usr/local/bin/exoagent && echo not-downloaded",
         lambda out: out == "not-downloaded"),
        ("sudo -n grep -c exouser /etc/sudoers.d/90-cloud-init-users",
         lambda out: int(out) >= 1),
        # Exosphere's console-setup, cloud-init-tweaks and base-setup roles.
        logs_private,
        ("id -nG exouser", lambda out: "debian" in out.split()),
        # The image has them baked (no slow apt run under TCG), so this shows they are there,
        # not who put them there.
        ("dpkg-query -W -f '${db:Status-Status}\\n' " + " ".join(BASE_PACKAGES),
         lambda out: out.split("\n") == ["installed"] * len(BASE_PACKAGES)),
    ]
    for command, good in checks:
        check(command, good, about_cloud_init=True)

    # cloud-init waited for the agent (on in Exosphere's template): its runcmd ends with the
    # wait, which printed the finished setup into cloud-init's output log before `done`.
    # (cloud-init's `shellify` writes each argv word single-quoted, one command per line.)
    check("sudo -n tail -n 1 /var/lib/cloud/instance/scripts/runcmd",
          lambda out: out == "'exoagent' 'status' '--wait' '--timeout' '1800s'",
          about_cloud_init=True)
    # The wait's `setup: complete` comes before cloud-init's closing line (final_message runs
    # after runcmd, and `done` is written after it).
    check("sudo -n grep -nE '^setup: complete|^Cloud-init v\\. .* finished at ' "
          "/var/log/cloud-init-output.log",
          lambda out: completed_before_finished(out.split("\n")), about_cloud_init=True)
    # The login banner: the hook exoagent wrote, run by pam_motd at these SSH logins, and
    # `exoagent motd` itself (under TCG the agent may miss the banner's 60 ms limit: retried).
    check("stat -c '%a %U' /etc/update-motd.d/60-exoagent && tail -n 1 /etc/update-motd.d/60-exoagent",
          lambda out: out.split("\n") == ["755 root", "exec '/usr/bin/exoagent' motd"])
    check("grep -cE '^exoagent (setup: |did not answer)' /run/motd.dynamic",
          lambda out: out == "1")

    def banner_complete():
        lines = ssh("exoagent motd; echo rc=$?").stdout.strip().split("\n")
        return (re.fullmatch(r"exoagent setup: complete \(since [0-9]+[smhd] ago\)", lines[0])
                and any(re.match(r"\s+jupyterlab\s+ready\s", line) for line in lines)
                and lines[-2:] == ["  more: exoagent status", "rc=0"]) and lines

    banner = wait("the login banner to show the finished setup", banner_complete, 60, vm,
                  interval=2)
    say("login banner: " + " | ".join(banner[:-1]))
    check(f"cat {AUTOLOGIN_DROPIN}", lambda out: out == AUTOLOGIN, strip=False)
    check("systemctl cat getty@tty1", lambda out: f"# {AUTOLOGIN_DROPIN}\n{AUTOLOGIN}" in out,
          strip=False)

    # The workflow: cloned as exouser, built from its repo2docker files into an environment
    # under /opt/exoagent/workflows (postBuild ran in it), /data made for exouser as
    # Exosphere's role does; JupyterLab in that environment on 8888, opened by the link the
    # unmodified Exosphere UI builds from the server's metadata and the console's token line.
    environment = "/opt/exoagent/workflows/current/venv"
    prefix = check(f"readlink -f {environment}", lambda out: out.startswith(
        "/opt/exoagent/workflows/") and out.endswith("/venv"))
    check("cat ~/demo/built-by && stat -c %U ~/demo/built-by",
          lambda out: out.split("\n") == [f"{SIX} {prefix}", "exouser"])
    check("stat -c '%U %F' /data", lambda out: out == "exouser directory")
    built_at = check(f"stat -c %Y {environment}/../built", lambda out: out.isdigit())

    def open_workflow(when):
        """Exosphere's link, opened: JupyterLab in the workflow's environment, logged in by
        the link's token, the notebook there; its kernel imports the required package."""
        token = exosphere.workflow_token(vm.serial_text())
        if not token or len(token) != 48:
            raise Failure(f"{when}: no exoWorkflowToken line Exosphere can read: {token!r}")
        # Exosphere set exoCustomWorkflow at launch: the agent must never overwrite it.
        _, _, shown = harness.http(
            "GET", f"{harness.COMPUTE}/servers/{scenario.server}/metadata", scenario.token)
        if shown["metadata"].get("exoCustomWorkflow") != scenario.metadata["exoCustomWorkflow"]:
            raise Failure(f"{when}: exoCustomWorkflow is {shown['metadata']}")
        # `https://http-<floating ip>-8888.<uap host>` stands for the forwarded port.
        link = exosphere.workflow_link(f"http://127.0.0.1:{vm.jupyter_port}", WORKFLOW_PATH,
                                       token)
        status, landed, body = open_like_a_browser(link)
        if (status != 200 or "/login" in landed or "JupyterLab" not in body
                or not urllib.parse.urlsplit(landed).path.startswith(WORKFLOW_PATH)):
            raise Failure(f"{when}: Exosphere's link {link} led to {status} {landed}")
        base = f"http://127.0.0.1:{vm.jupyter_port}/api/contents/{WORKFLOW_NOTEBOOK}"
        status, _, body = open_like_a_browser(f"{base}?token={token}")
        if status != 200 or json.loads(body).get("type") != "notebook":
            raise Failure(f"{when}: the notebook through the API: {status} {body[:300]}")
        status, _, _ = open_like_a_browser(base)
        if status != 403:
            raise Failure(f"{when}: the notebook without the token: {status}")
        check(f"cd ~/demo && {environment}/bin/jupyter nbconvert --to notebook --execute "
              f"--stdout {WORKFLOW_NOTEBOOK} 2>/dev/null",
              lambda out: f"six {SIX} in {prefix}" in out)
        return token

    token = open_workflow("first boot")
    say(f"workflow notebook opened through Exosphere's link (environment {prefix})")

    def reported(volume):
        """The agent's entries for the volume (a partitioned disk has one per partition too);
        None while it does not answer."""
        try:
            listed = json.loads(ssh("sudo -n exoagent status --json").stdout).get("volumes", [])
            return [e for e in listed if e.get("volume_id") == volume.volume_id]
        except (ValueError, TypeError, AttributeError):
            return None

    def mounted(volume):
        for entry in reported(volume) or []:
            if entry.get("state") == "mounted" and entry.get("mount_point") == volume.mount_point:
                q = shlex.quote(volume.mount_point)
                return entry if ssh(f"mountpoint -q {q}").returncode == 0 else None
        return None

    def left_alone(volume, reason):
        return any(e.get("state") == "left-alone" and e.get("reason") == reason
                   for e in reported(volume) or [])

    def settle(what, condition, budget):
        try:
            return wait(what, condition, budget, vm, interval=3)
        except Failure as error:
            raise Failure(f"{error}\n{diagnosis()}") from None

    def formatted(volume, entry):
        """Formatted ext4 as Exosphere's role does, mounted, exouser's; returns the device."""
        device = entry["device"]
        q = shlex.quote(volume.mount_point)
        check(f"cat /sys/block/{os.path.basename(device)}/serial",
              lambda out: out == volume.volume_id[:20])
        probe = check(f"sudo -n blkid -p -o export {shlex.quote(device)}", lambda out: True)
        fields = {}
        for line in probe.split("\n"):
            key, _, value = line.partition("=")
            fields[key] = shlex.split(value)[0] if value else ""
        wanted = {"TYPE": "ext4", "LABEL": fs_label(volume.name), "UUID": volume.volume_id}
        if any(fields.get(k) != v for k, v in wanted.items()):
            raise Failure(f"{volume.name}: blkid says {fields}, expected {wanted}")
        check(f"stat -c %U {q}", lambda out: out == "exouser")
        return device

    # First boot: `data` formatted and mounted; `lvm` and `parts` reported and left alone.
    entry = settle("the blank volume mounted and the others left alone",
                   lambda: left_alone(lvm, "signature") and left_alone(parts, "partition-table")
                   and mounted(data), VOLUME_BUDGET)
    mounted_s = time.monotonic() - vm.started
    formatted(data, entry)
    content = f"written by exouser {data.volume_id}"
    probe_file = shlex.quote(f"{data.mount_point}/probe.txt")
    check(f"printf %s {shlex.quote(content)} > {probe_file} && sync && cat {probe_file}",
          lambda out: out == content)
    say(f"volume mounted at {data.mount_point} {mounted_s:.0f} s after QEMU started")

    # Reboot: the volume is mounted again, with its data.
    say("rebooting (ACPI power-off, same disks)")
    vm.power_off()
    vm.start()
    wait("SSH after the reboot", lambda: ssh("true").returncode == 0, 600, vm)
    settle("the volume mounted again after the reboot",
           lambda: mounted(data) and left_alone(lvm, "signature")
           and left_alone(parts, "partition-table"), VOLUME_BUDGET)
    remounted_s = time.monotonic() - vm.started
    check(f"cat {probe_file}", lambda out: out == content)
    check(*logs_private)
    say(f"after the reboot the volume was back {remounted_s:.0f} s after QEMU started")
    # The workflow's environment is reused, not rebuilt; the link still works, same token.
    wait("JupyterLab back after the reboot", lambda: jupyter_answers_any(vm.jupyter_port), 600,
         vm)
    check(f"readlink -f {environment}", lambda out: out == prefix)
    check(f"stat -c %Y {environment}/../built", lambda out: out == built_at)
    if open_workflow("after the reboot") != token:
        raise Failure("the workflow token changed across a reboot")

    # Hot-unplug: unmounted and the mount point removed.
    q = shlex.quote(data.mount_point)
    gone = (f"! grep -qsx {data.volume_id[:20]} /sys/block/vd*/serial && ! mountpoint -q {q}"
            f" && test ! -e {q}")
    unplugged = time.monotonic()
    vm.hot_unplug("data")

    def unplug_seen():
        listed = reported(data)
        return (ssh(gone).returncode == 0 and listed is not None
                and all(entry.get("state") != "mounted" for entry in listed))

    settle("the unplugged volume unmounted and its mount point removed", unplug_seen,
           UNPLUG_BUDGET)
    unplug_s = time.monotonic() - unplugged
    say(f"unplugged volume gone after {unplug_s:.0f} s")

    # Hot-plug a blank volume named first, as Exosphere names a volume it attaches.
    name_volume(scenario.token, scenario.server, more.volume_id, more.name)
    plugged = time.monotonic()
    vm.hot_plug(*more.drive())
    entry = settle("the hot-plugged volume mounted", lambda: mounted(more), VOLUME_BUDGET)
    plug_s = time.monotonic() - plugged
    formatted(more, entry)
    check(f"touch {shlex.quote(more.mount_point + '/probe')}", lambda out: True)
    say(f"hot-plugged volume mounted at {more.mount_point} after {plug_s:.0f} s")

    # The package upgraded while JupyterLab runs and a kernel holds a value: the agent
    # restarts (postinst), JupyterLab and the kernel are left alone and adopted.
    upgrade_s = upgrade_while_jupyterlab_runs(vm, key_file, upgrade, check, ssh, token)
    if open_workflow("after the upgrade") != token:
        raise Failure("the workflow token changed across the upgrade")

    idle_and_reload_in_the_guest(vm, key_file, check, ssh)

    # With the agent stopped the banner is one line and the login is not held up.
    check("sudo -n systemctl stop exoagent; exoagent motd; echo rc=$?; "
          "sudo -n systemctl start exoagent",
          lambda out: out.split("\n") == ["exoagent is not running (sudo systemctl status exoagent)",
                                          "rc=0"])

    vm.power_off()
    for volume in [lvm, parts]:
        if first_mib_sha256(volume.path) != volume.sha256:
            raise Failure(f"the {volume.content} disk's first MiB changed")
        # The partition starts at 1 MiB: formatting it would leave the first MiB as it was.
        if whole_sha256(volume.path) != volume.whole_sha256:
            raise Failure(f"the {volume.content} disk changed after its first MiB")
    return {"exosphere_template_complete_s": round(ready),
            "exosphere_volume_mounted_s": round(mounted_s),
            "exosphere_reboot_volume_mounted_s": round(remounted_s),
            "exosphere_unplug_unmounted_s": round(unplug_s),
            "exosphere_hotplug_mounted_s": round(plug_s),
            "exosphere_upgrade_complete_again_s": round(upgrade_s)}


IDLE_DROPIN = "/etc/exoagent/config.d/80-idle.toml"
# Short idle times, the host-load thresholds out of reach (a TCG guest's own CPU must not
# decide), and a pending shelve whose grace outlasts the test: the warning is what is checked.
# The credential is the researcher's from Exosphere's template (its Keystone does not exist:
# the shelve, if ever due, would fail and be reported; it is never due here).
IDLE_CONFIG = ("[idle]\nafter_s = 15\ninterval_s = 2\ncpu_percent = 100\n"
               "disk_kib_per_s = 1073741824\nnetwork_kib_per_s = 1073741824\n"
               "action = \"shelve\"\ngrace_s = 900\n"
               "[cloud]\nclouds_yaml = \"/home/exouser/.config/openstack/clouds.yaml\"\n"
               "cloud_name = \"demo_RegionOne\"\n")


def idle_and_reload_in_the_guest(vm, key_file, check, ssh):
    """In the real guest: a drop-in applied by `systemctl reload exoagent` (SIGHUP through the
    unit's ExecReload; the agent's process stays, the change is applied); an SSH login with a
    terminal, typed at, is activity (utmp and the terminal's access time); left untyped past the
    idle time the instance is idle with a shelve pending, and `wall` tells that login so; typing
    again cancels it, and `wall` says that too."""
    def status():
        return json.loads(ssh("sudo -n exoagent status --json").stdout or "{}")

    main_pid = check("systemctl show -p MainPID --value exoagent", lambda out: out.isdigit())
    check(f"printf %s {shlex.quote(IDLE_CONFIG)} | sudo -n tee {IDLE_DROPIN} >/dev/null && "
          "sudo -n systemctl reload exoagent && echo reloaded", lambda out: out == "reloaded")
    wait("the reload applied", lambda: (lambda s: s.get("reload", {}).get("outcome") == "applied"
                                        and s.get("setup", {}).get("state") == "complete")(status()),
         300, vm, interval=3)
    check("systemctl show -p MainPID --value exoagent", lambda out: out == main_pid)
    # A researcher's terminal session: `cat` reads what is typed (the terminal's access time
    # moves with each read), its output comes back through the same terminal.
    session = subprocess.Popen(
        ["ssh", "-tt", "-i", str(key_file), "-p", str(vm.ssh_port), *SSH_OPTIONS,
         "exouser@127.0.0.1", "cat >/dev/null"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.set_blocking(session.stdout.fileno(), False)
    received = bytearray()

    def read_session():
        try:
            chunk = session.stdout.read()
        except (BlockingIOError, TypeError):
            chunk = None
        if chunk:
            received.extend(chunk)
        # wall breaks lines at 79 columns (even inside a word) with CR LF, and the terminal adds
        # a CR before each LF: every CR and LF is dropped to join the text again.
        return re.sub(r"[\r\n]", "", received.decode("utf-8", "replace"))

    def typed():
        session.stdin.write(b"x\n")
        session.stdin.flush()
        return "login" in status().get("idle", {}).get("activity", [])

    try:
        wait("the typed-at login seen as activity", typed, 120, vm, interval=2)
        pending = wait("idle with a shelve pending once nobody types",
                       lambda: (lambda s: s.get("idle", {}).get("state") == "shelve-pending"
                                and s)(status()), 180, vm, interval=3)
        wait("wall's warning on the login's terminal",
             lambda: "and will be SHELVED at" in read_session(), 60, vm, interval=1)
        banner = ssh("exoagent motd").stdout
        if "  WARNING: idle since" not in banner:
            raise Failure(f"no warning in the banner: {banner!r}")
        wait("typing again cancels it", lambda: typed() and status().get("idle", {}).get(
            "state") == "active", 60, vm, interval=2)
        wait("wall's cancellation", lambda: "will not be shelved" in read_session(), 60, vm,
             interval=1)
        say(f"idle: pending shelve at {pending['idle'].get('action_at_ms')} warned by wall, "
            "cancelled by typing")
    finally:
        session.kill()
        session.wait()
    check(f"sudo -n rm {IDLE_DROPIN} && sudo -n systemctl reload exoagent && echo reloaded",
          lambda out: out == "reloaded")


def with_exosphere_setup_error(scenario, key_file, missing):
    """Exosphere's template with a workflow repository that does not exist: the clone fails,
    setup ends in `error`, and cloud-init, which waits for the agent, ends in error with the
    reason in its output log. No volumes, no reboot."""
    vm = scenario.boot(scenario.start_relay())

    def console_error():
        lines = status_lines(vm.serial_text())
        if lines and lines[-1] == "complete":
            raise Failure(f"setup reported complete with a missing repository: {lines}")
        return bool(lines) and lines[-1] == "error"

    wait("the console to say error", console_error, 1500, vm)
    errored = time.monotonic() - vm.started
    say(f"Exosphere template, missing workflow: console says error {errored:.0f} s after "
        "QEMU started")

    def ssh(command, timeout=120):
        return ssh_as_exouser(vm, key_file, command, timeout)

    wait("SSH as exouser", lambda: ssh("true").returncode == 0, 300, vm)
    waited = ssh("cloud-init status --wait", timeout=900)
    waited_s = time.monotonic() - vm.started
    long_status = ssh("cloud-init status --long")
    output_log = ssh("sudo -n grep -nE '^exoagent: setup error: |^Cloud-init v\\. .* finished "
                     "at ' /var/log/cloud-init-output.log").stdout.strip().split("\n")
    say(f"cloud-init status --wait: exit {waited.returncode}, "
        f"{waited.stdout.strip().split(chr(10))[-1]!r}")
    say("cloud-init status --long:\n" + long_status.stdout.strip())
    say("cloud-init-output.log: " + " | ".join(output_log))
    if waited.returncode == 0 or waited.stdout.strip().split("\n")[-1] != "status: error":
        raise Failure(f"cloud-init status --wait: {waited.returncode} {waited.stdout!r}")
    # Debian 12's cloud-init 22.4 names the failed runcmd script, never its output (as
    # docs/contracts.md says: were the reason ever there, the docs would need changing).
    if (long_status.returncode == 0 or "status: error" not in long_status.stdout
            or "Runparts: 1 failures (runcmd)" not in long_status.stdout
            or "workflow-clone-failed" in long_status.stdout):
        raise Failure(f"cloud-init status --long: {long_status.returncode} "
                      f"{long_status.stdout!r}")
    # The waiter's line, with the step and reason code, before cloud-init's closing line.
    prefix = "exoagent: setup error: jupyterlab: workflow-clone-failed: "
    errors = [line for line in output_log if line.split(":", 1)[-1].startswith(prefix)]
    finished = [int(line.split(":")[0]) for line in output_log if "finished at" in line]
    if (not errors or not finished or int(errors[0].split(":")[0]) > finished[0]
            or f"failed for {missing}: " not in errors[0]):
        raise Failure(f"cloud-init-output.log: {output_log}")

    # The status API says the same (polled: the retry schedule tries the clone again after
    # 30 s, when setup is briefly running).
    def api_error():
        try:
            setup = json.loads(ssh("sudo -n exoagent status --json").stdout).get("setup", {})
        except ValueError:
            return False
        return (setup.get("state"), setup.get("step"),
                (setup.get("reason") or {}).get("code")) == (
                    "error", "jupyterlab", "workflow-clone-failed")

    wait("the status API to say error: jupyterlab: workflow-clone-failed", api_error, 120, vm,
         interval=2)
    return {"exosphere_error_console_s": round(errored),
            "exosphere_error_cloud_init_done_s": round(waited_s)}


def desktop_in_chromium(vm, passphrase, key_file):
    """tests/browser/vm-desktop.mjs against the VM's forwarded Guacamole port: Exosphere's
    token POST, the desktop link (Xfce drawn) and the shell link (`exo42` echoed). The
    passphrase goes in the environment, never in argv. Returns its step times as seconds
    after QEMU started, and the shell's marker file name."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EXOAGENT_VM_GUAC_URL": f"http://127.0.0.1:{vm.guacamole_port}",
           "EXOAGENT_VM_GUAC_PASSPHRASE": passphrase, "EXOAGENT_TEST_ARTIFACTS": str(ARTIFACTS)}
    wall, mono = time.time(), time.monotonic()
    try:
        done = subprocess.run(["node", str(ROOT / "tests/browser/vm-desktop.mjs")], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        raise Failure("tests/browser/vm-desktop.mjs did not finish within 15 min") from None
    if done.returncode != 0:
        # What the VM saw meanwhile: the web side's and guacd's lines (guacd names why it
        # aborted a connection), sshd's, and cloud-init's restarts of services.
        seen = ssh_as_exouser(vm, key_file, "sudo -n journalctl -b --no-pager -o short-monotonic "
                              "-u exoagent -u ssh | tail -n 80; sudo -n grep -nE "
                              "'Restarted|restart' /var/log/cloud-init.log | tail -n 5")
        raise Failure(f"Chromium through Guacamole failed (tests/browser/vm-desktop.mjs exit "
                      f"{done.returncode}; screenshots in {ARTIFACTS}); in the VM:\n"
                      f"{seen.stdout}{seen.stderr}")
    found = json.loads(done.stdout.strip().split("\n")[-1])
    steps = {step: round(mono + found[step] / 1000 - wall - vm.started)
             for step in ["token", "desktop_connected", "desktop_drawn", "shell_connected",
                          "shell_echoed"]}
    return steps, found


def with_exosphere_desktop(scenario, key_file):
    """Exosphere's template with Guacamole and the desktop chosen and the credential files,
    on the Debian 11 web-desktop image (TigerVNC + Xfce and guacd 1.3.0 baked from bullseye's
    packages: the `package` route). The console ends in `complete`; Chromium on the host does
    what Exosphere does with the forwarded Guacamole port: the desktop is drawn and a command
    typed in the shell is echoed. Then over SSH as exouser: the choices, the home and the
    credential files are exouser's (cloud-init 20.4 writes `write_files` before the user
    exists: it has no `defer`)."""
    vm = scenario.boot(scenario.start_relay())
    wait("the console to say complete", lambda: console_complete(vm), 1500, vm)
    complete = time.monotonic() - vm.started
    say(f"Exosphere template with the desktop: complete {complete:.0f} s after QEMU started")
    passphrase = server_password(scenario.token, scenario.server)
    if len(passphrase.split()) != 11:
        raise Failure("no passphrase in os-server-password")
    steps, found = desktop_in_chromium(vm, passphrase, key_file)
    say(f"Chromium: token {steps['token']} s, desktop drawn {steps['desktop_drawn']} s "
        f"({found['desktop']['width']}x{found['desktop']['height']}, "
        f"{found['desktop']['colours']} colours), shell echoed exo42 {steps['shell_echoed']} s "
        f"after QEMU started; screenshots in {ARTIFACTS}")

    def check(command, good):
        result = ssh_as_exouser(vm, key_file, command)
        out = result.stdout.strip()
        try:
            passed = result.returncode == 0 and good(out)
        except (ValueError, KeyError, TypeError, IndexError):
            passed = False
        if not passed:
            more = ssh_as_exouser(vm, key_file, "sudo -n exoagent status; sudo -n grep -iE "
                                  "'write_files|defer|WARN|Trace' /var/log/cloud-init.log | "
                                  "tail -20").stdout
            raise Failure(f"in the VM, `{command}` gave {result.returncode}: {out!r} "
                          f"{result.stderr.strip()!r}\n{more}")
        return out

    wait("SSH as exouser", lambda: ssh_as_exouser(vm, key_file, "true").returncode == 0, 300,
         vm)
    check("cat /etc/exoagent/exosphere-choices.json",
          lambda out: json.loads(out) == {"guac_enabled": True, "gui_enabled": True})
    # What the shell typed in Chromium wrote, as exouser.
    marker = shlex.quote(found["marker"])
    check(f"cat ~/{marker} && stat -c %U ~/{marker}",
          lambda out: out.split("\n") == ["exo42", "exouser"])

    def ready(out):
        states = {s["service"]: s["state"] for s in json.loads(out)["services"]}
        return states.get("desktop") == "ready" and states.get("guacamole") == "ready"

    status = json.loads(check("sudo -n exoagent status --json", ready))
    # cloud-init's config stage (set-passwords: the template's ssh_pwauth) restarted sshd this
    # boot, beside the agent's start; Guacamole's web side was started only after that (a shell
    # opened in that moment failed: "SSH handshake failed", 519). Both as the kernel counts
    # since boot: the web side's start time (clock ticks) against sshd's last start (µs).
    check("sudo -n grep -cF 'Restarted the SSH daemon.' /var/log/cloud-init.log",
          lambda out: int(out) >= 1)
    web_pid = int(next(s["pid"] for s in status["services"] if s["service"] == "guacamole"))
    ticks, hertz, sshd_us, config_done, boot = check(
        f"awk '{{print $22}}' /proc/{web_pid}/stat; getconf CLK_TCK; "
        "systemctl show -p ExecMainStartTimestampMonotonic --value ssh.service; "
        "python3 -c 'import json; print(json.load(open(\"/run/cloud-init/status.json\"))"
        "[\"v1\"][\"modules-config\"][\"finished\"])'; awk '/^btime/{print $2}' /proc/stat",
        lambda out: int(out.split()[0]) / int(out.split()[1]) * 1e6 > int(out.split()[2])).split()
    say(f"cloud-init's config stage done {float(config_done) - int(boot):.0f} s after boot, sshd "
        f"last started at {int(sshd_us) / 1e6:.1f} s (cloud-init's restart), Guacamole's web "
        f"side at {int(ticks) / int(hertz):.1f} s")
    # Only exoagent's guacd: Debian's guacd.service (enabled by its package, on the same
    # 127.0.0.1:4822) is masked, no guacd runs as the package's `guacd` user, and exoagent's
    # never failed to bind (it crash-looped while the package's served the connections).
    check("systemctl is-enabled guacd.service || true", lambda out: out == "masked")
    check("ps -o user= -C guacd", lambda out: out and "guacd" not in out.split())
    check("sudo -n journalctl -b -u exoagent --no-pager | grep -c 'Unable to bind' || true",
          lambda out: out == "0")
    check("stat -c %U:%G /home/exouser", lambda out: out == "exouser:exouser")
    # exouser joined Debian's default user's group (`[host] default_user_group`) beside the
    # desktop's start: its session has the group all the same (given at the spawn, since a
    # process's groups are fixed at its start).
    check("id -nG exouser", lambda out: "debian" in out.split())
    check("ps -o supgrp= -C xfce4-session", lambda out: "debian" in out.split(","))
    # Guacamole's port (49528, inside Linux's ephemeral range) is kept from outgoing
    # connections, which could otherwise hold it when the web side binds.
    check("cat /proc/sys/net/ipv4/ip_local_reserved_ports",
          lambda out: "49528" in out.split(","))
    check("stat -c '%a %U:%G' ~/openrc.sh ~/.config/openstack/clouds.yaml",
          lambda out: out.split("\n") == ["400 exouser:exouser"] * 2)
    return {"exosphere_desktop_complete_s": round(complete),
            "exosphere_desktop_token_s": steps["token"],
            "exosphere_desktop_drawn_s": steps["desktop_drawn"],
            "exosphere_desktop_shell_echoed_s": steps["shell_echoed"]}


def exosphere_key(work):
    """The SSH key a researcher gives Exosphere (into the template's ssh_authorized_keys)."""
    key_file = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)],
                   check=True)
    return key_file


def exosphere_userdata(exoagent, key_file, workflow_url=None, desktop=False,
                       binary=("http://127.0.0.1:9/not-there", "0" * 64)):
    """The bootstrap drop-in, rendered as Exosphere renders it, with the workflow picked in the
    launcher, or none; with `desktop`, Guacamole and the desktop chosen (`guac_enabled`,
    `gui_enabled`). `binary`: the download URL and SHA-256 (by default a URL that leads
    nowhere: the baked agent must be preferred)."""
    url, sha256 = binary
    template = subprocess.run(
        [str(exoagent), "userdata", "--exosphere-template", "--delivery", "bootstrap",
         "--binary-url", url, "--binary-sha256", sha256],
        check=True, stdout=subprocess.PIPE, text=True).stdout
    clouds = ("clouds:\n  demo_RegionOne:\n    auth_type: v3applicationcredential\n"
              "    auth:\n      auth_url: https://keystone.example.org:5000/v3\n"
              "      application_credential_id: example\n"
              "      application_credential_secret: example\n    region_name: RegionOne\n")
    credentials = exosphere.credential_write_files(
        clouds, "https://keystone.example.org:5000/v3", "RegionOne", "example", "example")
    userdata = exosphere.render(template, ssh_key=Path(f"{key_file}.pub").read_text().strip(),
                                os_updates=False, guac=desktop, gui=desktop,
                                credentials=credentials, workflow=workflow_url,
                                workflow_ref=WORKFLOW_REF if workflow_url else "")
    return userdata.encode()


def write_agent_clouds_yaml(env, path):
    """A clouds.yaml (cloud `openstack`) with the harness's access-rule-restricted application
    credential, as the guest reaches Keystone; returns `path`."""
    credential = env["app_credentials"]["agent-tags"]
    path.write_text(
        "clouds:\n  openstack:\n    auth_type: v3applicationcredential\n    auth:\n"
        f"      auth_url: {env['keystone_url_from_vm']}\n"
        f"      application_credential_id: {credential['id']}\n"
        f"      application_credential_secret: {credential['secret']}\n"
        "    region_name: RegionOne\n    interface: admin\n")
    return path


# Each scenario and the Debian release its VM boots, in the order they run. The Debian 13 ones
# are the Debian 12 flows on the Debian 13 image (the same functions, another image).
SCENARIOS = {"metadata": "12", "config-drive": "12", "exosphere": "12", "exosphere-error": "12",
             "metadata-debian11": "11", "exosphere-desktop-debian11": "11",
             "metadata-debian13": "13", "config-drive-debian13": "13"}


def main():
    parser = argparse.ArgumentParser(description="exoagent in a real VM")
    parser.add_argument("--keep", action="store_true", help="leave the run directories")
    parser.add_argument("--only", choices=list(SCENARIOS), action="append",
                        help="run this scenario (repeatable; in the usual order)")
    args = parser.parse_args()
    if harness.main(["up"]) != 0:
        raise Failure("the OpenStack harness did not come up")
    selected = [name for name in SCENARIOS if not args.only or name in args.only]
    exoagent, deb = binary(client_page=any("desktop" in name for name in selected))
    images = {release: ensure_image(exoagent, deb, release, BAKE.get(release, DEFAULT_BAKE))
              for release in dict.fromkeys(SCENARIOS[name] for name in selected)}
    env = json.loads(harness.ENV_FILE.read_text())
    config = json.loads(harness.SECRETS_FILE.read_text())
    token, _ = harness.token_for(harness.password_auth("demo", config["passwords"]["demo"]),
                                 harness.project_scope("demo"))
    work = Path(tempfile.mkdtemp(prefix="exoagent-vm-userdata-"))
    clouds = write_agent_clouds_yaml(env, work / "clouds.yaml")
    userdata = subprocess.run(
        [str(exoagent), "userdata", "--clouds-yaml", str(clouds), "--cloud-name", "openstack",
         "--no-os-updates"], check=True, stdout=subprocess.PIPE).stdout
    clouds.unlink()
    workflow = WorkflowRepository(work)
    key_file = exosphere_key(work)
    exosphere_data = exosphere_userdata(exoagent, key_file, workflow.url)
    # What Exosphere's launcher sets on the server it creates, the workflow included.
    exosphere_meta = exosphere.server_metadata(
        "demo", workflow=(workflow.url, WORKFLOW_REF, WORKFLOW_PATH))
    # The same launch with a workflow repository the git daemon does not have.
    missing = workflow.url.rsplit("/", 1)[0] + "/missing.git"
    error_data = exosphere_userdata(exoagent, key_file, missing)
    error_meta = exosphere.server_metadata("demo", workflow=(missing, WORKFLOW_REF,
                                                             WORKFLOW_PATH))
    # Guacamole and the desktop chosen in the launcher, no workflow.
    desktop_data = exosphere_userdata(exoagent, key_file, desktop=True)
    desktop_meta = exosphere.server_metadata("demo", guac=True, gui=True)
    flows = {
        "metadata": (with_metadata_service_and_reboot, userdata, None),
        "config-drive": (with_config_drive_only, userdata, None),
        "exosphere": (lambda s: with_exosphere_template(
            s, key_file, workflow, upgrade_package(deb, work / "upgrade")),
            exosphere_data, exosphere_meta),
        "exosphere-error": (lambda s: with_exosphere_setup_error(s, key_file, missing),
                            error_data, error_meta),
        "exosphere-desktop": (lambda s: with_exosphere_desktop(s, key_file), desktop_data,
                              desktop_meta)}
    results = {}
    for name in selected:
        release = SCENARIOS[name]
        run, data, meta = flows[name.removesuffix(f"-debian{release}")]
        # Debian 12's keys as before; another release's carry its version.
        prefix = "" if release == DEFAULT_RELEASE else f"debian{release}_"
        scenario = Scenario(name, env, token, data, meta, image_dir=images[release])
        started = time.monotonic()
        try:
            results.update({prefix + key: value for key, value in run(scenario).items()})
            if scenario.vm.process.poll() is None:
                booted_release(scenario.vm, release)
            took = time.monotonic() - started
            say(f"scenario {name} (Debian {release}) passed in {took:.0f} s")
            results[f"{name}_scenario_s"] = round(took)
        except Failure:
            if scenario.vm:
                print(f"---- {name}: serial (tail) ----\n" + scenario.vm.serial_text()[-6000:],
                      file=sys.stderr)
            raise
        finally:
            scenario.close(args.keep)
    workflow.close()
    subprocess.run(["rm", "-rf", str(work)], check=False)
    print(json.dumps(results))
    say("VM test passed")


if __name__ == "__main__":
    try:
        main()
    except Failure as error:
        print(f"VM test FAILED: {error}", file=sys.stderr)
        sys.exit(1)
