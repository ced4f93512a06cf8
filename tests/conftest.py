import os

# Local test clusters need no token auth (Ray 2.60 turns it on by default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No usage statistics posted to the internet by any cluster a test starts (moe_cluster.serving.runtime
# sets it too; this covers ray.cluster_utils.Cluster and subprocesses started by the tests).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Every socket of ours binds and connects on 127.0.0.1 in tests: every test cluster runs on this one
# machine, and Ray reports the machine's interface address (../shared/RAY-NOTES.md). An app built in a
# test process (the args are resolved there and handed to the replicas) puts its expert replicas'
# channels (AppArgs.channel_host) on loopback unless the test says otherwise; `moe-cluster serve` does so itself.
from moe_cluster.serving.args import AppArgs  # noqa: E402

AppArgs.model_fields["channel_host"].default = "127.0.0.1"
AppArgs.model_rebuild(force=True)
