"""The MoE rows of every forward of one decode step, gathered into one MoE call per layer (no Ray).

    member i's forward ── rows x_TD of layer L ──► call(i, x_TD, L) ─┐ when every member still in the
    member j's forward ── rows of layer L ───────► call(j, ..., L) ──┤ step has posted (or has left):
                                                                     ▼
                          ONE moe_call(cat(x_TD of each), L) ──► each member gets its slice back

Every member goes through the MoE layers in the same order, so the rows posted at one time are of
one layer; a member whose forward ended (normally or not) `leave`s, and the others go on without it.
A failed call fails every member of that call.
"""

from __future__ import annotations

import threading

import torch

from .runner import MoECall

__all__ = ["StepGather"]


class StepGather:
    """The MoE rows of every sequence of one step: one moe_call per layer for all of them.

    `call(member, x_TD, layer)` blocks until every member still in the step has posted its rows
    (for whatever layer: they all go through the layers in the same order) or left; the thread
    that completes the set makes the calls and hands out the slices. `leave(member)` when its
    forward is over, normally or not.
    """

    def __init__(self, moe_call: MoECall, members: int) -> None:
        self.moe_call = moe_call
        self.calls = 0
        self._cv = threading.Condition()
        self._members = set(range(members))
        self._posted: dict[int, dict[int, torch.Tensor]] = {}  # layer -> member -> rows
        self._answers: dict[int, torch.Tensor | BaseException] = {}  # member -> its rows back

    def call(self, member: int, x_TD: torch.Tensor, layer: int) -> torch.Tensor:
        with self._cv:
            self._posted.setdefault(layer, {})[member] = x_TD
            ready = self._take_ready()
        self._run(ready)
        with self._cv:
            self._cv.wait_for(lambda: member in self._answers)
            answer = self._answers.pop(member)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def leave(self, member: int) -> None:
        with self._cv:
            self._members.discard(member)
            ready = self._take_ready()
        self._run(ready)

    def _take_ready(self) -> dict[int, dict[int, torch.Tensor]]:
        """Every posted layer, once each member still in the step has posted (caller holds the lock)."""
        waiting = {m for rows in self._posted.values() for m in rows}
        if not self._posted or waiting != self._members:
            return {}
        ready, self._posted = self._posted, {}
        return ready

    def _run(self, ready: dict[int, dict[int, torch.Tensor]]) -> None:
        answers: dict[int, torch.Tensor | BaseException] = {}
        for layer, rows in sorted(ready.items()):
            members = sorted(rows)
            try:
                y_TD = self.moe_call(torch.cat([rows[m] for m in members]), layer)
                pieces = torch.split(y_TD, [rows[m].shape[0] for m in members])
                answers.update(zip(members, pieces))
            except BaseException as exc:  # noqa: BLE001 - every member of the call gets the failure
                answers.update((m, exc) for m in members)
            self.calls += 1
        if answers:
            with self._cv:
                self._answers.update(answers)
                self._cv.notify_all()
