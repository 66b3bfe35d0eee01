"""gunicorn entry point for nova-api (tests/e2e); the paste config is the first of OS_NOVA_CONFIG_FILES."""
import os
import sys

sys.argv = sys.argv[:1]
os.environ.setdefault("OS_NOVA_CONFIG_DIR", os.path.join(os.environ["AX_E2E_RUN"], "etc/nova"))
from nova.wsgi.osapi_compute import application  # noqa: E402,F401
