"""Placement: which deployment hosts each (layer, expert). Pure Python, no Ray.

Routing decides *which* expert a token goes to; placement decides *where* that expert
runs. The default is one deployment per expert id (`expert-0`, `expert-1`, ...) hosting
that expert for every MoE layer. Explicit groups override part of it: several experts
packed into one deployment, or one hot (layer, expert) in a deployment of its own. Every
(layer, expert) an explicit group does not claim stays in its default `expert-{e}` group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig

__all__ = ["ExpertGroup", "GroupSpec", "Placement", "resolve_placement"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class GroupSpec:
    """An explicit group from the config: `experts` for `layers` (None = every MoE layer)."""

    name: str
    experts: tuple[int, ...]
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExpertGroup:
    """One deployment's share of the model."""

    name: str
    hosted: tuple[tuple[int, int], ...]  # (layer_id, expert), sorted

    @property
    def experts(self) -> tuple[int, ...]:
        return tuple(sorted({e for _, e in self.hosted}))


@dataclass(frozen=True)
class Placement:
    groups: tuple[ExpertGroup, ...]
    owner: dict[tuple[int, int], str]  # (layer_id, expert) -> group name

    def group(self, name: str) -> ExpertGroup:
        return next(g for g in self.groups if g.name == name)

    def describe(self) -> dict[str, list[list[int]]]:
        """JSON form: {group name: [[layer, expert], ...]}."""
        return {g.name: [list(pair) for pair in g.hosted] for g in self.groups}


def resolve_placement(config: ModelConfig, specs: list[GroupSpec] | tuple[GroupSpec, ...] = ()) -> Placement:
    """Explicit groups first, then a default `expert-{e}` group for whatever is left."""
    owner: dict[tuple[int, int], str] = {}
    groups: list[ExpertGroup] = []
    for spec in specs:
        _check_spec(spec, config, {g.name for g in groups})
        layers = config.moe_layer_ids if spec.layers is None else spec.layers
        hosted = tuple(sorted((layer, expert) for layer in layers for expert in spec.experts))
        for pair in hosted:
            if pair in owner:
                raise ValueError(f"placement: (layer {pair[0]}, expert {pair[1]}) is in both '{owner[pair]}' "
                                 f"and '{spec.name}'; host each (layer, expert) once")
            owner[pair] = spec.name
        groups.append(ExpertGroup(spec.name, hosted))
    for expert in range(config.num_experts):
        left = tuple((layer, expert) for layer in config.moe_layer_ids if (layer, expert) not in owner)
        if not left:
            continue
        name = f"expert-{expert}"
        if name in {g.name for g in groups}:
            raise ValueError(f"placement: group name '{name}' is taken but does not host all of expert {expert}; "
                             "rename the group or give it every layer of that expert")
        groups.append(ExpertGroup(name, left))
        owner.update({pair: name for pair in left})
    return Placement(tuple(groups), owner)


def _check_spec(spec: GroupSpec, config: ModelConfig, taken: set[str]) -> None:
    if not _NAME.match(spec.name) or spec.name == "router":
        raise ValueError(f"placement: bad group name {spec.name!r}; use letters, digits, '-' or '_' "
                         "(not 'router')")
    if spec.name in taken:
        raise ValueError(f"placement: group name {spec.name!r} is used twice")
    if not spec.experts:
        raise ValueError(f"placement: group {spec.name!r} hosts no experts")
    bad = [e for e in spec.experts if not 0 <= e < config.num_experts]
    if bad:
        raise ValueError(f"placement: group {spec.name!r} names experts {bad}; "
                         f"this model has experts 0..{config.num_experts - 1}")
    for layer in spec.layers or ():
        config.layer_position(layer)
