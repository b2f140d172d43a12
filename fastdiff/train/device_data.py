"""Training data that never leaves the device, and the random flips.

:class:`DeviceData` holds an in-memory dataset on the training device (a
GPU, or the CPU itself) so that a batch is one gather on the device: the
host only computes the batch's indices (the seeded stream, a few us) and
copies them over, non-blocking. 8-bit image data (values exactly k/127.5 - 1:
CIFAR-10, image folders) is stored as uint8 -- CIFAR-10 is 150 MB instead of
600 MB -- and converted on the device with the same float32 operations the
loaders use, so the batches are bitwise those of the float path.

:func:`flip_mask` / :func:`apply_flips`: the random horizontal flip of the
DDPM CIFAR-10 recipe, one bit per sample drawn from a host generator seeded
with (seed, step, rank): a pure function of the step, so resume is exact and
every data path (device-resident, host-gathered, DataLoader) flips alike.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

AUTO_FRACTION = 0.25  # device_data="auto": at most this share of the GPU's memory


def _as_uint8(data: Tensor) -> Optional[Tensor]:
    """data (float32 in [-1, 1]) as uint8 k with k / 127.5 - 1 == data
    bitwise, or None if the data are not 8-bit images."""
    if data.dim() != 4 or data.dtype != torch.float32:
        return None
    q = ((data + 1.0) * 127.5).round_()
    if bool((q < 0).any()) or bool((q > 255).any()):
        return None
    if not torch.equal(q.div(127.5).sub_(1.0), data):
        return None
    return q.to(torch.uint8)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """``device_data="auto"``: always on a CPU; on a GPU when ``nbytes`` is at
    most :data:`AUTO_FRACTION` of its total memory."""
    if device.type != "cuda":
        return True
    return nbytes <= AUTO_FRACTION * torch.cuda.get_device_properties(device).total_memory


class DeviceData:
    """An in-memory dataset (float32 (N, *sample_shape)) on ``device``.

    ``batch(indices)`` gathers the samples of int64 host ``indices`` on the
    device and returns float32 (B, *sample_shape) (channels_last for 4-D data
    when ``channels_last``). ``nbytes`` is the device storage; ``uint8`` says
    whether the data were stored as 8-bit.
    """

    def __init__(self, data: Tensor, device, *, channels_last: bool = False):
        device = torch.device(device)
        q = _as_uint8(data)
        self.uint8 = q is not None
        store = q if self.uint8 else data
        self.data = store.contiguous().to(device)  # rows contiguous: the gather copies whole samples
        self.device = device
        self.channels_last = channels_last and store.dim() == 4
        self.nbytes = self.data.numel() * self.data.element_size()
        self._pin = device.type == "cuda"

    def batch(self, indices: Tensor) -> Tensor:
        idx = indices.to(torch.int64)
        if self._pin:
            idx = idx.pin_memory()
        x = self.data.index_select(0, idx.to(self.device, non_blocking=True))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.uint8:
            # as the loaders convert (data.py), in the layout the model wants (one pass)
            return x.to(torch.float32, memory_format=fmt).div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=fmt)


def flip_mask(seed: int, step: int, rank: int, n: int) -> Tensor:
    """bool (n,) on the host: which samples of ``step`` (on ``rank``) are
    flipped; each with probability 1/2, a pure function of the arguments."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + rank * 7919 + step * 104_729 + 0xF11B) % (2**63 - 1))
    return torch.rand(n, generator=g) < 0.5


def apply_flips(x: Tensor, mask: Tensor) -> Tensor:
    """x (N, C, H, W) with the samples where ``mask`` (bool (N,), host or
    device) is set mirrored left-right; on x's device, layout kept."""
    if x.dim() != 4:
        raise ValueError(f"random_flip needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
    m = mask
    if m.device != x.device:
        m = (m.pin_memory() if x.device.type == "cuda" else m).to(x.device, non_blocking=True)
    return torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
