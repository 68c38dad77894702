"""``batched_forward`` of a plain MLP in one kernel launch, when its factors are drawn.

RL policies are mostly ``nn.Sequential`` stacks of ``nn.Linear`` layers and elementwise
activations (or EvoTorch's ``MultiLayered`` stacks, which its network strings such as
``"Linear(obs_length, 64) >> Tanh() >> Linear(64, act_length)"`` build), a few hundred
features wide, evaluated for every environment step. When such a model's evolved
parameters are all served by the perturbation context's drawn factors (see
:meth:`PerturbationContext.cache_factors`) and no autograd graph is needed, the whole
forward runs as one launch of the drawn-MLP kernel instead of one routed op per layer and
activation: the same per-row arithmetic as the per-layer path (the outputs agree
to float32 rounding), without the per-op dispatch or the round trips between launches.
Anything else -- other module types, hooks, gradients, other dtypes, wide layers --
returns None here and takes the general routed path.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import ops
from .evolved import EvolvedSet, NoiseCoords
from .factor_cache import FactorCache

__all__ = ["argmax_rows", "try_forward"]

_ACTIVATIONS = {nn.Tanh: 1, nn.ReLU: 2, nn.Sigmoid: 3}
MAX_RANK = 16


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)
                or getattr(m, "_forward_hooks_with_kwargs", None))


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks
                or getattr(_module, "_global_backward_pre_hooks", None))


_LEAVES = (nn.Linear, nn.Identity, *_ACTIVATIONS)


def _stack_children(model: nn.Module) -> Optional[list]:
    """The modules that ``model`` calls one after the other, when it is an ``nn.Sequential``
    or an EvoTorch ``MultiLayered`` (a network string's stack; with stateless layers alone,
    which :func:`_flatten` requires, it returns its last layer's tensor) whose ``forward`` is
    not overridden; else None."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        return list(model._modules.values())
    # a model can only be a MultiLayered once EvoTorch's module has been imported
    multilayered = getattr(sys.modules.get("evotorch.neuroevolution.net.multilayered"),
                           "MultiLayered", None)
    if (multilayered is not None and isinstance(model, multilayered)
            and type(model).forward is multilayered.forward):
        stack = model._submodules
        return None if _has_hooks(stack) else list(stack)
    return None


def _flatten(model: nn.Module, out: list) -> bool:
    """Append ``model``'s leaf modules in call order; False when it is not a plain stack."""
    if _has_hooks(model):
        return False
    children = _stack_children(model)
    if children is not None:
        for child in children:
            if child is None or not _flatten(child, out):
                return False
        return True
    if isinstance(model, _LEAVES):
        out.append(model)
        return True
    return False


def plan(model: nn.Module) -> Optional[list[tuple[nn.Linear, int]]]:
    """``[(linear, activation code), ...]`` when ``model`` is a stack of ``nn.Linear``
    layers, each followed by at most one of ``nn.Tanh``/``nn.ReLU``/``nn.Sigmoid``
    (``nn.Identity`` anywhere), else None."""
    leaves: list = []
    if not _flatten(model, leaves):
        return None
    layers: list[list] = []
    for leaf in leaves:
        if isinstance(leaf, nn.Identity):
            continue
        if isinstance(leaf, nn.Linear):
            if type(leaf).forward is not nn.Linear.forward:
                return None
            layers.append([leaf, 0])
            continue
        act = _ACTIVATIONS.get(type(leaf))
        if act is None or not layers or layers[-1][1] != 0:
            return None  # a subclass, an activation first, or two in a row
        layers[-1][1] = act
    return [(lin, act) for lin, act in layers] or None


def argmax_rows(out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What :func:`try_forward` returns with ``argmax``, from a forward's outputs
    ``out (rows, ...)``: ``(indices, width)``, each row's ``torch.argmax`` over its flattened
    outputs and their count."""
    scores = out.reshape(out.shape[0], -1)
    return scores.argmax(dim=1), scores.shape[1]


def try_forward(model: nn.Module, x: torch.Tensor, member_ids: torch.Tensor,
                evolved: EvolvedSet, coords: NoiseCoords,
                cache: Optional[FactorCache], argmax: bool = False) -> Any:
    """The output of ``model(x)`` with row ``j`` perturbed as member ``member_ids[j]``,
    computed by one drawn-MLP launch, or None when this model or call does not qualify
    (also when none of its layers' parameters is evolved: the caller then reports it).
    With ``argmax``: ``(indices, width)``, the ``(rows,)`` int64 index of each row's largest
    output (as ``torch.argmax(out, dim=1)``; in the same launch for networks that run in
    registers) and the outputs per row."""
    if (cache is None or x.dim() != 2 or x.dtype != torch.float32 or coords.sigma == 0.0
            or coords.rank > MAX_RANK
            or ops.resolve_backend(coords.backend, x.device) != "triton"
            or not (x.is_cuda or ops.interpreter_active())
            or torch.compiler.is_compiling() or _global_hooks()):
        return None
    layers = plan(model)
    if layers is None:
        return None
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    kern = ops._kernels().drawn_mlp
    device, f32 = x.device, torch.float32
    by_id, blocks, base = evolved.by_id, cache.blocks, cache.indices.start
    widths = [x.shape[1]]
    specs = []
    noisy = False
    for lin, act in layers:
        w, b = lin.weight, lin.bias
        if w.dtype != f32 or w.shape[1] != widths[-1] or w.device != device:
            return None
        if grad and (w.requires_grad or (b is not None and b.requires_grad)):
            return None
        wc = bc = None
        we = by_id.get(id(w))
        if we is not None:
            block = blocks.get(id(w))
            if not we.lowrank or block is None:
                return None
            wc = (block, base)
        if b is not None:
            if b.dtype != f32 or b.device != device:
                return None
            if id(b) in by_id:
                block = blocks.get(id(b))
                if block is None:
                    return None
                bc = (block, base)
        noisy = noisy or we is not None or bc is not None
        specs.append(kern.Layer(w, b, wc, bc, act))
        widths.append(w.shape[0])
    if not noisy or not kern.fits(widths):
        return None
    tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    out = kern.drawn_mlp(x, specs, member_ids, rank=coords.rank,
                          scale=coords.lowrank_scale, bias_scale=coords.sigma,
                          antithetic=coords.antithetic, precision="tf32" if tf32 else "ieee",
                          argmax=argmax)
    return (out, widths[-1]) if argmax else out
