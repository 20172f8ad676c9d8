"""pytest configuration shared by every test package."""

import os

from hypothesis import HealthCheck, settings

# the p2v CLI runs in child processes; let them import this checkout
os.environ.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# a loaded machine makes examples slower, never wrong: no per-example deadline and no
# too-slow health check where a test does not set its own
settings.register_profile("p2v", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("p2v")
