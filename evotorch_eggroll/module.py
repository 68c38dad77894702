"""``ESModule``: an ``nn.Module`` wrapper that records which parameters evolution touches."""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

__all__ = ["ESModule"]


class ESModule(nn.Module):
    """Wrap a module for evolution; its forward is the wrapped module's.

    A strategy set up on an ``ESModule`` evolves ``es_parameters`` (the wrapped module's
    parameters with ``requires_grad=True``, minus frozen ones) and names them as the wrapped
    module does (``"0.weight"``, not ``"module.0.weight"``), so noise and checkpoints match
    the unwrapped model. Freezing does not change ``requires_grad``.

    Args:
        module: the model to wrap (kept as ``self.module``, not copied).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"ESModule wraps an nn.Module, got {type(module).__name__}")
        self.module = module
        self._frozen: set[str] = set()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _canonical(self, name: str) -> str:
        names = dict(self.module.named_parameters())
        if name in names:
            return name
        if name.startswith("module.") and name[len("module."):] in names:
            return name[len("module."):]
        raise KeyError(f"{name!r} is not a parameter of the wrapped module; parameters: "
                       f"{list(names)}")

    def named_es_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` pairs evolution will touch, in ``named_parameters`` order."""
        for name, p in self.module.named_parameters():
            if p.requires_grad and name not in self._frozen:
                yield name, p

    @property
    def es_parameters(self) -> list[nn.Parameter]:
        """The parameters evolution will touch."""
        return [p for _, p in self.named_es_parameters()]

    @property
    def frozen_parameters(self) -> frozenset:
        """Names of the parameters excluded with :meth:`freeze_parameter`."""
        return frozenset(self._frozen)

    def freeze_parameter(self, name: str) -> None:
        """Exclude one parameter (dotted name, with or without the ``module.`` prefix)."""
        self._frozen.add(self._canonical(name))

    def unfreeze_parameter(self, name: str) -> None:
        """Undo :meth:`freeze_parameter`."""
        self._frozen.discard(self._canonical(name))

    def extra_repr(self) -> str:
        return f"frozen={sorted(self._frozen)}" if self._frozen else ""
