"""moe-cluster: a Mixture-of-Experts layer served as a distributed system on Ray Serve.

Packages (docs/architecture.md): `core` (the MoE math, torch only), `checkpoint`, `hf`,
`protocol` (wire formats, numpy only), `serving` (everything that imports Ray Serve) and
`tools`; `client`, `cli` and `dtypes` are the only plain modules here.

`ModelConfig`, `MoEModel`, `PRESETS` and `preset_config` are imported on first use, so that
the client and the wire formats (`moe_cluster.client`, `moe_cluster.protocol`) load without torch.
"""

__all__ = ["ModelConfig", "MoEModel", "PRESETS", "preset_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MoEModel":
        from .core.model import MoEModel

        return MoEModel
    if name in ("ModelConfig", "PRESETS", "preset_config"):
        from .core import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
