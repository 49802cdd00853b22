"""The harness's stand-in for Neutron's metadata proxy.

On a cloud, an instance calls http://169.254.169.254 and Neutron's metadata proxy finds the
instance by its address, then forwards the request to nova-metadata with signed identity
headers. Here the instance is named in the first path segment instead:

    http://127.0.0.1:8779/<server-uuid>/openstack/latest/meta_data.json

is forwarded to nova-metadata as /openstack/latest/meta_data.json with X-Instance-ID,
X-Tenant-ID (the project given with --tenant), X-Instance-ID-Signature (HMAC-SHA256 of the
UUID keyed with nova's metadata_proxy_shared_secret) and X-Forwarded-For. Everything else —
status, headers, body — is nova-metadata's own answer. Standard library only.
"""

import argparse
import hashlib
import hmac
import http.client
import http.server
import re
import sys

UUID = re.compile(r"^[0-9a-fA-F-]{36}$")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def make_handler(upstream_host, upstream_port, secret, tenant):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("metadata-proxy: " + (fmt % args) + "\n")

        def relay(self):
            parts = self.path.split("/", 2)
            if len(parts) < 2 or not UUID.match(parts[1]):
                self.send_error(404, "first path segment must be a server UUID")
                return
            instance = parts[1]
            rest = "/" + (parts[2] if len(parts) > 2 else "")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            signature = hmac.new(secret, instance.encode(), hashlib.sha256).hexdigest()
            headers = {
                "X-Instance-ID": instance,
                "X-Tenant-ID": tenant,
                "X-Instance-ID-Signature": signature,
                "X-Forwarded-For": self.client_address[0],
            }
            for name in ("Content-Type", "User-Agent"):
                if self.headers.get(name):
                    headers[name] = self.headers[name]
            connection = http.client.HTTPConnection(upstream_host, upstream_port, timeout=30)
            try:
                connection.request(self.command, rest, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except OSError as error:
                self.send_error(502, f"nova-metadata unreachable: {error}")
                return
            finally:
                connection.close()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = relay
        do_POST = relay
        do_PUT = relay
        do_DELETE = relay

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8779")
    parser.add_argument("--upstream", default="127.0.0.1:8775")
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--tenant", required=True)
    args = parser.parse_args()
    with open(args.secret_file, "rb") as f:
        secret = f.read().strip()
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer(
        (host, int(port)), make_handler(up_host, int(up_port), secret, args.tenant)
    )
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
