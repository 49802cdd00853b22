#!/usr/bin/env python3
"""rig.py: the real servers behind the guacd test double, for tests driven from elsewhere.

Run as root with the venv's python (after tests/guacamole/setup.sh):

    /var/tmp/exoagent-guac-venv/bin/python tests/guacamole/rig.py [--no-peer]

It reuses ``Rig`` from test_peer.py: the user ``exoguactest`` (with a fresh 11-word passphrase
that contains spaces, as Exosphere's are), a private OpenSSH sshd on a free loopback port,
TigerVNC ``Xtigervnc`` + an Xfce session as that user, and ``guacd_peer.py`` (the guacd test
double). Once everything listens it prints ONE JSON line on stdout:

    {"user", "home", "password", "ssh_port", "ssh_port_no_rsa", "vnc_port", "vnc_password",
     "peer_port", "events", "display", "tmp"}

then waits until its stdin is closed (or SIGTERM/SIGINT/SIGHUP) and tears everything down
(``Rig.teardown``: every process of the run ended, the account locked again). Files in the
user's home whose names start with ``exo browser `` (left by the browser tests) are removed at
start and at the end. Exit status: 0 after a clean teardown, 1 when setup failed (the reason on
stderr), 3 when a process of the run was still alive after the teardown.

``--no-peer`` leaves the double out (a real guacd elsewhere serves the tests): ``peer_port``
and ``events`` are then ``null``.

``--ssh-rsa`` gives the sshd an RSA host key and ``HostKeyAlgorithms +ssh-rsa``: only for guacd
1.3.0 from Debian 11, whose libssh2 (libgcrypt build) offers no other host-key algorithm that
OpenSSH >= 8.8 accepts by default (see ``Rig.sshd``). Ubuntu's guacd 1.3.0 links a libssh2 built
against OpenSSL and needs no such thing: the tests pass it only for the bullseye guacd. It also
starts a second sshd without ssh-rsa, as OpenSSH ships, whose port is ``ssh_port_no_rsa``
(``null`` otherwise): that guacd's SSH handshake fails there.

``EXOGUAC_ARTIFACTS=DIR`` keeps the servers' logs and the peer's events log there (test_peer's
behaviour). Diagnostics go to stderr; stdout carries the JSON line only.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import test_peer  # noqa: E402  (the Rig lives there; nothing in it runs on import)
from test_peer import USER, Rig  # noqa: E402

# Passphrase-like: upper-case words joined by single spaces (Exosphere's passphrases are words
# separated by spaces; Exosphere posts them to the token API without encoding the spaces).
WORDS = (
    "ACORN AMBER ANCHOR ARROW BADGE BASIN BEACON BIRCH BLADE BRICK CANDLE CANYON CEDAR CHALK "
    "CLOVER COMET CORAL CRANE DELTA DUNE EMBER FABLE FERN FLINT FROST GARNET GLACIER GROVE "
    "HARBOR HAZEL IVORY JASPER KESTREL LANTERN LEDGE MAPLE MEADOW MESA NOVA OPAL ORBIT PEBBLE "
    "PRAIRIE QUARTZ RAVEN RIDGE SABLE SPRUCE TALON THISTLE TIMBER UMBER VALLEY WILLOW ZEPHYR"
).split()
PASSPHRASE_WORDS = 11
LEFTOVER_PREFIX = "exo browser "


def err(msg: str) -> None:
    print(f"rig: {msg}", file=sys.stderr, flush=True)


def passphrase() -> str:
    return " ".join(secrets.choice(WORDS) for _ in range(PASSPHRASE_WORDS))


def remove_leftovers(home: str) -> None:
    if not home or not os.path.isdir(home):
        return
    for name in os.listdir(home):
        path = os.path.join(home, name)
        if name.startswith(LEFTOVER_PREFIX) and os.path.isfile(path):
            try:
                os.remove(path)
            except OSError as e:
                err(f"could not remove {path!r}: {e}")


class Stop(Exception):
    """A signal asked the rig to end."""


def on_signal(signum, _frame) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a not in ("--no-peer", "--ssh-rsa") for a in args):
        err(f"unknown arguments {args!r} (only --no-peer, --ssh-rsa)")
        return 1
    with_peer = "--no-peer" not in args
    if os.geteuid() != 0:
        err("must run as root (it creates a user, runs sshd and Xvnc)")
        return 1
    # Only the JSON line may reach stdout: setup's children (ssh-keygen, chpasswd, ...) inherit
    # fd 1, so point it at stderr until the line is written.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    rig = Rig()
    rig.password = passphrase()
    rig.ssh_rsa = "--ssh-rsa" in args
    status = 0
    try:
        try:
            t = time.monotonic()
            rig.user()
            remove_leftovers(rig.home)
            rig.sshd()
            # With --ssh-rsa, a second sshd as OpenSSH ships (no ssh-rsa): guacd 1.3.0 from
            # bullseye cannot do its SSH handshake there and aborts the session (the abort test).
            ssh_port_no_rsa = rig.sshd("sshd-no-rsa", ssh_rsa=False) if rig.ssh_rsa else None
            rig.desktop()
            if with_peer:
                rig.peer()
            rig.timings["setup total"] = time.monotonic() - t
        except Stop as e:
            err(f"stopped by {e} during setup")
            return 1
        except Exception as e:  # noqa: BLE001
            err(f"setup failed: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            for name in sorted(os.listdir(rig.tmp)):
                if name.endswith(".log"):
                    with open(os.path.join(rig.tmp, name), errors="replace") as f:
                        err(f"--- {name} (tail)\n{f.read()[-3000:]}")
            return 1

        info = {
            "user": USER,
            "home": rig.home,
            "password": rig.password,
            "ssh_port": rig.ssh_port,
            "ssh_port_no_rsa": ssh_port_no_rsa,
            "vnc_port": rig.vnc_port,
            "vnc_password": rig.vnc_password,
            "peer_port": rig.peer_port if with_peer else None,
            "events": rig.events if with_peer else None,
            "display": f":{rig.display}",
            "tmp": rig.tmp,
        }
        json_out.write(json.dumps(info) + "\n")
        json_out.flush()
        err("up: " + ", ".join(f"{k} {v:.2f} s" for k, v in rig.timings.items())
            + f"; sshd :{rig.ssh_port}, Xvnc :{rig.display} (rfb {rig.vnc_port}), "
            + (f"peer :{rig.peer_port}" if with_peer else "no peer"))

        try:
            while sys.stdin.buffer.read(65536):
                pass
            err("stdin closed: tearing down")
        except Stop as e:
            err(f"{e}: tearing down")
    finally:
        # A second signal during the teardown must not cut it short.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        t = time.monotonic()
        try:
            rig.teardown()
        except Exception as e:  # noqa: BLE001
            err(f"teardown failed: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            status = 3
        remove_leftovers(rig.home)
        results = [r for r in test_peer.RESULTS if r[0].startswith("teardown")]
        if results and not results[-1][1]:
            err(f"teardown: processes left running: {results[-1][3]}")
            status = 3
        err(f"torn down in {time.monotonic() - t:.2f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
