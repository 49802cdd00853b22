#!/usr/bin/env python3
"""Real OpenStack on loopback for exoagent's tests.

Keystone, Placement, Glance, Neutron (ML2, no agents) and Nova (API, metadata, conductor,
scheduler, compute with the fake virt driver), installed from PyPI with pinned versions, on
MariaDB and RabbitMQ from Debian; plus a stand-in for Neutron's metadata proxy. Everything
listens on 127.0.0.1 and lives under one state directory:

    ${EXOAGENT_OPENSTACK_DIR:-/var/tmp/exoagent-openstack}

Commands:
    up              install what is missing, start everything, create the test resources;
                    does nothing when the stack is already up and healthy
    down            stop everything (by PID) and forget the stack's data
    status          exit 0 when up and healthy, 1 otherwise
    stop NAME       stop one service (e.g. nova-api) to simulate an outage
    start NAME      start one stopped service again and wait until it answers

`up` writes env.json (URLs, ids, test credentials; 0600) and clouds.yaml (clouds `admin`,
`demo`, `agent-full`, `agent-tags`) into the state directory. Standard library only: it runs
before the venv exists. The recipe and the reasons behind each setting are in
docs/testing.md and ../shared/reference/openstack.md.
"""

import glob
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATE = Path(os.environ.get("EXOAGENT_OPENSTACK_DIR", "/var/tmp/exoagent-openstack"))
VENV = STATE / "venv"
RUN = STATE / "run"
LOG = STATE / "log"
ETC = STATE / "etc"
DATA = STATE / "data"
ENV_FILE = STATE / "env.json"
CLOUDS_FILE = STATE / "clouds.yaml"
SECRETS_FILE = STATE / "secrets.json"
READY_FILE = STATE / "ready"

HOST = "127.0.0.1"
KEYSTONE = f"http://{HOST}:5000/v3"
COMPUTE = f"http://{HOST}:8774/v2.1"
COMPUTE_INTERNAL = "http://localhost:8774/v2.1"
# QEMU's user network (net 169.254.169.0/24) maps .2 to this host's loopback.
VM_HOST = "169.254.169.2"
COMPUTE_FROM_VM = f"http://{VM_HOST}:8774/v2.1"
PLACEMENT = f"http://{HOST}:8778"
IMAGE = f"http://{HOST}:9292"
NETWORK = f"http://{HOST}:9696"
METADATA = f"http://{HOST}:8775"
METADATA_PROXY = f"http://{HOST}:8779"
RABBIT = f"rabbit://guest:guest@{HOST}:5672/"
REGION = "RegionOne"
DATABASES = ["keystone", "placement", "glance", "neutron", "nova_api", "nova", "nova_cell0"]
SERVICE_USERS = {"nova": "compute", "placement": "placement", "glance": "image", "neutron": "network"}
PACKAGES = [
    "nova", "openstack-placement", "keystone", "glance", "neutron",
    "python-openstackclient", "PyMySQL", "gunicorn",
]
# Start order; `down` stops in reverse.
SERVICES = [
    "mariadb", "rabbitmq", "keystone", "placement", "glance", "neutron",
    "nova-api", "nova-metadata", "nova-conductor", "nova-scheduler", "nova-compute",
    "metadata-proxy", "keystone-tls",
]
API_PORTS = {
    "keystone": 5000, "placement": 8778, "glance": 9292, "neutron": 9696,
    "nova-api": 8774, "nova-metadata": 8775, "metadata-proxy": 8779, "keystone-tls": 5001,
}
TLS_PORTS = {5001}
KEYSTONE_TLS = f"https://{HOST}:5001/v3"
TLS_DIR = ETC / "tls"
T0 = time.monotonic()


class HarnessError(Exception):
    pass


