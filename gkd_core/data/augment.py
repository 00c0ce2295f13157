"""Per-epoch randomness, batched augmentation and normalisation, shared by both loaders.

Every epoch's randomness (order, flips, crop offsets) is drawn up front from a CPU generator seeded by
``(seed, epoch)`` (:func:`epoch_plan`), so the epoch-k batches are a function of (seed, k) alone, identical
for both loaders, on CPU and on CUDA. Augmentation (training split only): ``x -> crop(pad_reflect(flip(x)))``,
i.e. a random horizontal flip with probability 1/2, then a random ``H x W`` crop of the image reflect-padded
by ``crop_padding`` on each side (:func:`batch_augment`, one gather for a whole batch). Normalisation:
``(x / 255 - mean) / std`` in float32 (:func:`normalise`; :class:`Normalizer` holds ``mean``/``std`` ready on
the device).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from gkd_core.data.raw import _EPOCH_STREAM


def epoch_plan(
    n: int, seed: int, epoch: int, shuffle: bool, flip: bool, crop_padding: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The randomness of one epoch, from a CPU generator seeded by ``(seed, epoch)``.

    Returns ``(order, flips, offsets)``: the sample order (int64, ``n``), per-position flip flags (bool) or
    None, per-position crop offsets ``(n, 2)`` (row, col) in ``[0, 2 * crop_padding]`` or None.
    """
    state = np.random.SeedSequence([int(seed), int(epoch), _EPOCH_STREAM]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(state))
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    flips = torch.rand(n, generator=g) < 0.5 if flip else None
    offsets = torch.randint(0, 2 * crop_padding + 1, (n, 2), generator=g) if crop_padding > 0 else None
    return order, flips, offsets


def normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in float32; ``mean``/``std`` shaped ``(1, C, 1, 1)``."""
    return (x_uint8.to(torch.float32) / 255.0 - mean) / std


class Normalizer:
    """:func:`normalise` with ``mean``/``std`` prepared once: float32, shaped ``(1, channels, 1, 1)``, on ``device``.

    ``Normalizer(mean, std, channels, device)(x_uint8)`` is ``(x_uint8 / 255 - mean) / std`` in float32 for a
    uint8 NCHW tensor on ``device``; ``mean`` and ``std`` are sequences or tensors of ``channels`` values.
    """

    def __init__(
        self,
        mean: Union[Sequence[float], torch.Tensor],
        std: Union[Sequence[float], torch.Tensor],
        channels: int,
        device: Union[str, torch.device] = "cpu",
    ):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, channels, 1, 1).to(device)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, channels, 1, 1).to(device)

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return normalise(x_uint8, self.mean, self.std)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map padded coordinates in ``[-(n-1), 2n-2]`` onto ``[0, n-1]`` like reflect padding (edge not repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def batch_augment(
    x: torch.Tensor, flips: Optional[torch.Tensor], offsets: Optional[torch.Tensor], padding: int
) -> torch.Tensor:
    """Flip, reflect-pad and crop a whole batch with one gather (any dtype, any device).

    Sample b becomes ``pad_reflect(flip_b(x[b]), padding)[:, r:r+H, c:c+W]`` with ``(r, c) = offsets[b]``
    and ``flip_b`` a horizontal flip where ``flips[b]``. The padding is never materialised: the source pixel
    of every output pixel is computed (reflected coordinates) and gathered.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(b, h)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if offsets is not None and padding > 0:
        rows = _reflect(rows + (offsets[:, 0:1] - padding), h)
        cols = _reflect(cols + (offsets[:, 1:2] - padding), w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    pix = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, pix).view(b, c, h, w)
