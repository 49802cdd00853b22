#!/usr/bin/env python3
"""uap.py: a real User Application Proxy (Debian's nginx) on loopback, configured like Exosphere's.

The configuration is generated from the production UAP config (exosphere-project/exosphere,
``deploy/prod/uap/app.conf``): the same ``map $host`` regexes, the same server block, the same
proxy and CORS lines. Only what must change to run on loopback changes; README.md in this
directory lists each such line and why.

Subcommands (Python 3.9+, standard library only; the ``openssl`` CLI makes the certificates —
exoagent itself never uses OpenSSL, this is test tooling):

  ca DIR NAME [--cn CN]
      a throw-away CA: DIR/NAME.pem, DIR/NAME.key
  issue DIR NAME --ca CA [--san DNS:x|IP:y]... [--client] [--self-signed]
      a leaf certificate signed by DIR/CA (or self-signed): DIR/NAME.pem, DIR/NAME.key
  render SPEC.json
      prints the nginx configuration for SPEC (see ``render``)
  up SPEC.json
      makes the proxy's CA and wildcard certificate, renders the configuration, starts nginx in
      the foreground (``daemon off``, private prefix, pid, logs and temp dirs), waits until every
      server listens, prints ONE JSON line on stdout:
          {"dir", "domain", "ca", "ca_spki_sha256", "servers": {NAME: {"address", "port"}},
           "pid", "error_log", "access_log"}
      then waits until its stdin closes (or SIGTERM/SIGINT/SIGHUP), stops nginx (SIGTERM, by
      PID), removes the directory unless the spec says ``keep``. Exit 0 after a clean stop, 1
      when setup failed (reason on stderr), 3 when nginx had to be killed.

Every command prints JSON on stdout (``ca``/``issue``: one line with the paths and the
certificate's SHA-256 fingerprint and SPKI hash).

SPEC (JSON object; every key optional):
  domain      the proxy's domain, default "uap.test" (the wildcard certificate is *.DOMAIN)
  net         the instances' /24 as three dotted octets, default "127.0.0" (instances 127.0.0.X)
  dir         working directory (default: a new one under $TMPDIR); kept when "keep" is true
  servers     list of server blocks, each one of the production server block, default
              [{"name": "prod"}]; per server:
                name               key in the output
                address            listen address, default: a free 127.R.R.N (outside "net")
                port               default 443 (see README: the browser's Origin must equal the
                                   Host nginx sends, as in production where the port is 443)
                verify             null (production: proxy_ssl_verify off) or a PEM file to
                                   trust: proxy_ssl_verify on + proxy_ssl_trusted_certificate
                ssl_name           with verify: proxy_ssl_name (default nginx's: the upstream
                                   address from proxy_pass)
                client_cert, client_key   mutual TLS: proxy_ssl_certificate(_key)
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

NGINX = os.environ.get("EXOAGENT_NGINX", "/usr/sbin/nginx")
OPENSSL = os.environ.get("EXOAGENT_OPENSSL", "openssl")


def err(msg: str) -> None:
    print(f"uap: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Certificates (openssl CLI)


def _run(cmd: list[str], text: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=text)
    if r.returncode != 0:
        stderr = r.stderr if text else r.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {stderr.strip()}")
    return r


def _der(pem_file: str) -> bytes:
    return _run([OPENSSL, "x509", "-in", pem_file, "-outform", "DER"], text=False).stdout


def fingerprints(pem_file: str) -> dict:
    """SHA-256 of the certificate (DER) and base64 SHA-256 of its SubjectPublicKeyInfo."""
    der = _der(pem_file)
    pub = _run([OPENSSL, "x509", "-in", pem_file, "-noout", "-pubkey"]).stdout
    p = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "DER"], input=pub.encode(),
                       capture_output=True, check=True)
    spki = p.stdout
    return {
        "sha256": ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest()),
        "spki_sha256": base64.b64encode(hashlib.sha256(spki).digest()).decode(),
    }


def make_ca(directory: str, name: str, cn: str | None = None) -> dict:
    os.makedirs(directory, exist_ok=True)
    key, pem = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.pem")
    _run([OPENSSL, "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
          "-nodes", "-keyout", key, "-out", pem, "-days", "2", "-subj", f"/CN={cn or name}",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    os.chmod(key, 0o600)
    return {"cert": pem, "key": key, **fingerprints(pem)}


def issue(directory: str, name: str, ca: str | None, sans: list[str], client: bool = False) -> dict:
    """A leaf for `sans` (["DNS:x", "IP:y"]) signed by DIR/ca.{pem,key}, or self-signed (ca None)."""
    os.makedirs(directory, exist_ok=True)
    key, pem = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.pem")
    csr = os.path.join(directory, f"{name}.csr")
    ext = os.path.join(directory, f"{name}.ext")
    cn = name  # never one of the names: nginx falls back to the CN when no DNS name matches
    lines = ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
    if sans:
        lines.append(f"subjectAltName={','.join(sans)}")
    with open(ext, "w") as f:
        f.write("\n".join(lines) + "\n")
    _run([OPENSSL, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
          "-keyout", key, "-out", csr, "-subj", f"/CN={cn}"])
    os.chmod(key, 0o600)
    if ca:
        _run([OPENSSL, "x509", "-req", "-in", csr, "-CA", os.path.join(directory, f"{ca}.pem"),
              "-CAkey", os.path.join(directory, f"{ca}.key"), "-CAcreateserial", "-days", "2",
              "-out", pem, "-extfile", ext])
    else:
        _run([OPENSSL, "x509", "-req", "-in", csr, "-signkey", key, "-days", "2", "-out", pem,
              "-extfile", ext])
    os.remove(csr)
    os.remove(ext)
    return {"cert": pem, "key": key, **fingerprints(pem)}


# ---------------------------------------------------------------------------------------------
# The configuration


def _dashes(net: str) -> str:
    octets = net.split(".")
    if len(octets) != 3 or not all(o.isdigit() and int(o) < 256 for o in octets):
        raise ValueError(f"net must be three dotted octets (a /24), saw {net!r}")
    return "-".join(octets)


def render(spec: dict, d: str, cert: str, key: str) -> str:
    """The nginx configuration: a private main context around the production http content."""
    domain = spec.get("domain", "uap.test")
    net = spec.get("net", "127.0.0")
    dn = re.escape(domain).replace("\\-", "-")  # uap\.test, as production writes exosphere\.app
    nd = _dashes(net)
    logs, tmp = os.path.join(d, "logs"), os.path.join(d, "tmp")
    out = []
    w = out.append
    # --- Loopback harness: not in production (see README.md) ---------------------------------
    w("# Generated by tests/uap/uap.py from exosphere-project/exosphere deploy/prod/uap/app.conf.")
    w("# Lines marked LOOPBACK differ from production; tests/uap/README.md says why.")
    w("daemon off;  # LOOPBACK: the harness supervises nginx itself")
    w("worker_processes 1;  # LOOPBACK: small machine")
    w(f"pid {d}/nginx.pid;  # LOOPBACK: private pid file")
    w(f"error_log {logs}/error.log info;  # LOOPBACK: private log")
    w("events { worker_connections 1024; }")
    w("http {")
    w("    log_format uap '$time_iso8601 $remote_addr \"$host\" \"$request\" $status $body_bytes_sent "
      "upstream=$upstream_addr upstream_status=$upstream_status time=$request_time';  # LOOPBACK: tests read it")
    w(f"    access_log {logs}/access.log uap;  # LOOPBACK: private log")
    for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        w(f"    {t}_temp_path {tmp}/{t};  # LOOPBACK: private temp dir")
    w("    default_type application/octet-stream;  # LOOPBACK: no /etc/nginx/mime.types")
    w("")
    # --- Production, verbatim but for the domain and the network ------------------------------
    w(r'''    map $http_origin $cors_origin_header {
        default "";
        "~(^|^http:\/\/)(localhost$|localhost:[0-9]{1,4}$)" "$http_origin";
        "~(^(http(s)?:\/\/)?(.*\.)?exosphere.localhost(:[0-9]{1,5})?$)" "$http_origin";
        "https://my-example.exosphere.app" "$http_origin";
    }

    map $http_origin $cors_cred {
        default "";
        "~(^|^http:\/\/)(localhost$|localhost:[0-9]{1,4}$)" "true";
        "~(^(http(s)?:\/\/)?(.*\.)?exosphere.localhost(:[0-9]{1,5})?$)" "true";
        "https://my-example.exosphere.app" "true";
    }
''')
    w("    map $host $proto {")
    w("        default https;")
    w(f'        "~*(^(http|https)-{nd}-(\\d+)-(\\d+)\\.{dn}$)" $2;  # LOOPBACK: network, domain')
    w("    }")
    w("")
    w("    # Fourth octet can be 0 to 255")
    w("    map $host $octet4 {")
    w(f'        "~*(^(http-|https-)?{nd}-([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])-(\\d+)\\.{dn}$)" $3;  # LOOPBACK: network, domain')
    w("    }")
    w("")
    w("    # Port can be whatever")
    w("    map $host $port {")
    w(f'        "~*(^(http-|https-)?{nd}-(\\d+)-(\\d+)\\.{dn}$)" $4;  # LOOPBACK: network, domain')
    w("    }")
    for server in spec["servers"]:
        w("")
        w(f"    # server {server['name']!r}")
        w("    server {")
        w(f"        server_name *.{domain};  # LOOPBACK: domain")
        w("")
        w("        add_header Access-Control-Allow-Origin $cors_origin_header always;")
        w("        add_header Access-Control-Allow-Credentials $cors_cred;")
        w('        add_header "Access-Control-Allow-Methods" "GET, POST, OPTIONS, HEAD";')
        w('        add_header "Access-Control-Allow-Headers" "Authorization, Origin, X-Requested-With, Content-Type, Accept, X-Is-Electron";')
        w("")
        w("        if ($request_method = 'OPTIONS' ) {")
        w("            return 204 no-content;")
        w("        }")
        w("")
        w("        location / {")
        w(f"            proxy_pass $proto://{net}.$octet4:$port;  # LOOPBACK: network")
        if server.get("verify"):
            w("            proxy_ssl_verify on;  # VARIANT: verified upstream")
            w(f"            proxy_ssl_trusted_certificate {server['verify']};  # VARIANT")
            if server.get("ssl_name"):
                w(f"            proxy_ssl_name {server['ssl_name']};  # VARIANT")
        else:
            w("            proxy_ssl_verify off;")
        if server.get("client_cert"):
            w(f"            proxy_ssl_certificate {server['client_cert']};  # VARIANT: mutual TLS")
            w(f"            proxy_ssl_certificate_key {server['client_key']};  # VARIANT: mutual TLS")
        w("            proxy_set_header Host $host;")
        w("            proxy_set_header X-Forwarded-Proto $scheme;")
        w("")
        w("            # Required for web sockets to function")
        w("            proxy_http_version 1.1;")
        w("            proxy_buffering off;")
        w("            proxy_set_header Upgrade $http_upgrade;")
        w('            proxy_set_header Connection "upgrade";')
        w("")
        w("            # TODO set cookie path to restrict cookies to this host and port")
        w("            #proxy_cookie_path / $cookie_path;")
        w("")
        w("        }")
        w("")
        w("        client_max_body_size 0;")
        w("        proxy_http_version 1.1;")
        w("        proxy_request_buffering off;")
        w("")
        w(f"        listen {server['address']}:{server.get('port', 443)} ssl;  # LOOPBACK: private address (production: 443 and [::]:443)")
        w(f"        ssl_certificate {cert};  # LOOPBACK: throw-away CA's *.{domain}")
        w(f"        ssl_certificate_key {key};  # LOOPBACK")
        w("    }")
    # Production's second server block (port 80 → 301 for the bare proxy name) is left out:
    # nothing here listens on port 80 (README.md).
    w("}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Running nginx


def _bindable(address: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_addresses(spec: dict) -> None:
    """A free 127.R.S.N for each server without an address (N = 1, 2, … in one random /24)."""
    net = ipaddress.ip_network(f"{spec.get('net', '127.0.0')}.0/24")
    need = [s for s in spec["servers"] if not s.get("address")]
    for _ in range(50):
        base = f"127.{random.randint(100, 254)}.{random.randint(1, 254)}"
        addrs = [f"{base}.{i + 1}" for i in range(len(need))]
        if any(ipaddress.ip_address(a) in net for a in addrs):
            continue
        if all(_bindable(a, s.get("port", 443)) for a, s in zip(addrs, need)):
            for a, s in zip(addrs, need):
                s["address"] = a
            return
    raise RuntimeError("no free loopback address for the proxy")


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


class Stop(Exception):
    pass


def _on_signal(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def up(spec: dict) -> int:
    spec.setdefault("servers", [{"name": "prod"}])
    spec.setdefault("domain", "uap.test")
    keep = bool(spec.get("keep"))
    d = spec.get("dir") or tempfile.mkdtemp(prefix="exoagent-uap-")
    d = os.path.abspath(d)
    proc = None
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)
    status = 0
    try:
        for sub in ("logs", "tmp", "pki"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        pki = os.path.join(d, "pki")
        ca = make_ca(pki, "uap-ca", "exoagent test UAP CA (throw-away)")
        leaf = issue(pki, "uap-wildcard", "uap-ca", [f"DNS:*.{spec['domain']}"])
        pick_addresses(spec)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(render(spec, d, leaf["cert"], leaf["key"]))
        error_log = os.path.join(d, "logs", "error.log")
        t = subprocess.run([NGINX, "-t", "-q", "-p", d + "/", "-c", conf, "-e", error_log],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if t.returncode != 0:
            raise RuntimeError(f"nginx -t refused {conf}: {t.stderr.strip()}")
        proc = subprocess.Popen([NGINX, "-p", d + "/", "-c", conf, "-e", error_log],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(d, "logs", "stderr.log"), "w"))
        deadline = time.monotonic() + 10
        while not all(_listening(s["address"], s.get("port", 443)) for s in spec["servers"]):
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited {proc.returncode}: {open(error_log).read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not listen within 10 s")
            time.sleep(0.05)
        print(json.dumps({
            "dir": d, "domain": spec["domain"], "ca": ca["cert"],
            "ca_spki_sha256": ca["spki_sha256"], "conf": conf,
            "servers": {s["name"]: {"address": s["address"], "port": s.get("port", 443)}
                        for s in spec["servers"]},
            "pid": proc.pid, "error_log": error_log,
            "access_log": os.path.join(d, "logs", "access.log"),
        }), flush=True)
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Stop as e:
            err(f"{e} received")
    except Stop as e:
        err(f"{e} received during setup")
        status = 1
    except Exception as e:  # noqa: BLE001  (reported, and the exit status says so)
        err(str(e))
        status = 1
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # nginx: fast shutdown, workers end too
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                err("nginx did not stop within 10 s of SIGTERM; killing it")
                proc.kill()
                proc.wait(5)
                status = 3
        if not keep:
            shutil.rmtree(d, ignore_errors=True)
    return status


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ca")
    a.add_argument("dir")
    a.add_argument("name")
    a.add_argument("--cn")
    i = sub.add_parser("issue")
    i.add_argument("dir")
    i.add_argument("name")
    i.add_argument("--ca", help="the CA's name in DIR; self-signed without it")
    i.add_argument("--san", action="append", default=[])
    i.add_argument("--client", action="store_true")
    r = sub.add_parser("render")
    r.add_argument("spec")
    u = sub.add_parser("up")
    u.add_argument("spec", nargs="?")
    args = p.parse_args(argv)
    if args.cmd == "ca":
        print(json.dumps(make_ca(args.dir, args.name, args.cn)))
    elif args.cmd == "issue":
        print(json.dumps(issue(args.dir, args.name, args.ca, args.san, args.client)))
    elif args.cmd == "render":
        with open(args.spec) as f:
            spec = json.load(f)
        spec.setdefault("servers", [{"name": "prod"}])
        for n, s in enumerate(spec["servers"]):
            s.setdefault("address", f"127.100.0.{n + 1}")
        d = spec.get("dir", "/tmp/exoagent-uap")
        print(render(spec, d, f"{d}/pki/uap-wildcard.pem", f"{d}/pki/uap-wildcard.key"), end="")
    elif args.cmd == "up":
        spec = {}
        if args.spec:
            with open(args.spec) as f:
                spec = json.load(f)
        return up(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
