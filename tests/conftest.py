import os

# Local test clusters need no token auth (Ray 2.60 turns it on by default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