def say(message):
    print(f"[openstack {time.monotonic() - T0:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Installing


def stamp_of_inputs():
    digest = hashlib.sha256()
    digest.update(" ".join(PACKAGES).encode())
    for path in [HERE / "constraints.txt", HERE / "bindingdriver" / "pyproject.toml",
                 HERE / "bindingdriver" / "exoagent_binding.py"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def rabbit_sbin():
    found = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    return Path(found[-1]) if found else None


def install_debian_packages():
    if Path("/usr/sbin/mariadbd").exists() and rabbit_sbin() is not None:
        return
    if os.geteuid() != 0:
        raise HarnessError("mariadb-server and rabbitmq-server are missing; run as root to install")
    say("apt: installing mariadb-server rabbitmq-server")
    # Debian would start its own MariaDB and RabbitMQ on the same ports; the harness runs its
    # own instances, so forbid service starts during the install (policy-rc.d exit 101).
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        run(["apt-get", *lock, "update", "-q"], env=env)
        run(["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends",
             "mariadb-server", "mariadb-client", "rabbitmq-server"], env=env)
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)


def install_venv():
    stamp = stamp_of_inputs()
    stamp_file = VENV / ".exoagent-stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    say("venv: installing the pinned OpenStack services")
    shutil.rmtree(VENV, ignore_errors=True)
    uv = shutil.which("uv")
    constraints = str(HERE / "constraints.txt")
    driver = str(HERE / "bindingdriver")
    if uv:
        run([uv, "venv", "-q", "-p", sys.executable, str(VENV)])
        run([uv, "pip", "install", "-q", "--python", str(VENV / "bin" / "python"),
             "--compile-bytecode", "-c", constraints, *PACKAGES, driver])
    else:
        run([sys.executable, "-m", "venv", str(VENV)])
        run([str(VENV / "bin" / "pip"), "install", "-q", "-c", constraints, *PACKAGES, driver])
    stamp_file.write_text(stamp)


# ---------------------------------------------------------------------------------------------
# Processes


def run(argv, env=None, log=None, cwd=None):
    """Run a command to completion; on failure raise with the tail of its output."""
    out = open(log, "ab") if log else subprocess.PIPE
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    if done.returncode != 0:
        tail = Path(log).read_text(errors="replace")[-3000:] if log else \
            (done.stdout or b"").decode(errors="replace")[-3000:]
        raise HarnessError(f"{' '.join(argv[:4])} … exited {done.returncode}:\n{tail}")
    return done


def pid_file(name):
    return RUN / f"{name}.pid"


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie (state Z) has ended; nobody may be left to reap it.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def running_pid(name):
    try:
        pid = int(pid_file(name).read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def spawn(name, argv, env, cwd=None):
    RUN.mkdir(parents=True, exist_ok=True)
    LOG.mkdir(parents=True, exist_ok=True)
    with open(LOG / f"{name}.out", "ab") as out:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    pid_file(name).write_text(str(process.pid))
    return process.pid


def kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_service(name):
    pid = running_pid(name)
    if name == "rabbitmq" and pid:
        subprocess.run([str(rabbit_sbin() / "rabbitmqctl"), "-q", "-n", "rabbit@localhost",
                        "stop"], env=rabbit_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)
    if pid:
        kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_group(pid, signal.SIGKILL)
    pid_file(name).unlink(missing_ok=True)


def service_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update({"PATH": f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def rabbit_env():
    base = DATA / "rabbit"
    return dict(os.environ, **{
        "HOME": str(base),
        "RABBITMQ_NODENAME": "rabbit@localhost",
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(LOG / "rabbit"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "ERL_EPMD_ADDRESS": HOST,
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    })


def gunicorn(name, port, app, extra_env):
    argv = [str(VENV / "bin" / "gunicorn"), "--workers", "1", "--threads", "4",
            "--worker-class", "gthread", "--timeout", "300", "--bind", f"{HOST}:{port}",
            "--chdir", str(HERE), "--error-logfile", "-",
            # One line per request with the User-Agent: how the benchmarks count calls.
            "--access-logfile", str(LOG / f"{name}-access.log"), "wsgi_shim:application"]
    return argv, service_env({"EXOAGENT_WSGI_APP": app, **extra_env})


def service_spec(name, config):
    """argv and environment of one long-running service."""
    nova_dir = str(ETC / "nova")
    nova_files = "api-paste.ini;nova.conf"
    if name == "mariadb":
        d = DATA / "mysql"
        return [
            "/usr/sbin/mariadbd", "--no-defaults", f"--datadir={d / 'data'}",
            f"--bind-address={HOST}", "--port=3306", f"--socket={d / 'mysqld.sock'}",
            f"--pid-file={d / 'mysqld.pid'}", "--innodb-buffer-pool-size=128M",
            "--max-connections=500", "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin",
            "--skip-name-resolve", f"--user={config['unix_user']}",
            f"--log-error={LOG / 'mariadb.log'}",
        ], dict(os.environ)
    if name == "rabbitmq":
        return [str(rabbit_sbin() / "rabbitmq-server")], rabbit_env()
    if name == "keystone":
        return gunicorn(name, 5000, "keystone.wsgi.api:application",
                        {"OS_KEYSTONE_CONFIG_DIR": str(ETC / "keystone")})
    if name == "placement":
        return gunicorn(name, 8778, "placement.wsgi.api:application",
                        {"OS_PLACEMENT_CONFIG_DIR": str(ETC / "placement")})
    if name == "glance":
        return gunicorn(name, 9292, "glance.wsgi.api:application",
                        {"OS_GLANCE_CONFIG_DIR": str(ETC / "glance")})
    if name == "neutron":
        return gunicorn(name, 9696, "neutron.wsgi.api:application",
                        {"OS_NEUTRON_CONFIG_DIR": str(ETC / "neutron")})
    if name == "nova-api":
        return gunicorn(name, 8774, "nova.wsgi.osapi_compute:application",
                        {"OS_NOVA_CONFIG_DIR": nova_dir,
                         "OS_NOVA_CONFIG_FILES": nova_files + ";nova-api.conf"})
    if name == "nova-metadata":
        return gunicorn(name, 8775, "nova.wsgi.metadata:application",
                        {"OS_NOVA_CONFIG_DIR": nova_dir,
                         "OS_NOVA_CONFIG_FILES": nova_files + ";nova-metadata.conf"})
    if name in ("nova-conductor", "nova-scheduler", "nova-compute"):
        return [str(VENV / "bin" / name), "--config-file", str(ETC / "nova" / "nova.conf"),
                "--log-file", str(LOG / f"{name}.log")], service_env({})
    if name == "keystone-tls":
        return [sys.executable, str(HERE / "relay.py"), "tls", "--listen", f"{HOST}:5001",
                "--upstream", f"{HOST}:5000", "--cert", str(TLS_DIR / "server.pem"),
                "--key", str(TLS_DIR / "server.key")], dict(os.environ)
    if name == "metadata-proxy":
        return [sys.executable, str(HERE / "relay.py"), "metadata", "--listen", f"{HOST}:8779",
                "--upstream", f"{HOST}:8775", "--secret-file", str(STATE / "metadata-secret"),
                "--tenant", config["demo_project_id"]], dict(os.environ)
    raise HarnessError(f"unknown service '{name}'; known: {', '.join(SERVICES)}")


def start_service(name, config):
    argv, env = service_spec(name, config)
    spawn(name, argv, env)


# ---------------------------------------------------------------------------------------------
# HTTP


def api_url(port):
    scheme = "https" if port in TLS_PORTS else "http"
    return f"{scheme}://{HOST}:{port}/"


def http(method, url, token=None, body=None, headers=None, raw=None, timeout=30):
    """One request; returns (status, headers, parsed JSON or None). Never raises on status."""
    data = None
    all_headers = {"Accept": "application/json"}
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    if raw is not None:
        data = raw
        all_headers["Content-Type"] = "application/octet-stream"
    if token:
        all_headers["X-Auth-Token"] = token
    all_headers.update(headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    handlers = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=str(TLS_DIR / "ca.pem"))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            status, response_headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, response_headers, payload = error.code, error.headers, error.read()
    try:
        parsed = json.loads(payload) if payload else None
    except ValueError:
        parsed = None
    return status, response_headers, parsed


def expect(status, headers, body, *wanted, what):
    if status not in wanted:
        raise HarnessError(f"{what}: HTTP {status}: {json.dumps(body)[:500]}")
    return body


def answers(url):
    try:
        status, _, _ = http("GET", url, timeout=5)
        return status < 500
    except OSError:
        return False


def wait_for(what, check, budget, interval=0.5):
    deadline = time.monotonic() + budget
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {budget} s waiting for {what}")
        time.sleep(interval)


def wait_for_api(name):
    port = API_PORTS[name]
    url = api_url(port)

    def check():
        if not running_pid(name):
            log = LOG / f"{name}.out"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise HarnessError(f"{name} exited during start-up:\n{tail}")
        return answers(url)

    wait_for(f"{name} on port {port}", check, 180)


def agent_tags(token, server):
    """The server's `exoagent:` tags (empty when Nova does not answer 200)."""
    status, _, body = http("GET", f"{COMPUTE}/servers/{server}/tags", token,
                           headers={"OpenStack-API-Version": "compute 2.96"})
    if status != 200:
        return set()
    return {t for t in body["tags"] if t.startswith("exoagent:")}


def token_for(auth, scope=None):
    body = {"auth": {"identity": auth}}
    if scope:
        body["auth"]["scope"] = scope
    status, headers, reply = http("POST", f"{KEYSTONE}/auth/tokens", body=body)
    expect(status, headers, reply, 201, what="keystone token")
    return headers["X-Subject-Token"], reply["token"]


def password_auth(user, password):
    return {"methods": ["password"],
            "password": {"user": {"name": user, "domain": {"id": "default"},
                                  "password": password}}}


def project_scope(name):
    return {"project": {"name": name, "domain": {"id": "default"}}}


# ---------------------------------------------------------------------------------------------
# Configuration


def db_url(config, name):
    return f"mysql+pymysql://exo:{config['db_password']}@{HOST}/{name}?charset=utf8"


def authtoken(config, user, service_type):
    return f"""
[keystone_authtoken]
www_authenticate_uri = {KEYSTONE}
auth_url = {KEYSTONE}
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = {user}
password = {config['passwords'][user]}
service_type = {service_type}
"""


def service_block(config, section, user):
    return f"""
[{section}]
auth_type = password
auth_url = {KEYSTONE}
project_name = service
project_domain_name = Default
user_domain_name = Default
region_name = {REGION}
username = {user}
password = {config['passwords'][user]}
"""


def write(path, text, mode=0o600):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip())
    path.chmod(mode)


def write_configs(config):
    venv_etc = VENV / "etc"
    ETC.mkdir(parents=True, exist_ok=True)
    for d in ["images", "staging", "tasks", "neutron", "nova", "nova-instances", "lock",
              "fernet-keys", "credential-keys", "rabbit/mnesia", "mysql"]:
        (DATA / d).mkdir(parents=True, exist_ok=True)
    (LOG / "rabbit").mkdir(parents=True, exist_ok=True)
    for d in ["fernet-keys", "credential-keys"]:
        (DATA / d).chmod(0o700)

    write(ETC / "keystone" / "keystone.conf", f"""
[DEFAULT]
log_file = {LOG / 'keystone.log'}
[database]
connection = {db_url(config, 'keystone')}
[identity]
password_hash_rounds = 4
[token]
provider = fernet
expiration = 86400
[fernet_tokens]
key_repository = {DATA / 'fernet-keys'}
[fernet_receipts]
key_repository = {DATA / 'fernet-keys'}
[credential]
key_repository = {DATA / 'credential-keys'}
""")

    write(ETC / "placement" / "placement.conf", f"""
[DEFAULT]
log_file = {LOG / 'placement.log'}
[placement_database]
connection = {db_url(config, 'placement')}
[api]
auth_strategy = keystone
""" + authtoken(config, "placement", "placement"))

    shutil.copy(venv_etc / "glance" / "glance-api-paste.ini", ETC / "glance-api-paste.ini")
    write(ETC / "glance" / "glance-api.conf", f"""
[DEFAULT]
log_file = {LOG / 'glance.log'}
enabled_backends = file:file
[glance_store]
default_backend = file
[file]
filesystem_store_datadir = {DATA / 'images'}/
[os_glance_staging_store]
filesystem_store_datadir = {DATA / 'staging'}/
[os_glance_tasks_store]
filesystem_store_datadir = {DATA / 'tasks'}/
[database]
connection = {db_url(config, 'glance')}
[paste_deploy]
flavor = keystone
config_file = {ETC / 'glance-api-paste.ini'}
""" + authtoken(config, "glance", "image"))

    shutil.copy(venv_etc / "neutron" / "api-paste.ini", ETC / "neutron-api-paste.ini")
    write(ETC / "neutron" / "neutron.conf", f"""
[DEFAULT]
log_file = {LOG / 'neutron.log'}
core_plugin = ml2
service_plugins =
auth_strategy = keystone
api_paste_config = {ETC / 'neutron-api-paste.ini'}
transport_url = {RABBIT}
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
state_path = {DATA / 'neutron'}
[database]
connection = {db_url(config, 'neutron')}
[oslo_concurrency]
lock_path = {DATA / 'lock'}
""" + authtoken(config, "neutron", "network") + service_block(config, "nova", "nova"))
    write(ETC / "neutron" / "plugins" / "ml2" / "ml2_conf.ini", """
[ml2]
type_drivers = flat,vlan
tenant_network_types =
mechanism_drivers = exoagent_bind
extension_drivers = port_security
[ml2_type_flat]
flat_networks = *
""")

    vendor_data = ETC / "vendor_data.json"
    write(vendor_data, json.dumps({"exoagent-harness": True}) + "\n", 0o644)
    (ETC / "nova").mkdir(parents=True, exist_ok=True)
    shutil.copy(venv_etc / "nova" / "api-paste.ini", ETC / "nova" / "api-paste.ini")
    write(ETC / "nova" / "nova.conf", f"""
[DEFAULT]
transport_url = {RABBIT}
compute_driver = fake.FakeDriverWithoutFakeNodes
state_path = {DATA / 'nova'}
instances_path = {DATA / 'nova-instances'}
my_ip = {HOST}
host = aio
heal_instance_info_cache_interval = -1
[api]
auth_strategy = keystone
vendordata_providers = StaticJSON
vendordata_jsonfile_path = {vendor_data}
[api_database]
connection = {db_url(config, 'nova_api')}
[database]
connection = {db_url(config, 'nova')}
[wsgi]
api_paste_config = {ETC / 'nova' / 'api-paste.ini'}
[oslo_concurrency]
lock_path = {DATA / 'lock'}
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = 2
[cache]
enabled = true
backend = dogpile.cache.memory
[vnc]
enabled = false
[oslo_messaging_notifications]
driver = noop
[glance]
region_name = {REGION}
""" + service_block(config, "placement", "nova")
          + service_block(config, "neutron", "nova")
          + f"service_metadata_proxy = true\nmetadata_proxy_shared_secret = {config['metadata_secret']}\n"
          + service_block(config, "service_user", "nova")
          + "send_service_user_token = true\n"
          + authtoken(config, "nova", "compute")
          # Validate every token with Keystone (no 5-minute cache), so a revoked token is
          # refused at once: the tests revoke tokens to exercise re-authentication.
          + "token_cache_time = -1\n")
    write(ETC / "nova" / "nova-api.conf", f"[DEFAULT]\nlog_file = {LOG / 'nova-api.log'}\n")
    write(ETC / "nova" / "nova-metadata.conf",
          f"[DEFAULT]\nlog_file = {LOG / 'nova-metadata.log'}\n")
    write(STATE / "metadata-secret", config["metadata_secret"] + "\n")

    rabbit = DATA / "rabbit"
    write(rabbit / "rabbitmq.conf", f"listeners.tcp.default = {HOST}:5672\nloopback_users = none\n")
    write(rabbit / "enabled_plugins", "[].\n")


def make_test_ca():
    """A throw-away CA and a certificate for 127.0.0.1 signed by it (for keystone-tls)."""
    TLS_DIR.mkdir(parents=True, exist_ok=True)
    d = str(TLS_DIR)
    log = LOG / "tls.log"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
         "-subj", "/CN=exoagent harness test CA", "-keyout", f"{d}/ca.key", "-out",
         f"{d}/ca.pem"], log=log)
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr"], log=log)
    (TLS_DIR / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n")
    run(["openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem",
         "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-days", "7", "-extfile",
         f"{d}/server.ext", "-out", f"{d}/server.pem"], log=log)
    (TLS_DIR / "ca.pem").chmod(0o644)


# ---------------------------------------------------------------------------------------------
# Bringing the stack up


def nova_manage(*args):
    return [str(VENV / "bin" / "nova-manage"), "--config-file", str(ETC / "nova" / "nova.conf"),
            *args]


def db_steps(config):
    """The schema steps of every service, as (name, [argv...], env) lists run in parallel."""
    venv_bin = VENV / "bin"
    keystone_conf = str(ETC / "keystone" / "keystone.conf")
    user = config["unix_user"]
    group = config["unix_group"]
    return [
        ("keystone", [
            [str(venv_bin / "keystone-manage"), "--config-file", keystone_conf, "db_sync"],
            [str(venv_bin / "keystone-manage"), "--config-file", keystone_conf, "fernet_setup",
             "--keystone-user", user, "--keystone-group", group],
            [str(venv_bin / "keystone-manage"), "--config-file", keystone_conf,
             "credential_setup", "--keystone-user", user, "--keystone-group", group],
            # The admin password comes from OS_BOOTSTRAP_PASSWORD, not argv.
            [str(venv_bin / "keystone-manage"), "--config-file", keystone_conf, "bootstrap",
             "--bootstrap-region-id", REGION,
             "--bootstrap-public-url", f"{KEYSTONE}/", "--bootstrap-internal-url", f"{KEYSTONE}/",
             "--bootstrap-admin-url", f"{KEYSTONE}/"],
        ], {"OS_BOOTSTRAP_PASSWORD": config["passwords"]["admin"]}),
        ("placement", [[str(venv_bin / "placement-manage"), "--config-file",
                        str(ETC / "placement" / "placement.conf"), "db", "sync"]], {}),
        ("glance", [[str(venv_bin / "glance-manage"), "--config-file",
                     str(ETC / "glance" / "glance-api.conf"), "db_sync"]], {}),
        ("neutron", [[str(venv_bin / "neutron-db-manage"), "--config-file",
                      str(ETC / "neutron" / "neutron.conf"), "--config-file",
                      str(ETC / "neutron" / "plugins" / "ml2" / "ml2_conf.ini"), "upgrade",
                      "heads"]], {}),
        # cell0's URL is derived from [database] (nova → nova_cell0) and cell1 takes the
        # configured database and transport: no password in argv.
        ("nova", [nova_manage("api_db", "sync"), nova_manage("cell_v2", "map_cell0"),
                  nova_manage("cell_v2", "create_cell", "--name", "cell1"),
                  nova_manage("db", "sync")], {}),
    ]


class Parallel:
    """Run named step lists on threads; wait() for one by name and re-raise its failure."""

    def __init__(self):
        self.threads = {}
        self.errors = {}

    def go(self, name, function):
        def body():
            try:
                function()
            except Exception as error:  # reported by wait()
                self.errors[name] = error
        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        self.threads[name] = thread

    def wait(self, name):
        self.threads[name].join()
        if name in self.errors:
            raise HarnessError(f"{name}: {self.errors[name]}")


def start_mariadb(config):
    data = DATA / "mysql" / "data"
    run(["mariadb-install-db", "--no-defaults", f"--datadir={data}",
         "--auth-root-authentication-method=normal", "--skip-test-db",
         f"--user={config['unix_user']}"], log=LOG / "mariadb-install.log")
    start_service("mariadb", config)
    sock = str(DATA / "mysql" / "mysqld.sock")
    client = ["mariadb", "--no-defaults", "-S", sock, "-u", "root"]

    def ready():
        if not running_pid("mariadb"):
            raise HarnessError("mariadbd exited; see " + str(LOG / "mariadb.log"))
        return subprocess.run(client + ["-e", "SELECT 1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0
    wait_for("MariaDB", ready, 60, 0.2)
    statements = [f"CREATE USER 'exo'@'{HOST}' IDENTIFIED BY '{config['db_password']}';",
                  f"GRANT ALL PRIVILEGES ON *.* TO 'exo'@'{HOST}';"]
    statements += [f"CREATE DATABASE {name} CHARACTER SET utf8mb3;" for name in DATABASES]
    # SQL on stdin: the database password stays out of argv.
    done = subprocess.run(client, input="\n".join(statements).encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise HarnessError(f"MariaDB set-up failed: {done.stdout.decode(errors='replace')}")


def start_rabbitmq(config):
    start_service("rabbitmq", config)
    ctl = [str(rabbit_sbin() / "rabbitmqctl"), "-q", "-n", "rabbit@localhost", "status"]

    def ready():
        if not running_pid("rabbitmq"):
            raise HarnessError("rabbitmq-server exited; see " + str(LOG / "rabbitmq.out"))
        return subprocess.run(ctl, env=rabbit_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    wait_for("RabbitMQ", ready, 120, 1.0)


def create_identity(config):
    """Projects, users, roles, catalog and the agent's application credentials (§9)."""
    admin_token, _ = token_for(password_auth("admin", config["passwords"]["admin"]),
                               project_scope("admin"))

    def post(path, body, what):
        status, headers, reply = http("POST", f"{KEYSTONE}{path}", admin_token, body)
        return expect(status, headers, reply, 201, what=what)

    def find(kind, name):
        status, headers, reply = http("GET", f"{KEYSTONE}/{kind}?name={name}", admin_token)
        items = expect(status, headers, reply, 200, what=f"list {kind}")[kind]
        return items[0]["id"]

    projects = {name: post("/projects", {"project": {"name": name, "domain_id": "default"}},
                           f"project {name}")["project"]["id"] for name in ("service", "demo")}
    roles = {name: find("roles", name) for name in ("admin", "service", "member", "reader")}

    def grant(project, user, role):
        status, headers, reply = http(
            "PUT", f"{KEYSTONE}/projects/{projects[project]}/users/{user}/roles/{roles[role]}",
            admin_token)
        expect(status, headers, reply, 204, what=f"grant {role}")

    users = {}
    for name in [*SERVICE_USERS, "demo"]:
        users[name] = post("/users", {"user": {"name": name, "domain_id": "default",
                                               "password": config["passwords"][name]}},
                           f"user {name}")["user"]["id"]
    for name in SERVICE_USERS:
        grant("service", users[name], "admin")
        grant("service", users[name], "service")
    grant("demo", users["demo"], "member")

    urls = {"compute": COMPUTE, "placement": PLACEMENT, "image": IMAGE, "network": NETWORK}
    for service_type, url in urls.items():
        service = post("/services", {"service": {"type": service_type, "name": service_type}},
                       f"service {service_type}")["service"]["id"]
        for interface in ("public", "internal", "admin"):
            # Compute's internal endpoint is spelt differently (same server), so tests can
            # see that a client honours `interface`.
            where = url
            if service_type == "compute" and interface == "internal":
                where = COMPUTE_INTERNAL
            if service_type == "compute" and interface == "admin":
                # As a VM on QEMU's user network sees this host (tests/vm).
                where = COMPUTE_FROM_VM
            post("/endpoints", {"endpoint": {"service_id": service, "interface": interface,
                                             "url": where, "region_id": REGION}},
                 f"endpoint {service_type} {interface}")

    # The agent's credentials, created as demo on its own user, as a researcher would.
    demo_token, _ = token_for(password_auth("demo", config["passwords"]["demo"]),
                              project_scope("demo"))
    rules = [{"service": "compute", "method": method, "path": path} for method, path in [
        ("PUT", "/v2.1/servers/*/tags/*"),
        ("DELETE", "/v2.1/servers/*/tags/*"),
        ("GET", "/v2.1/servers/*/tags"),
        ("PUT", "/v2.1/servers/*/metadata/*"),
        ("DELETE", "/v2.1/servers/*/metadata/*"),
    ]]
    credentials = {}
    for name, extra in (("agent-full", {}), ("agent-tags", {"access_rules": rules})):
        status, headers, reply = http(
            "POST", f"{KEYSTONE}/users/{users['demo']}/application_credentials", demo_token,
            {"application_credential": {"name": name, **extra}})
        created = expect(status, headers, reply, 201, what=f"application credential {name}")
        credentials[name] = {"id": created["application_credential"]["id"],
                             "secret": created["application_credential"]["secret"],
                             "name": name}
    return {"projects": projects, "users": users, "app_credentials": credentials}


def create_resources(config):
    """Flavor, image and network, as admin (§9)."""
    token, _ = token_for(password_auth("admin", config["passwords"]["admin"]),
                         project_scope("admin"))
    status, headers, reply = http("POST", f"{COMPUTE}/flavors", token, {"flavor": {
        "name": "m1.tiny", "id": "1", "ram": 512, "vcpus": 1, "disk": 1}})
    expect(status, headers, reply, 200, what="flavor")
    status, headers, reply = http("POST", f"{IMAGE}/v2/images", token, {
        "name": "harness-image", "disk_format": "raw", "container_format": "bare",
        "visibility": "public"})
    image = expect(status, headers, reply, 201, what="image")["id"]
    status, headers, reply = http("PUT", f"{IMAGE}/v2/images/{image}/file", token,
                                  raw=bytes(1024))
    expect(status, headers, reply, 204, what="image upload")
    status, headers, reply = http("POST", f"{NETWORK}/v2.0/networks", token, {"network": {
        "name": "public", "shared": True, "provider:network_type": "flat",
        "provider:physical_network": "physnet1"}})
    network = expect(status, headers, reply, 201, what="network")["network"]["id"]
    status, headers, reply = http("POST", f"{NETWORK}/v2.0/subnets", token, {"subnet": {
        "network_id": network, "ip_version": 4, "cidr": "10.20.30.0/24",
        "gateway_ip": "10.20.30.1", "dns_nameservers": ["10.20.30.2"], "name": "public-v4"}})
    expect(status, headers, reply, 201, what="subnet")

    def compute_node_registered():
        status, _, reply = http("GET", f"{PLACEMENT}/resource_providers", token)
        return status == 200 and len(reply["resource_providers"]) > 0
    wait_for("the compute node in Placement", compute_node_registered, 120, 1.0)
    run(nova_manage("cell_v2", "discover_hosts"), log=LOG / "nova-manage.log")
    return {"flavor_id": "1", "image_id": image, "network_id": network}


def smoke_test(config, env):
    """Boot a server as demo, read its identity through the metadata proxy, delete it."""
    token, _ = token_for(password_auth("demo", config["passwords"]["demo"]),
                         project_scope("demo"))
    status, headers, reply = http("POST", f"{COMPUTE}/servers", token, {"server": {
        "name": "harness-smoke", "imageRef": env["image_id"], "flavorRef": env["flavor_id"],
        "networks": [{"uuid": env["network_id"]}]}})
    server = expect(status, headers, reply, 202, what="smoke server")["server"]["id"]

    def active():
        status, _, reply = http("GET", f"{COMPUTE}/servers/{server}", token)
        state = reply["server"]["status"] if status == 200 else None
        if state == "ERROR":
            raise HarnessError(f"smoke server went to ERROR: {reply['server'].get('fault')}")
        return state == "ACTIVE"
    wait_for("the smoke server to become ACTIVE", active, 120, 0.5)
    status, _, meta = http("GET", f"{METADATA_PROXY}/{server}/openstack/latest/meta_data.json")
    if status != 200 or meta.get("uuid") != server:
        raise HarnessError(f"metadata proxy answered {status}: {meta}")
    status, headers, reply = http("DELETE", f"{COMPUTE}/servers/{server}", token)
    expect(status, headers, reply, 204, what="delete smoke server")


def clouds_yaml(config, env):
    def app_cloud(name):
        credential = env["app_credentials"][name]
        return (f"  {name}:\n    auth_type: v3applicationcredential\n    auth:\n"
                f"      auth_url: {KEYSTONE}\n"
                f"      application_credential_id: {credential['id']}\n"
                f"      application_credential_secret: {credential['secret']}\n"
                f"    region_name: {REGION}\n    interface: public\n"
                f"    identity_api_version: 3\n")

    def password_cloud(cloud, user, project):
        return (f"  {cloud}:\n    auth_type: password\n    auth:\n"
                f"      auth_url: {KEYSTONE}\n      username: {user}\n"
                f"      password: {config['passwords'][user]}\n"
                f"      project_name: {project}\n      user_domain_name: Default\n"
                f"      project_domain_name: Default\n"
                f"    region_name: {REGION}\n    interface: public\n"
                f"    identity_api_version: 3\n")
    return ("clouds:\n" + password_cloud("admin", "admin", "admin")
            + password_cloud("demo", "demo", "demo") + app_cloud("agent-full")
            + app_cloud("agent-tags"))


def healthy():
    if not READY_FILE.exists() or not ENV_FILE.exists():
        return False
    if any(running_pid(name) is None for name in SERVICES):
        return False
    return all(answers(api_url(port)) for port in API_PORTS.values())


def port_in_use(port):
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def up():
    if healthy():
        say(f"already up ({ENV_FILE})")
        return
    down(quiet=True)
    install_debian_packages()
    install_venv()
    busy = [p for p in [3306, 5672, *API_PORTS.values()] if port_in_use(p)]
    if busy:
        raise HarnessError(f"ports in use by another program: {busy}; stop it first")
    config = {
        "unix_user": pwd.getpwuid(os.geteuid()).pw_name,
        "unix_group": grp.getgrgid(os.getegid()).gr_name,
        "db_password": secrets.token_hex(16),
        "metadata_secret": secrets.token_hex(16),
        "passwords": {name: secrets.token_hex(12) for name in
                      ["admin", "demo", *SERVICE_USERS]},
    }
    STATE.mkdir(parents=True, exist_ok=True)
    write(SECRETS_FILE, json.dumps(config, indent=2))
    write_configs(config)
    make_test_ca()

    say("starting MariaDB and RabbitMQ")
    start_mariadb(config)
    work = Parallel()
    work.go("rabbitmq", lambda: start_rabbitmq(config))
    for name, steps, extra_env in db_steps(config):
        def steps_of(name=name, steps=steps, extra_env=extra_env):
            for argv in steps:
                run(argv, env=service_env(extra_env), log=LOG / f"{name}-manage.log")
        work.go(f"db-{name}", steps_of)

    work.wait("db-keystone")
    start_service("keystone", config)
    wait_for_api("keystone")
    say("Keystone up; creating identity, catalog and application credentials")
    identity = create_identity(config)
    config["demo_project_id"] = identity["projects"]["demo"]
    write(SECRETS_FILE, json.dumps(config, indent=2))

    work.wait("rabbitmq")
    for name in ("placement", "glance", "neutron"):
        work.wait(f"db-{name}")
        start_service(name, config)
    work.wait("db-nova")
    for name in ("nova-api", "nova-metadata", "nova-conductor", "nova-scheduler",
                 "nova-compute", "metadata-proxy", "keystone-tls"):
        start_service(name, config)
    for name in API_PORTS:
        wait_for_api(name)
    say("all APIs answer; creating flavor, image and network")
    env = {**identity, **create_resources(config)}
    env.update({
        "state_dir": str(STATE), "keystone_url": KEYSTONE, "compute_url": COMPUTE,
        "metadata_url": METADATA, "metadata_proxy_url": METADATA_PROXY,
        "keystone_tls_url": KEYSTONE_TLS, "tls_ca": str(TLS_DIR / "ca.pem"),
        "keystone_url_from_vm": f"http://{VM_HOST}:5000/v3",
        "clouds_yaml": str(CLOUDS_FILE), "region": REGION,
        "demo": {"username": "demo", "password": config["passwords"]["demo"],
                 "project": "demo"},
        "harness": str(HERE / "harness.py"),
    })
    write(CLOUDS_FILE, clouds_yaml(config, env))
    say("smoke test: boot a server, read its metadata, delete it")
    smoke_test(config, env)
    write(ENV_FILE, json.dumps(env, indent=2) + "\n")
    READY_FILE.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    say(f"ready: {ENV_FILE}")


def down(quiet=False):
    for name in reversed(SERVICES):
        if running_pid(name) and not quiet:
            say(f"stopping {name}")
        stop_service(name)
    # RabbitMQ leaves epmd running as its own daemon.
    if shutil.which("epmd"):
        subprocess.run(["epmd", "-kill"], env=dict(os.environ, ERL_EPMD_ADDRESS=HOST),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    for path in [READY_FILE, ENV_FILE, CLOUDS_FILE, SECRETS_FILE, STATE / "metadata-secret"]:
        path.unlink(missing_ok=True)
    for path in [RUN, ETC, DATA, LOG]:
        shutil.rmtree(path, ignore_errors=True)
    if not quiet:
        say("down")


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "up":
            up()
        elif command == "down":
            down()
        elif command == "status":
            ok = healthy()
            print("up" if ok else "down")
            return 0 if ok else 1
        elif command in ("stop", "start") and len(rest) == 1:
            name = rest[0]
            if name not in SERVICES:
                raise HarnessError(f"unknown service '{name}'; known: {', '.join(SERVICES)}")
            if command == "stop":
                stop_service(name)
            else:
                if running_pid(name):
                    return 0
                config = json.loads(SECRETS_FILE.read_text())
                start_service(name, config)
                if name in API_PORTS:
                    wait_for_api(name)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except HarnessError as error:
        print(f"openstack harness: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
