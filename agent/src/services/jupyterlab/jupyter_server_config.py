# Written by exoagent; rewritten at every agent start (changes here do not last).
#
# JupyterLab is started with `--config=jupyter_server_config.json` (the JSON beside this file,
# 0600, owned by the instance user, written by the agent). For that argument traitlets loads
# jupyter_server_config.py (this file) first, then the JSON. On a first boot the agent starts
# JupyterLab before the JSON exists: the passphrase's argon2 hash is still being computed
# (seconds under emulation), and JupyterLab's own imports take longer than that, so this waits
# for the JSON, at most WAIT seconds, and checks it; traitlets then loads it.
#
# Fail closed: without the file, or with one that holds no password hash, JupyterLab exits here
# (SystemExit, which traitlets' config loading does not catch) instead of starting with its
# defaults (a random token nobody knows, no password). The file's contents are never printed.
import json as _json
import os as _os
import sys as _sys
import time as _time

WAIT = 120.0
_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "jupyter_server_config.json")


def _refuse(why):
    _sys.stderr.write("exoagent: not starting JupyterLab: %s\n" % why)
    _sys.stderr.flush()
    _sys.exit(78)


_start = _time.monotonic()
while True:
    try:
        with open(_path, "rb") as _f:
            _loaded = _json.load(_f)
        break
    except FileNotFoundError:
        if _time.monotonic() - _start >= WAIT:
            _refuse("%s did not appear within %d s" % (_path, WAIT))
        _time.sleep(0.05)
    except (OSError, ValueError) as _e:
        # The agent replaces the file whole (rename), so a partial file is not a state to wait out.
        _refuse("%s cannot be read as JSON (%s)" % (_path, type(_e).__name__))

_hashed = (
    _loaded.get("PasswordIdentityProvider", {}).get("hashed_password")
    if isinstance(_loaded, dict) and isinstance(_loaded.get("PasswordIdentityProvider"), dict)
    else None
)
if not isinstance(_hashed, str) or not _hashed.startswith("argon2:"):
    _refuse("%s holds no PasswordIdentityProvider.hashed_password" % _path)
_waited = _time.monotonic() - _start
if _waited >= 0.05:
    _sys.stderr.write("exoagent: waited %.1f s for %s\n" % (_waited, _path))
