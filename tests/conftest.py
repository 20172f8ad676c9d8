"""pytest configuration shared by every test package."""

import os

# the p2v CLI runs in child processes; let them import this checkout
os.environ.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
