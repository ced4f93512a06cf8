"""moe-cluster: a Mixture-of-Experts layer served as a distributed system on Ray Serve.

The top-level package is pure torch (it never imports Ray): the model config, routing,
dispatch/combine, experts, the in-process model and its oracle, and checkpoints.
Everything that imports Ray Serve lives in `moe_cluster.serving`.
"""

from .core.config import PRESETS, ModelConfig, preset_config
from .core.model import MoEModel

__all__ = ["ModelConfig", "MoEModel", "PRESETS", "preset_config"]
__version__ = "0.1.0"
