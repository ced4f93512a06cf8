"""Run a whole Hugging Face MoE model with its MoE blocks computed elsewhere (no Ray).

    HF model directory ──> the dense model: embeddings, attention, norms, dense MLPs, LM head
                           (transformers' own modules, loaded from the safetensors files)
    every MoE block    ──> MoEBlockProxy: x [B, S, D] -> x_TD [B*S, D] -> moe_call(x_TD, layer) -> [B, S, D]
    generate           ──  transformers' own greedy `model.generate`, so the KV cache, masks and
                           stopping rules are HF's; only where the MoE blocks run changes.

`moe_call(x_TD, layer) -> y_TD` is `load_model(imported).forward` in process (the
correctness baseline) or a call to the cluster's router (`serving/runner.py`). `layer` is
the decoder layer index, as in `import-hf`.

Memory: the expert weights are never loaded. The model is built with its parameters on
the meta device (no memory), every MoE block is swapped for a proxy (its gate, experts and
shared experts go with it: they live in the MoE checkpoint), and only the remaining
parameters are read from the safetensors files, one tensor at a time. Peak memory is the
dense part of the model (Mixtral-8x7B: 1.6 of 46.7 B parameters).

The proxy returns a tensor, which is what every supported family's decoder layer expects
from its MoE block in transformers 5 (4.x blocks returned `(hidden, router_logits)`; the
pyproject pins transformers>=5). Router logits are not recorded (`output_router_logits`
needs the gates, which live in the cluster): the runner is for inference.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.config import ModelConfig
from ..dtypes import DTYPE_NAMES
from ..protocol.bodies import check_generate_request
from ..protocol.limits import TextLimits
from .families import family_for, moe_layer_ids
from .safetensors_reader import HFCheckpoint, read_hf_config
from ..checkpoint import load_config, load_model, load_router_layers

__all__ = ["MoECall", "MOE_CALL_OVERRIDE", "MoEBlockProxy", "HFMoERunner", "load_dense_model", "load_compatible_moe",
           "dense_dtype", "check_compatible"]

# (x_TD, decoder layer) -> y_TD: rows on the runner's device in, the same device and x's dtype out
MoECall = Callable[[torch.Tensor, int], torch.Tensor]
RUNNER_DTYPES = ("auto", *DTYPE_NAMES)  # auto: bfloat16 on a GPU, else the dtype of the model's config.json


# --- per-token accounting ----------------------------------------------------------------

@dataclass
class _Step:
    """One forward pass of the whole model (one generated token): where its time went."""

    forward_ms: float = 0.0  # the model's forward, MoE calls included
    moe_ms: float = 0.0  # inside moe_call (in serve mode: router round trips)
    moe_calls: int = 0
    token_ms: float = 0.0  # end of the previous forward (or the start of generate) -> end of this one


@dataclass
class _Recorder:
    steps: list[_Step] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    last_end: float = 0.0
    forward_start: float = 0.0


# Set by HFMoERunner.generate for the thread that runs it, so concurrent generate calls
# (threads of one serving replica) keep their accounting apart.
_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("moe_runner_recorder", default=None)


# Set by the decode loop (engine/scheduler.py) in the thread of a step's forward: that forward's MoE
# blocks call it instead of their own moe_call (the loop's moe_call, counted; zeros while it measures
# the KV bytes of one position).
MOE_CALL_OVERRIDE: contextvars.ContextVar[MoECall | None] = contextvars.ContextVar("moe_call_override",
                                                                                   default=None)


def _before_forward(module: nn.Module, args: tuple) -> None:
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.steps.append(_Step())
        recorder.forward_start = time.perf_counter()


def _after_forward(module: nn.Module, args: tuple, output: object) -> None:
    recorder = _RECORDER.get()
    if recorder is not None:
        now = time.perf_counter()
        step = recorder.steps[-1]
        step.forward_ms = (now - recorder.forward_start) * 1e3
        step.token_ms = (now - (recorder.last_end or recorder.started)) * 1e3
        recorder.last_end = now


class MoEBlockProxy(nn.Module):
    """Stands in for the MoE block of decoder layer `layer_id`: hidden states [B, S, D] go to
    `moe_call` as [B*S, D] rows (on the runner's device) and come back in the same shape and dtype."""

    def __init__(self, layer_id: int, moe_call: MoECall) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.moe_call = moe_call

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, S, D = hidden_states.shape
        started = time.perf_counter()
        moe_call = MOE_CALL_OVERRIDE.get() or self.moe_call  # the decode loop's, in its steps
        y_TD = moe_call(hidden_states.reshape(B * S, D).contiguous(), self.layer_id)
        recorder = _RECORDER.get()
        if recorder is not None and recorder.steps:
            recorder.steps[-1].moe_ms += (time.perf_counter() - started) * 1e3
            recorder.steps[-1].moe_calls += 1
        return y_TD.to(hidden_states.dtype).reshape(B, S, D)

    def extra_repr(self) -> str:
        return f"layer={self.layer_id}"


# --- loading the dense model ---------------------------------------------------------------

@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init work);
    buffers stay real, since some are computed in __init__ and never saved (rotary inv_freq).
    (What accelerate's init_empty_weights does; it patches nn.Module for every thread, so build
    nothing else meanwhile.)"""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def dense_dtype(dtype: str, device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the dense model: `dtype` by name; "auto" is bfloat16 on a GPU (what its tensor cores
    are fast in, half the memory of float32) and config.json's dtype (`config_dtype`, float32 if unset)
    on the CPU, where bfloat16 matmuls are slow on most processors."""
    if dtype not in RUNNER_DTYPES:
        raise ValueError(f"dtype must be one of {RUNNER_DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return config_dtype or torch.float32


def load_dense_model(hf_dir: str | Path, moe_call: MoECall, dtype: str = "auto",
                     device: torch.device | str = "cpu") -> tuple[nn.Module, list[int]]:
    """(the HF causal LM of `hf_dir` with every MoE block replaced by a proxy, its MoE layer ids).

    Only the dense parameters are read, in `dtype` (see dense_dtype), onto `device`.
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("the runner needs transformers: pip install -e '.[hf]'") from None
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    family = family_for(hf_config)
    layer_ids = moe_layer_ids(hf_config)
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    device = torch.device(device)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dense_dtype(dtype, device, config.dtype))
    layers = model.model.layers
    for i, layer in enumerate(layers):
        name = next((n for n in family.block_names if hasattr(layer, n)), None)
        is_moe = name is not None and hasattr(getattr(layer, name), "experts")
        if is_moe != (i in layer_ids):
            raise ValueError(f"decoder layer {i} of {hf_dir} is {'an MoE' if is_moe else 'a dense'} layer in "
                             f"transformers {transformers.__version__}, but config.json says otherwise: "
                             "the config and the installed transformers disagree")
        if is_moe:
            setattr(layer, name, MoEBlockProxy(i, moe_call))
    _load_parameters(model, hf_dir, hf_config, device)
    model.to(device)  # the buffers (rotary inv_freq, computed in __init__); the parameters are there already
    model.register_forward_pre_hook(_before_forward)
    model.register_forward_hook(_after_forward)
    generation = hf_dir / "generation_config.json"
    if generation.is_file():  # what from_pretrained would use (eos ids, ...)
        model.generation_config = transformers.GenerationConfig.from_pretrained(hf_dir)
    return model.eval(), layer_ids


def _load_parameters(model: nn.Module, hf_dir: Path, hf_config: dict, device: torch.device) -> None:
    """Read every parameter still on meta from the checkpoint onto `device`, one tensor at a time (names
    on disk are the module names: only MoE blocks are renamed by transformers' loader, and those are
    proxies now)."""
    placeholders = dict(model.named_parameters())  # on meta; by identity, as `device` may be meta too
    with HFCheckpoint(hf_dir, hf_config) as ckpt:
        for name, param in placeholders.items():
            if name not in ckpt:
                continue  # a tied weight (lm_head) saved once, tied below; else reported below
            module_name, _, attr = name.rpartition(".")
            tensor = ckpt.get(name)
            if list(tensor.shape) != list(param.shape):
                raise ValueError(f"{name} has shape {list(tensor.shape)} in {hf_dir}, the model expects "
                                 f"{list(param.shape)}: the checkpoint does not match its config.json")
            module = model.get_submodule(module_name)
            module._parameters[attr] = nn.Parameter(tensor.to(device, param.dtype), requires_grad=False)
    model.tie_weights()  # lm_head = embed_tokens where tie_word_embeddings
    missing = [name for name, param in model.named_parameters() if param is placeholders.get(name)]
    if missing:
        raise ValueError(f"{hf_dir} lacks {len(missing)} dense tensors the model needs, e.g. {missing[:3]}: "
                         "are all shards there?")


def load_compatible_moe(hf_dir: str | Path, checkpoint: str | Path, device: torch.device | str) -> nn.Module:
    """The MoE checkpoint's model on `device`, after check_compatible: its MoE blocks for hf_dir's dense model."""
    moe = load_model(checkpoint)
    check_compatible(hf_dir, moe.config, checkpoint)
    return moe.to(device)


def check_compatible(hf_dir: str | Path, moe: ModelConfig, checkpoint: str | Path | None = None) -> None:
    """ValueError unless the MoE checkpoint `moe` was imported from a model shaped like hf_dir's; given the
    checkpoint's directory, also unless every MoE gate equals hf_dir's: the same shapes do not make the
    same model, and another model's experts behind this model's dense layers would answer nonsense."""
    hf_config = read_hf_config(Path(hf_dir))
    layers, d_model = tuple(moe_layer_ids(hf_config)), int(hf_config["hidden_size"])
    if moe.moe_layer_ids != layers or moe.d_model != d_model:
        raise ValueError(f"the MoE checkpoint (layers {list(moe.moe_layer_ids)}, D={moe.d_model}) does not match "
                         f"{hf_dir} (MoE layers {list(layers)}, D={d_model}): serve the checkpoint that "
                         f"`moe-cluster import-hf {hf_dir} DST` wrote")
    if checkpoint is not None:
        _check_same_gates(Path(hf_dir), hf_config, Path(checkpoint), layers)


def _check_same_gates(hf_dir: Path, hf_config: dict, checkpoint: Path, layer_ids: tuple[int, ...]) -> None:
    """ValueError naming both directories unless each MoE layer's gate in `checkpoint` equals hf_dir's (the
    importer keeps the stored values, or makes them float32: compared in float32, exactly). Reads the
    checkpoint's router file (gates, and shared experts where the model has them) and hf_dir's gates."""
    from .importer import _block_prefix  # how the importer finds a layer's MoE block

    ours = load_router_layers(checkpoint, load_config(checkpoint))
    with HFCheckpoint(hf_dir, hf_config) as hf:
        family = family_for(hf_config)
        for layer_id, parts in zip(layer_ids, ours):
            hf_key = f"{_block_prefix(hf, family, layer_id)}.gate.weight"
            if not torch.equal(hf.get(hf_key).float(), parts.gate.weight_ED.float()):
                raise ValueError(f"the MoE checkpoint {checkpoint} was not imported from {hf_dir}: the gate of MoE "
                                 f"layer {layer_id} differs from {hf_key} there (another model, or a checkpoint "
                                 f"rewritten since). Serve {hf_dir} with the checkpoint that `moe-cluster import-hf "
                                 f"{hf_dir} DST` wrote, or import it again")


# --- the runner ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateLimits:
    max_input_tokens: int = 4096  # batch x prompt length
    max_new_tokens: int = 256


class HFMoERunner:
    """The dense model of a Hugging Face MoE checkpoint on `device`, plus a `moe_call` for its MoE blocks
    that takes and returns rows on that device. The serving deployments pass the device Ray gave their
    replica (serving/runtime.py pick_device); without one, the CPU."""

    def __init__(self, hf_dir: str | Path, moe_call: MoECall, dtype: str = "auto",
                 limits: GenerateLimits = GenerateLimits(), device: torch.device | str = "cpu") -> None:
        self.hf_dir = Path(hf_dir)
        self.moe_call = moe_call
        self.device = torch.device(device)
        self.model, self.moe_layer_ids = load_dense_model(hf_dir, moe_call, dtype, self.device)
        self.limits = limits
        self.vocab_size = int(self.model.config.vocab_size)
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def in_process(cls, hf_dir: str | Path, checkpoint: str | Path, device: torch.device | str = "cpu",
                   **kwargs) -> "HFMoERunner":
        """The correctness baseline: MoE blocks computed by `load_model(checkpoint)` in this process, on the
        dense model's `device` (the whole model on one device: the experts must fit there too)."""
        return cls(hf_dir, load_compatible_moe(hf_dir, checkpoint, device).forward, device=device, **kwargs)

    def info(self) -> dict:
        config = self.model.config
        dense = sum(p.numel() for p in self.model.parameters())
        return {"hf_model": str(self.hf_dir), "model_type": config.model_type, "vocab_size": self.vocab_size,
                "num_hidden_layers": config.num_hidden_layers, "moe_layers": list(self.moe_layer_ids),
                "dense_parameters": dense, "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "device": str(self.device),
                "max_input_tokens": self.limits.max_input_tokens, "max_new_tokens": self.limits.max_new_tokens}

    def generate(self, input_ids: object, max_new_tokens: object = 16) -> dict:
        """Greedy generation: {"output_ids": [[prompt + new tokens]], "timings": {...}}.

        `input_ids` is a batch [B][S] of token ids (no padding: every row the same length).
        output_ids are what transformers' `model.generate(..., do_sample=False)` returns:
        the prompt followed by up to max_new_tokens tokens (fewer where every row hit EOS).
        Bad input raises WireError (a ValueError), status 400, saying what is wrong.
        """
        ids_BS, new_tokens = self.check_request(input_ids, max_new_tokens)
        ids_BS = ids_BS.to(self.device)
        recorder = _Recorder()
        token = _RECORDER.set(recorder)
        try:
            with torch.no_grad():
                out_BL = self.model.generate(input_ids=ids_BS, attention_mask=torch.ones_like(ids_BS),
                                             max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        finally:
            _RECORDER.reset(token)
        total_ms = (time.perf_counter() - recorder.started) * 1e3
        return {"output_ids": out_BL.tolist(), "timings": _timings(recorder.steps, total_ms, ids_BS.shape)}

    def check_request(self, input_ids: object, max_new_tokens: object) -> tuple[torch.Tensor, int]:
        """(ids [B, S] int64, max_new_tokens), or WireError 400 saying what is wrong: the serving layer's
        check of /v1/generate (protocol/bodies.py), so a library caller gets the same answer."""
        limits = TextLimits(self.limits.max_input_tokens, self.limits.max_new_tokens, self.max_positions)
        ids, new = check_generate_request(input_ids, max_new_tokens, self.vocab_size, limits)
        return torch.tensor(ids, dtype=torch.long), new


def _timings(steps: list[_Step], total_ms: float, shape: torch.Size) -> dict:
    """Per generated token (one forward each): total, dense = forward - MoE, MoE calls, overhead =
    the rest (generate's own work: logits processing, token choice, cache bookkeeping).
    Token 0 includes the prompt's prefill; the means cover tokens 1.. (decode)."""
    per_token = [{"ms": round(s.token_ms, 3), "dense_ms": round(s.forward_ms - s.moe_ms, 3),
                  "moe_ms": round(s.moe_ms, 3), "moe_calls": s.moe_calls,
                  "overhead_ms": round(s.token_ms - s.forward_ms, 3)} for s in steps]
    decode = per_token[1:]

    def mean(key: str) -> float | None:
        return round(sum(t[key] for t in decode) / len(decode), 3) if decode else None

    return {"batch": int(shape[0]), "prompt_tokens": int(shape[1]), "new_tokens": len(steps),
            "total_ms": round(total_ms, 3), "first_token_ms": per_token[0]["ms"] if per_token else None,
            "decode_ms_per_token": mean("ms"), "dense_ms_per_token": mean("dense_ms"),
            "moe_ms_per_token": mean("moe_ms"), "moe_calls_per_token": mean("moe_calls"),
            "overhead_ms_per_token": mean("overhead_ms"), "per_token": per_token}
