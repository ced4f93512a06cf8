"""Checkpoint directories (config.json + safetensors, one file per expert): one reader, one writer.

    from moe_cluster.checkpoint import load_model, save_model
    save_model(MoEModel.random(config, seed=0), "ckpt")
    model = load_model("ckpt")
"""

from .format import FORMAT, CheckpointChanged, CheckpointError, expert_file
from .reader import load_config, load_digests, load_experts, load_model, load_router_layers
from .writer import CheckpointWriter, save_model

__all__ = ["FORMAT", "CheckpointChanged", "CheckpointError", "CheckpointWriter", "expert_file", "load_config",
           "load_digests", "load_experts", "load_model", "load_router_layers", "save_model"]
