"""gunicorn entry point for Keystone (tests/e2e): oslo.config must not see gunicorn's argv."""
import os
import sys

sys.argv = sys.argv[:1]
os.environ.setdefault("OS_KEYSTONE_CONFIG_DIR", os.path.join(os.environ["AX_E2E_RUN"], "etc/keystone"))
from keystone.wsgi.api import application  # noqa: E402,F401
