#!/usr/bin/env python3
"""A stand-in for the OpenStack metadata service, for bench/idle-footprint.sh: serves one
instance's `openstack/latest/meta_data.json` (the fields Nova's document has that exoagent
reads: uuid, name, meta) on a loopback port, answers 404 to anything else, and appends one line
per request for meta_data.json to a file, so the agent's calls can be counted.

    python3 bench/metadata-standin.py PORT_FILE CALLS_FILE

It is not Nova: it does not cache (Nova's metadata API caches 15 s), sign or proxy. The
request-watching behaviour against real Nova is tested in agent/tests/openstack.rs.
"""
import http.server
import json
import sys
import time

PORT_FILE, CALLS_FILE = sys.argv[1], sys.argv[2]
DOCUMENT = json.dumps({
    "uuid": "0b9c2a1e-3f4d-4e5f-8a7b-6c5d4e3f2a1b",
    "name": "bench",
    "hostname": "bench",
    "availability_zone": "nova",
    "launch_index": 0,
    "project_id": "bench",
    "meta": {},
}).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.rstrip("/") == "/openstack/latest/meta_data.json":
            with open(CALLS_FILE, "a") as calls:
                calls.write(f"{time.time():.3f}\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(DOCUMENT)))
            self.end_headers()
            self.wfile.write(DOCUMENT)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
open(CALLS_FILE, "w").close()
with open(PORT_FILE, "w") as port:
    port.write(str(server.server_address[1]))
server.serve_forever()
