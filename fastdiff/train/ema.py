"""Exponential moving average of a model's weights: :class:`EMA`."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


# --------------------------------------------------------------------- EMA --
class EMA:
    """Exponential moving average of a module's floating-point parameters.

    ``model`` is a deep copy of the source module (in eval mode, no grads);
    :meth:`update` moves its parameters towards the source's:
    ``shadow = decay_k * shadow + (1 - decay_k) * param`` with
    ``decay_k = min(decay, (1 + k) / (10 + k))`` at the k-th update when
    ``warmup`` (else ``decay``), and copies buffers. One fused
    ``_foreach_lerp_`` per update; no host synchronisation.

    Args:
        source: the trained module. decay: in [0, 1). warmup: as above.
        shadow: average into this existing copy of ``source`` (same structure)
            instead of a new deep copy.
    """

    def __init__(self, source: nn.Module, decay: float = 0.999, warmup: bool = True,
                 shadow: Optional[nn.Module] = None):
        self.model = (copy.deepcopy(source) if shadow is None else shadow).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        pairs = [(s, p) for s, p in zip(self.model.parameters(), source.parameters()) if p.is_floating_point()]
        self._shadow = [s for s, _ in pairs]
        self._params = [p for _, p in pairs]
        self._buffers = list(zip(self.model.buffers(), source.buffers()))

    def current_decay(self) -> float:
        k = self.updates
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.updates += 1
        if self._shadow:
            torch._foreach_lerp_(self._shadow, [p.detach() for p in self._params], 1.0 - d)
        for b, src in self._buffers:
            b.copy_(src)

    @torch.no_grad()
    def update_with(self, weight) -> None:
        """One update with the interpolation weight ``1 - decay_k`` given as a
        0-dim tensor on the parameters' device (the compiled / CUDA-graphed
        step computes it there from a device counter, so nothing is read on
        the host): ``shadow += weight * (param - shadow)`` as three
        multi-tensor ops (``_foreach_lerp_`` takes its weight as a host
        scalar, or as one tensor per parameter). A Python number is applied
        with ``_foreach_lerp_``. Does not advance :attr:`updates` (the caller
        counts)."""
        if self._shadow:
            if isinstance(weight, torch.Tensor):
                diff = torch._foreach_sub([p.detach() for p in self._params], self._shadow)
                torch._foreach_mul_(diff, weight.to(torch.float32))
                torch._foreach_add_(self._shadow, diff)
            else:
                torch._foreach_lerp_(self._shadow, [p.detach() for p in self._params], float(weight))
        for b, src in self._buffers:
            b.copy_(src)
