import os

# Local test clusters need no token auth (Ray 2.60 turns it on by default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No usage statistics posted to the internet by any cluster a test starts (moe_cluster.serving.runtime
# sets it too; this covers ray.cluster_utils.Cluster and subprocesses started by the tests).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
