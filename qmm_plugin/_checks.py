"""Argument validators shared by the plugin's public functions.

Each raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value) with a
message that names the argument, what it means, the value given and the accepted range, so a
caller sees the fix without reading the source. Non-finite numbers (NaN, inf) are refused by every
real-number validator: a NaN compares false with every bound and would otherwise slip through
range checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["check_int", "check_real", "check_finite_state"]


def check_int(value: object, name: str, *, minimum: int = 1, meaning: str = "") -> int:
    """``value`` as an int ``>= minimum``; ``bool`` is refused (``True`` is not a count).

    Example:
        >>> check_int(3, "steps")
        3
    """
    about = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}{about} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}{about} must be an int >= {minimum}, got {value}")
    return value


def check_real(value: object, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, meaning: str = "") -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open=True``).

    Python ints and floats and 0-dim real tensors are accepted; NaN and inf are refused.

    Example:
        >>> check_real(0.5, "lr", low=0.0, low_open=True)
        0.5
    """
    about = f" ({meaning})" if meaning else ""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    wanted = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}{about} must be {wanted}, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}{about} must be {wanted}, got {number}")
    below = number <= low if (low is not None and low_open) else (low is not None and number < low)
    if below or (high is not None and number > high):
        raise ValueError(f"{name}{about} must be {wanted}, got {number:g}")
    return number


def check_finite_state(module: nn.Module, where: str) -> None:
    """Raise ``ValueError`` naming the first parameter or floating buffer of ``module`` that holds
    NaN or inf values (and how many). ``where`` names the caller in the message.

    One ``isfinite`` reduction per tensor; called before work whose result a non-finite weight
    would silently spoil (:func:`~qmm_plugin.invert`, ``tangential_spread``), not per training step.

    Example:
        >>> check_finite_state(torch.nn.Linear(2, 3), "demo")
    """
    tensors = [(f"parameter '{n}'", t) for n, t in module.named_parameters()]
    tensors += [(f"buffer '{n}'", t) for n, t in module.named_buffers() if t.is_floating_point()]
    for label, t in tensors:
        if t.device.type == "meta":
            raise ValueError(f"{where}: {label} is on the meta device (it holds no values); load or "
                             "materialise the weights (e.g. model.to_empty(device='cpu') and load_state_dict) first")
        finite = torch.isfinite(t.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"{where}: {label} holds {bad} non-finite (NaN or inf) value(s) of {t.numel()}; the model "
                "diverged or was loaded from a broken checkpoint. Reload the last good checkpoint (and "
                "train with a lower learning rate) before using it")
