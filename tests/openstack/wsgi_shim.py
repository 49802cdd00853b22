"""Gunicorn entry point for an OpenStack WSGI application named in EXOAGENT_WSGI_APP.

OpenStack's WSGI modules let oslo.config parse sys.argv on import; gunicorn's own arguments
would make them exit with "unrecognized arguments", so the argument list is trimmed first.
"""

import importlib
import os
import sys

sys.argv = sys.argv[:1]
_module, _attribute = os.environ["EXOAGENT_WSGI_APP"].split(":", 1)
application = getattr(importlib.import_module(_module), _attribute)
