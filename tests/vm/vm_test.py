#!/usr/bin/env python3
"""The VM test: a real Debian 12 VM (QEMU, software emulation) with real systemd and cloud-init
boots the baked image as a server of the real-OpenStack harness and is observed through Nova,
its serial console and a forwarded port.

    python3 tests/vm/vm_test.py [--keep]

1. Brings up the OpenStack harness; builds the image (tests/vm/build-image.sh) unless one for
   this exoagent binary exists.
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
   Guacamole nor desktop, and the credential files: the console ends in `complete`, the
   passphrase is published, and over SSH as exouser with that key: the choices file holds
   plain JSON and the agent read it, the credential files are exouser's and 0400, nothing was
   downloaded.

Prints timings (QEMU start → Nova shows complete) for bench/. Exits non-zero on any failure,
with the serial log's tail.
"""

import argparse
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "openstack"))
import harness  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "exosphere"))
import userdata as exosphere  # noqa: E402

VM_DIR = Path(os.environ.get("EXOAGENT_VM_DIR", "/var/tmp/exoagent-vm"))
READY = {"exoagent:setup:complete", "exoagent:jupyterlab:ready"}


class Failure(Exception):
    pass


def say(message):
    print(f"[vm {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "exoagent"], cwd=ROOT,
                   check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return (ROOT / target / "release" / "exoagent").resolve()


def ensure_image(exoagent):
    digest = hashlib.sha256()
    digest.update(exoagent.read_bytes())
    digest.update((ROOT / "tests/vm/build-image.sh").read_bytes())
    stamp = digest.hexdigest()
    stamp_file = VM_DIR / "image.stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp and (VM_DIR / "root.raw").exists():
        return
    say("building the image (mmdebstrap, JupyterLab baked)")
    subprocess.run(["bash", str(ROOT / "tests/vm/build-image.sh"), str(VM_DIR), str(exoagent)],
                   check=True)
    stamp_file.write_text(stamp)


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
    def __init__(self, run_dir, server, relay_port, mac, config_drive=None, image_dir=None):
        self.image_dir = image_dir or VM_DIR
        self.mac = mac
        self.config_drive = config_drive
        self.run_dir = run_dir
        self.server = server
        self.relay_port = relay_port
        self.jupyter_port = free_port()
        self.ssh_port = free_port()
        self.serial = run_dir / "serial.log"
        self.overlay = run_dir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image_dir / "root.raw"), str(self.overlay)], check=True)
        self.process = None
        self.boots = 0

    def start(self):
        self.boots += 1
        netdev = (f"user,id=n0,net=169.254.169.0/24,hostfwd=tcp:127.0.0.1:{self.jupyter_port}-:8888"
                  f",hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22")
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

    def power_off(self, budget=300):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.run_dir / "monitor.sock"))
            s.sendall(b"system_powerdown\n")
            time.sleep(1)
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


def wait(what, check, budget, vm):
    deadline = time.monotonic() + budget
    while True:
        if vm.process.poll() is not None:
            raise Failure(f"QEMU exited while waiting for {what}")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {budget} s waiting for {what}")
        time.sleep(5)




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

    def __init__(self, name, env, token, userdata):
        self.env, self.token = env, token
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"exoagent-vm-{name}-"))
        status, _, body = harness.http("POST", f"{harness.COMPUTE}/servers", token, {"server": {
            "name": f"exoagent-vm-{name}", "imageRef": env["image_id"],
            "flavorRef": env["flavor_id"], "networks": [{"uuid": env["network_id"]}],
            "user_data": base64.b64encode(userdata).decode()}})
        if status != 202:
            raise Failure(f"server create: {status} {body}")
        self.server = body["server"]["id"]
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

    def boot(self, relay_port, config_drive=None, image_dir=None):
        self.vm = Vm(self.run_dir, self.server, relay_port, self.mac, config_drive, image_dir)
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


def console_complete(vm):
    lines = status_lines(vm.serial_text())
    if lines and lines[-1] == "error":
        raise Failure(f"setup reported error: {lines}")
    return bool(lines) and lines[-1] == "complete"


