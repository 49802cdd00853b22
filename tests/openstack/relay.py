"""A small HTTP reverse proxy for the harness (standard library only), in two roles:

metadata   the stand-in for Neutron's metadata proxy. On a cloud, an instance calls
           http://169.254.169.254 and Neutron's proxy finds the instance by its address, then
           forwards to nova-metadata with signed identity headers. Here the instance is named
           in the first path segment instead:
               http://127.0.0.1:8779/<server-uuid>/openstack/latest/meta_data.json
           is forwarded as /openstack/latest/meta_data.json with X-Instance-ID, X-Tenant-ID
           (--tenant), X-Instance-ID-Signature (HMAC-SHA256 of the UUID keyed with nova's
           metadata_proxy_shared_secret) and X-Forwarded-For. With --instance UUID, one VM's
           own relay: paths are passed unchanged, as a guest sends them to 169.254.169.254.
tls        TLS in front of a plain-HTTP service (Keystone), with the harness's own test CA, so
           clients' CA-bundle handling meets a real TLS server.

Everything else — status, headers, body — is the upstream's own answer.
"""

import argparse
import hashlib
import hmac
import http.client
import http.server
import re
import ssl
import sys

UUID = re.compile(r"^[0-9a-fA-F-]{36}$")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}
PASSED_ON = ("Content-Type", "User-Agent", "Accept", "X-Auth-Token", "X-Subject-Token",
             "OpenStack-API-Version")


def metadata_route(secret, tenant, fixed_instance=None):
    """Maps /<uuid>/rest to (rest, signed identity headers); with `fixed_instance` (one VM
    behind its own relay) every path is that instance's, unchanged."""
    def route(handler):
        if fixed_instance:
            instance, rest = fixed_instance, handler.path
        else:
            parts = handler.path.split("/", 2)
            if len(parts) < 2 or not UUID.match(parts[1]):
                return None
            instance, rest = parts[1], "/" + (parts[2] if len(parts) > 2 else "")
        signature = hmac.new(secret, instance.encode(), hashlib.sha256).hexdigest()
        return rest, {
            "X-Instance-ID": instance,
            "X-Tenant-ID": tenant,
            "X-Instance-ID-Signature": signature,
            "X-Forwarded-For": handler.client_address[0],
        }
    return route


def plain_route(handler):
    return handler.path, {}


def make_handler(upstream_host, upstream_port, route):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            sys.stderr.write("relay: " + (fmt % args) + "\n")

        def relay(self):
            routed = route(self)
            if routed is None:
                self.send_error(404, "first path segment must be a server UUID")
                return
            path, headers = routed
            for name in PASSED_ON:
                if self.headers.get(name):
                    headers.setdefault(name, self.headers[name])
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            connection = http.client.HTTPConnection(upstream_host, upstream_port, timeout=60)
            try:
                connection.request(self.command, path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except OSError as error:
                self.send_error(502, f"upstream unreachable: {error}")
                return
            finally:
                connection.close()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = relay
        do_POST = relay
        do_PUT = relay
        do_DELETE = relay
        do_HEAD = relay

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["metadata", "tls"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--secret-file", help="metadata: nova's metadata_proxy_shared_secret")
    parser.add_argument("--tenant", help="metadata: the project of the servers")
    parser.add_argument("--instance", help="metadata: serve only this server, paths unchanged "
                        "(a VM's own relay, as http://169.254.169.254 is)")
    parser.add_argument("--cert", help="tls: certificate chain (PEM)")
    parser.add_argument("--key", help="tls: private key (PEM)")
    args = parser.parse_args()
    if args.role == "metadata":
        with open(args.secret_file, "rb") as f:
            route = metadata_route(f.read().strip(), args.tenant, args.instance)
    else:
        route = plain_route
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer(
        (host, int(port)), make_handler(up_host, int(up_port), route))
    server.daemon_threads = True
    if args.role == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
