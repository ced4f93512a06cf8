"""App arguments, placement and the rows_per_s metric (the policy: test_autoscaling_policy.py): no Ray
cluster needed."""

import pytest
import yaml
from pydantic import ValidationError

from moe_cluster import ModelConfig
from moe_cluster.core.placement import GroupSpec, resolve_placement
from moe_cluster.serving.args import AppArgs
from moe_cluster.serving.autoscaling import RowRate

CONFIG = ModelConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, num_layers=2)


def test_default_placement_is_one_deployment_per_expert():
    placement = resolve_placement(CONFIG)
    assert [g.name for g in placement.groups] == ["expert-0", "expert-1", "expert-2", "expert-3"]
    assert placement.group("expert-2").hosted == ((0, 2), (1, 2))


def test_packed_and_hot_groups_leave_the_rest_in_defaults():
    placement = resolve_placement(CONFIG, [GroupSpec("pack", (0, 1)), GroupSpec("hot", (3,), (1,))])
    assert [g.name for g in placement.groups] == ["pack", "hot", "expert-2", "expert-3"]
    assert placement.owner[(1, 3)] == "hot" and placement.owner[(0, 3)] == "expert-3"
    assert placement.group("pack").hosted == ((0, 0), (0, 1), (1, 0), (1, 1))


@pytest.mark.parametrize("specs, message", [
    ([GroupSpec("a", (0,)), GroupSpec("b", (0,), (1,))], "in both 'a' and 'b'"),
    ([GroupSpec("a", (9,))], "experts 0..3"),
    ([GroupSpec("a", (0,)), GroupSpec("a", (1,))], "used twice"),
    ([GroupSpec("bad name", (0,))], "bad group name"),
    ([GroupSpec("a", (0,), (5,))], "unknown layer 5"),
    ([GroupSpec("expert-1", (1,), (0,))], "taken but does not host all"),
])
def test_bad_placements_are_rejected(specs, message):
    with pytest.raises(ValueError, match=message):
        resolve_placement(CONFIG, specs)


def test_app_args_reject_unknown_fields_and_mixed_scaling():
    with pytest.raises(ValidationError, match="replica"):
        AppArgs.model_validate({"replica": 2})
    with pytest.raises(ValidationError, match="not both"):
        AppArgs.model_validate({"experts": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}})


def test_group_options_merge_defaults_key_by_key():
    args = AppArgs.model_validate({
        "transport": "by_value",  # no channels: Serve's own autoscaling policy stays (see the next test)
        "experts": {"ray_actor_options": {"num_gpus": 1, "num_cpus": 2},
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
        "placement": [{"name": "expert-0", "experts": [0], "options": {"autoscaling_config": {"max_replicas": 8}}},
                      {"name": "pinned", "experts": [1], "options": {"num_replicas": 2}}],
    })
    assert args.group_options("expert-0")["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8}
    pinned = args.group_options("pinned")
    assert pinned["num_replicas"] == 2 and "autoscaling_config" not in pinned
    assert pinned["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 2}
    assert args.group_options("expert-3")["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.parametrize("path", ["deployments/default.yaml", "deployments/gpu.yaml"])
def test_serve_config_files_hold_valid_app_args(path):
    from ray.serve.config import AutoscalingConfig

    app = yaml.safe_load(open(path))["applications"][0]
    assert app["import_path"] == "moe_cluster.serving.app:build_app"
    args = AppArgs.model_validate(app["args"])
    config = args.load_model_config()
    for group in args.resolve_placement(config).groups:
        options = args.group_options(group.name)
        if "autoscaling_config" in options:
            AutoscalingConfig(**options["autoscaling_config"])


def test_row_rate_counts_rows_in_the_window():
    rate = RowRate(window_s=2.0)
    rate.add(100, now=10.0)
    rate.add(300, now=11.0)
    assert rate.per_second(now=11.5) == 200.0
    assert rate.per_second(now=12.5) == 150.0  # the first event left the window
    assert rate.per_second(now=20.0) == 0.0


def test_autoscaling_with_channels_counts_channel_calls():
    """Channel calls never take Serve's request path, which Serve's own policy counts: an expert deployment
    that autoscales on channels gets TokenLoadPolicy (it counts them) unless its config names a policy."""
    from moe_cluster.serving.autoscaling import POLICY_PATH

    own = {"policy_function": "my.module:policy"}
    experts = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    placement = [{"name": "own", "experts": [0], "options": {"autoscaling_config": {"policy": own}}}]
    for transport, policy in (("auto", POLICY_PATH), ("channel", POLICY_PATH), ("by_value", None)):
        args = AppArgs.model_validate({"transport": transport, "experts": experts, "placement": placement})
        told = args.group_options("expert-3")["autoscaling_config"]
        assert told.get("policy", {}).get("policy_function") == policy and told["max_replicas"] == 4, transport
        assert args.group_options("own")["autoscaling_config"]["policy"] == own
    no_channel = AppArgs.model_validate({"experts": experts, "channel_max_bytes": 0})
    assert "policy" not in no_channel.group_options("expert-3")["autoscaling_config"]

