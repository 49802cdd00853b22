#!/usr/bin/env python3
"""A test double for RStudio Server's `rserver` (which cannot be installed here).

It accepts rserver's argv as exoagent runs it (`--server-daemonize=0 --config-file=PATH`),
reads `www-address` and `www-port` from that file, and answers like rserver's HTTP front
(rstudio/rstudio `src/cpp/server/ServerBrowser.cpp`, `ServerAuthHandler.cpp`):

- `GET /auth-sign-in` -> 200 HTML for a supported browser's User-Agent, otherwise a 302 to
  `/unsupported_browser.htm`;
- `GET /` -> 302 to `/auth-sign-in`; anything else -> 404.

Like rserver (whose options are parsed with boost::program_options), an option in
`rserver.conf` that it does not know stops it at start with an error, so a misspelt key in
exoagent's file fails the sandbox test instead of passing unnoticed. The known set here is the
options exoagent may write plus the common ones of `src/cpp/server/server-options.json`.

How it differs from the real server: no sign-in (no RSA key, PAM or rsession), no CSRF
cookies, no WebSockets, `rsession.conf` is not read, it runs as any user (the real one needs
root to start sessions), and it stays in the foreground whatever `--server-daemonize` says.
"""

import http.server
import sys


def option(argv, name):
    for arg in argv:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def read_conf(path):
    conf = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                conf[key.strip()] = value.strip()
    return conf


BROWSERS = ("Chrome/", "Firefox/", "Safari/")

# rserver.conf options (rstudio/rstudio src/cpp/server/server-options.json, open-source set).
KNOWN_OPTIONS = {
    "www-address", "www-port", "www-root-path", "www-frame-origin", "www-same-site",
    "www-enable-origin-check", "www-allow-origin", "www-verify-user-agent",
    "auth-minimum-user-id", "auth-timeout-minutes", "auth-stay-signed-in-days",
    "auth-cookies-force-secure", "auth-pam-helper-path", "auth-required-user-group",
    "rsession-which-r", "rsession-ld-library-path", "server-user", "server-daemonize",
}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        agent = self.headers.get("User-Agent", "")
        if self.path.split("?")[0] == "/auth-sign-in":
            if agent.startswith("Mozilla/") and any(b in agent for b in BROWSERS):
                body = b"<html><body>Sign in to RStudio</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.redirect("/unsupported_browser.htm")
        elif self.path == "/":
            self.redirect("/auth-sign-in")
        else:
            self.send_error(404)

    def redirect(self, to):
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        sys.stderr.write("rserver-peer: " + (fmt % args) + "\n")


def main():
    argv = sys.argv[1:]
    if option(argv, "--server-daemonize") != "0":
        sys.exit("rserver-peer: expected --server-daemonize=0")
    path = option(argv, "--config-file")
    if path is None:
        sys.exit("rserver-peer: expected --config-file=PATH")
    conf = read_conf(path)
    unknown = sorted(set(conf) - KNOWN_OPTIONS)
    if unknown:
        sys.exit(f"rserver-peer: unrecognised option '{unknown[0]}' in {path}")
    address = conf.get("www-address", "0.0.0.0")
    port = int(conf.get("www-port", "8787"))
    server = http.server.ThreadingHTTPServer((address, port), Handler)
    print(f"rserver-peer: listening on {address}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