def with_exosphere_template(scenario, key_file):
    """Exosphere's drop-in, rendered as Exosphere does; checked from inside over SSH."""
    vm = scenario.boot(scenario.start_relay())
    wait("the console to say complete", lambda: console_complete(vm), 1500, vm)
    ready = time.monotonic() - vm.started
    say(f"Exosphere template: complete {ready:.0f} s after QEMU started")
    if len(server_password(scenario.token, scenario.server).split()) != 11:
        raise Failure("no passphrase in os-server-password")

    def ssh(command):
        return subprocess.run(
            ["ssh", "-i", str(key_file), "-p", str(vm.ssh_port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", "exouser@127.0.0.1", command],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    wait("SSH as exouser with the key Exosphere put in the template",
         lambda: ssh("true").returncode == 0, 300, vm)
    # Deferred files are written late in cloud-final, after the agent may be done; and the
    # userdata must not have made cloud-init fail anywhere.
    wait("cloud-init to finish", lambda: "status: done" in ssh("cloud-init status").stdout
         or "status: error" in ssh("cloud-init status").stdout, 900, vm)
    status = ssh("cloud-init status --long").stdout
    if "status: done" not in status:
        raise Failure(f"cloud-init did not finish cleanly:\n{status}")
    checks = {
        "cat /etc/exoagent/exosphere-choices.json":
            lambda out: json.loads(out) == {"guac_enabled": False, "gui_enabled": False},
        "stat -c '%a %U:%G' /home/exouser/openrc.sh /home/exouser/.config/openstack/clouds.yaml":
            lambda out: out.split("\n") == ["400 exouser:exouser"] * 2,
        "sudo -n exoagent validate":
            lambda out: "/etc/exoagent/exosphere-choices.json" in out,
        "test ! -e /usr/local/bin/exoagent && echo not-downloaded":
            lambda out: out == "not-downloaded",
        "sudo -n grep -c exouser /etc/sudoers.d/90-cloud-init-users":
            lambda out: int(out) >= 1,
    }
    for command, good in checks.items():
        result = ssh(command)
        out = result.stdout.strip()
        try:
            passed = result.returncode == 0 and good(out)
        except ValueError:
            passed = False
        if not passed:
            diagnosis = ssh("sudo -n cloud-init status --long; sudo -n cat "
                            "/var/lib/cloud/instance/cloud-config.txt; sudo -n grep -iE "
                            "'write_files|defer|merg|WARN|Trace' /var/log/cloud-init.log | tail -40")
            raise Failure(f"in the VM, `{command}` gave {result.returncode}: {out!r} "
                          f"{result.stderr.strip()!r}\n{diagnosis.stdout}")
    return {"exosphere_template_complete_s": round(ready)}


def exosphere_userdata(exoagent, work):
    """The bootstrap drop-in (its URL unreachable: the baked agent must be preferred),
    rendered as Exosphere renders it."""
    key_file = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)],
                   check=True)
    template = subprocess.run(
        [str(exoagent), "userdata", "--exosphere-template", "--delivery", "bootstrap",
         "--binary-url", "http://127.0.0.1:9/not-there", "--binary-sha256", "0" * 64],
        check=True, stdout=subprocess.PIPE, text=True).stdout
    clouds = ("clouds:\n  demo_RegionOne:\n    auth_type: v3applicationcredential\n"
              "    auth:\n      auth_url: https://keystone.example.org:5000/v3\n"
              "      application_credential_id: example\n"
              "      application_credential_secret: example\n    region_name: RegionOne\n")
    credentials = exosphere.credential_write_files(
        clouds, "https://keystone.example.org:5000/v3", "RegionOne", "example", "example")
    userdata = exosphere.render(template, ssh_key=(work / "id_ed25519.pub").read_text().strip(),
                                os_updates=False, credentials=credentials)
    return userdata.encode(), key_file


def main():
    parser = argparse.ArgumentParser(description="exoagent in a real VM")
    parser.add_argument("--keep", action="store_true", help="leave the run directories")
    parser.add_argument("--only", choices=["metadata", "config-drive", "exosphere"],
                        help="run one scenario")
    args = parser.parse_args()
    if harness.main(["up"]) != 0:
        raise Failure("the OpenStack harness did not come up")
    exoagent = binary()
    ensure_image(exoagent)
    env = json.loads(harness.ENV_FILE.read_text())
    config = json.loads(harness.SECRETS_FILE.read_text())
    token, _ = harness.token_for(harness.password_auth("demo", config["passwords"]["demo"]),
                                 harness.project_scope("demo"))
    credential = env["app_credentials"]["agent-tags"]
    work = Path(tempfile.mkdtemp(prefix="exoagent-vm-userdata-"))
    clouds = work / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  openstack:\n    auth_type: v3applicationcredential\n    auth:\n"
        f"      auth_url: {env['keystone_url_from_vm']}\n"
        f"      application_credential_id: {credential['id']}\n"
        f"      application_credential_secret: {credential['secret']}\n"
        "    region_name: RegionOne\n    interface: admin\n")
    userdata = subprocess.run(
        [str(exoagent), "userdata", "--clouds-yaml", str(clouds), "--cloud-name", "openstack",
         "--no-os-updates"], check=True, stdout=subprocess.PIPE).stdout
    clouds.unlink()
    exosphere_data, key_file = exosphere_userdata(exoagent, work)
    results = {}
    for name, run, data in [
            ("metadata", with_metadata_service_and_reboot, userdata),
            ("config-drive", with_config_drive_only, userdata),
            ("exosphere", lambda s: with_exosphere_template(s, key_file), exosphere_data)]:
        if args.only and name != args.only:
            continue
        scenario = Scenario(name, env, token, data)
        try:
            results.update(run(scenario))
        except Failure:
            if scenario.vm:
                print(f"---- {name}: serial (tail) ----\n" + scenario.vm.serial_text()[-6000:],
                      file=sys.stderr)
            raise
        finally:
            scenario.close(args.keep)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    print(json.dumps(results))
    say("VM test passed")


if __name__ == "__main__":
    try:
        main()
    except Failure as error:
        print(f"VM test FAILED: {error}", file=sys.stderr)
        sys.exit(1)
