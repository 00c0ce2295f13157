"""No non-finite update is ever applied: the training loop's finiteness guard.

Before every optimizer step the guard looks at the loss and the gradients' total norm (a NaN or infinite
gradient anywhere makes it non-finite). Two ways, the same contract:

* ``sync`` (CPU default): the check is read on the host at every step and the run stops *before* the bad
  update, naming the step and the term. A host read per step costs nothing on a CPU.
* ``device`` (CUDA default): the check stays on the device; a sticky flag is handed to the fused optimizer
  (``optimizer.found_inf``, the mechanism ``torch.amp.GradScaler`` uses), whose kernel skips the update on
  the device, from the first bad step on. Every ``guard_every`` steps (and at the end of each epoch) the flag
  is read and the run stops with the first bad step's number and values. The hot loop never waits on the host.

With several processes the check is OR-ed over the ranks (one tiny all-reduce, on the device), so every rank
skips or stops at the same step; DDP has already averaged the gradients, so a non-finite gradient on one rank
is non-finite on all.

Either way :class:`NonFiniteLossError` carries one line: the global step, which term (or the gradient) went
non-finite, the values of every term at that step, and what to try.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

__all__ = ["NonFiniteLossError", "NonFiniteGuard", "GUARD_MODES"]

GUARD_MODES = ("auto", "sync", "device")

_ADVICE = "no update was applied from that step on; lower the learning rate or the distillation weights, or check the input data"


class NonFiniteLossError(RuntimeError):
    """Training went non-finite; the message names the step and the term (see the module docstring)."""


class NonFiniteGuard:
    """One epoch's guard. ``keys`` are the output scalars it reports (the first is the loss, ``total``)."""

    def __init__(self, mode: str, device: torch.device, keys: Sequence[str], params: Iterable[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer,
                 any_rank: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if mode not in GUARD_MODES:
            raise ValueError(f"guard must be one of {', '.join(GUARD_MODES)}, got {mode!r}")
        self.mode = ("device" if device.type == "cuda" else "sync") if mode == "auto" else mode
        if self.mode == "device" and not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError("the device guard needs a fused optimizer (it skips updates through found_inf)")
        self.keys = list(keys)
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.any_rank = any_rank  # several processes: a 0-dim bool flag -> True on every rank if True on any
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_values = torch.zeros(len(self.keys) + 1, device=device)  # keys..., gradient norm

    def _state(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.bad.device)
        values = [out[k].detach().float().reshape(()) for k in self.keys]
        return torch.stack([*values, norm.float()])

    def before_step(self, step: int, out: Mapping[str, torch.Tensor]) -> None:
        """Call after ``backward()`` and before ``optimizer.step()``."""
        state = self._state(out)
        now_bad = ~torch.isfinite(state[0]) | ~torch.isfinite(state[-1])
        if self.any_rank is not None:
            now_bad = self.any_rank(now_bad)
        if self.mode == "sync":
            if bool(now_bad):
                raise NonFiniteLossError(self._message(step, state.tolist()))
            return
        first = now_bad & ~self.bad
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_values = torch.where(first, state, self.first_values)
        self.bad |= now_bad
        self.optimizer.grad_scale = None  # type: ignore[attr-defined]
        self.optimizer.found_inf = self.bad.float()  # type: ignore[attr-defined]

    def check(self) -> None:
        """Device mode: stop if any step so far went non-finite (one host read)."""
        if self.mode == "device" and bool(self.bad):
            raise NonFiniteLossError(self._message(int(self.first_step), self.first_values.tolist()))

    def _message(self, step: int, values: Sequence[float]) -> str:
        *terms, grad_norm = values
        named = dict(zip(self.keys, terms))
        broken = [k for k, v in named.items() if not math.isfinite(v)]
        parts = ", ".join(f"{k}={v:.4g}" for k, v in named.items())
        if broken:
            what = f"non-finite loss term {', '.join(broken)}"
        elif math.isfinite(grad_norm):  # only possible with several processes
            what = "a non-finite loss term on another process"
        else:
            what = f"non-finite gradient (total norm {grad_norm:.4g}) with finite loss terms"
        return f"training stopped at step {step + 1}: {what} ({parts}); {_ADVICE}"
