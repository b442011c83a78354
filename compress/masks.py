"""Pruning masks as training-time state.

A mask lives on the module (``module._compress_mask``, not in the state_dict). A forward pre-hook
re-applies it before every forward, the training loop zeroes masked gradients after backward (so
optimizer state of pruned weights stays zero too) and re-applies the mask after each step.
``remove_masks`` finalizes: weights keep exact zeros, no mask machinery is left behind.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

_ATTR = "_compress_mask"
_HOOK = "_compress_mask_hook"


def _pre_hook(module, inputs):
    mask = getattr(module, _ATTR, None)
    if mask is not None:
        with torch.no_grad():
            module.weight.mul_(mask)


def set_mask(module: Any, mask: torch.Tensor) -> None:
    """Attach (or replace) the mask of ``module.weight`` and zero the masked weights now."""
    mask = mask.to(dtype=module.weight.dtype, device=module.weight.device)
    if mask.shape != module.weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(module.weight.shape)}")
    setattr(module, _ATTR, mask)
    if getattr(module, _HOOK, None) is None:
        setattr(module, _HOOK, module.register_forward_pre_hook(_pre_hook))
    with torch.no_grad():
        module.weight.mul_(mask)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, _ATTR, None)


def masked_modules(model: nn.Module):
    for name, m in model.named_modules():
        if getattr(m, _ATTR, None) is not None:
            yield name, m


def has_masks(model: nn.Module) -> bool:
    return any(True for _ in masked_modules(model))


def mask_grads(model: nn.Module) -> None:
    """Zero the gradients of pruned weights (call after backward, before the optimizer step)."""
    for _, m in masked_modules(model):
        if m.weight.grad is not None:
            m.weight.grad.mul_(getattr(m, _ATTR))


def enforce(model: nn.Module) -> None:
    """Re-apply every mask (call after the optimizer step)."""
    with torch.no_grad():
        for _, m in masked_modules(model):
            m.weight.mul_(getattr(m, _ATTR))


def remove_masks(model: nn.Module) -> None:
    """Finalize: bake masks into the weights (exact zeros) and remove hooks and attributes."""
    for _, m in list(masked_modules(model)):
        with torch.no_grad():
            m.weight.mul_(getattr(m, _ATTR)).add_(0.0)  # exact zeros, and no negative zeros
        hook = getattr(m, _HOOK, None)
        if hook is not None:
            hook.remove()
        for a in (_ATTR, _HOOK):
            if a in m.__dict__:
                delattr(m, a)
