"""gunicorn entry point for Placement (tests/e2e)."""
import os
import sys

sys.argv = sys.argv[:1]
os.environ.setdefault("OS_PLACEMENT_CONFIG_DIR", os.path.join(os.environ["AX_E2E_RUN"], "etc/placement"))
from placement.wsgi.api import application  # noqa: E402,F401
