import pytest

from moe_cluster import PRESETS, ModelConfig, preset_config


def test_presets_are_valid_and_shaped_as_documented():
    mini = preset_config("mixtral-mini")
    assert (mini.d_model, mini.d_ff, mini.num_experts, mini.top_k, mini.expert_kind) == (1024, 3584, 8, 2, "swiglu")
    assert mini.normalize_top_k
    tiny = PRESETS["tiny"]
    assert tiny.expert_kind == "mlp" and tiny.gate_bias and not tiny.normalize_top_k


@pytest.mark.parametrize("changes, field", [
    (dict(d_model=0), "d_model"),
    (dict(top_k=9), "top_k"),
    (dict(expert_kind="moe"), "expert_kind"),
    (dict(activation="swish"), "activation"),
    (dict(score_func="relu"), "score_func"),
    (dict(dtype="int8"), "dtype"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=4, topk_group=1, top_k=3), "top_k"),
    (dict(num_shared_experts=1), "shared_d_ff"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(num_layers=2, layer_ids=(3, 3)), "layer_ids"),
])
def test_bad_values_name_the_field(changes, field):
    base = dict(d_model=8, d_ff=16, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=f"ModelConfig.{field} must be"):
        ModelConfig(**{**base, **changes})


def test_dict_round_trip_and_unknown_fields():
    config = ModelConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, num_layers=2, layer_ids=(1, 3))
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config fields \\['hidden'\\]"):
        ModelConfig.from_dict({**config.to_dict(), "hidden": 3})


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="mixtral-mini"):
        preset_config("huge")


def test_layer_ids_name_layers():
    config = ModelConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, num_layers=2, layer_ids=(1, 3))
    assert config.layer_position(3) == 1
    with pytest.raises(ValueError, match=r"unknown layer 0: this model has MoE layers \[1, 3\]"):
        config.layer_position(0)
    with pytest.raises(ValueError, match="unknown layer 5: this model has MoE layers 0..1"):
        ModelConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, num_layers=2).layer_position(5)
