"""Supervised learning as an EGGROLL problem: minimise a loss over minibatches of a dataset."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .._validation import check_int, check_optional_int
from .baseneproblem import DeviceLike, EggrollNEProblem, NetworkLike, _mix_seed
from .forward import PopulationForward

__all__ = ["EggrollSupervisedNE"]


class EggrollSupervisedNE(EggrollNEProblem):
    """Minimise a supervised loss: fitness = mean loss over ``num_minibatches`` minibatches.

    Mirrors ``evotorch.neuroevolution.SupervisedNE`` (objective ``"min"``). Each network call
    evaluates the whole population on a minibatch: with ``common_minibatch=True`` all members
    see the same minibatches (drawn once per evaluation), otherwise every member draws its
    own. Minibatches are drawn without replacement from a seeded shuffle of the dataset
    (the incomplete tail of an epoch is skipped so that all minibatches have the same size),
    so runs are reproducible and resume exactly after pickling.

    Args:
        dataset: An indexable dataset of ``(x, y)`` pairs (e.g. ``TensorDataset``).
        network: ``nn.Module``, a callable returning one, or a network string (names from
            ``network_args``), as for :class:`EggrollNEProblem`.
        loss_func: ``loss(y_hat (B, ...), y (B, ...)) -> scalar``; or override ``_loss``.
            Evaluated for all members at once with ``torch.func.vmap`` when possible,
            otherwise member by member.
        minibatch_size: Rows per minibatch (default None: the whole dataset).
        num_minibatches: Minibatches per evaluation (default 1).
        common_minibatch: Whether all members share the minibatches (default True).
        device: Device of the network and data (default: CUDA when available).
        **kwargs: Further :class:`EggrollNEProblem` keywords (``include``, ``exclude``,
            ``seed``, ``network_args``, ``num_actors``, ...).
    """

    def __init__(
        self,
        dataset: Any,
        network: NetworkLike,
        loss_func: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        *,
        minibatch_size: Optional[int] = None,
        num_minibatches: int = 1,
        common_minibatch: bool = True,
        device: DeviceLike = None,
        **kwargs: Any,
    ) -> None:
        minibatch_size = check_optional_int("minibatch_size", minibatch_size, 1)
        num_minibatches = check_int("num_minibatches", num_minibatches, 1)
        if len(dataset) < 1:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self._loss_func = loss_func
        self._minibatch_size = None if minibatch_size is None else min(int(minibatch_size), len(dataset))
        self._num_minibatches = int(num_minibatches)
        self._common_minibatch = bool(common_minibatch)
        self._data_epoch = 0
        self._data_pos = 0
        self._perm: Optional[torch.Tensor] = None
        self._vmap_ok: Optional[bool] = None
        if loss_func is None and type(self)._loss is EggrollSupervisedNE._loss:
            raise TypeError("pass loss_func=(y_hat, y -> loss) or override _loss in a subclass")
        super().__init__("min", network, device=device, **kwargs)

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["_perm"]

    def generation_state(self) -> dict:
        """The base snapshot plus the data order's position (epoch, offset, permutation)."""
        return dict(super().generation_state(), data=(self._data_epoch, self._data_pos, self._perm))

    def restore_generation_state(self, state: dict) -> None:
        """Put back what :meth:`generation_state` took."""
        super().restore_generation_state(state)
        self._data_epoch, self._data_pos, self._perm = state["data"]

    def _loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one member on one minibatch (a scalar)."""
        raise NotImplementedError

    def loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss_func(y_hat, y)`` if given, else ``self._loss(y_hat, y)``."""
        return self._loss(y_hat, y) if self._loss_func is None else self._loss_func(y_hat, y)

    def _indices(self, size: int) -> torch.Tensor:
        n = len(self.dataset)
        if self._data_pos + size > n:
            self._data_epoch += 1
            self._data_pos = 0
            self._perm = None
        if self._perm is None:
            g = torch.Generator().manual_seed(_mix_seed(self._seed_value, self._data_epoch))
            self._perm = torch.randperm(n, generator=g)
        idx = self._perm[self._data_pos : self._data_pos + size]
        self._data_pos += size
        return idx

    def get_minibatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next minibatch ``(x, y)`` on the network's device."""
        return self._fetch(self._indices(self._batch_rows()))

    def _batch_rows(self) -> int:
        return len(self.dataset) if self._minibatch_size is None else self._minibatch_size

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``idx`` of the dataset as ``(x, y)`` on the network's device."""
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:
            batch = [t[idx] for t in tensors]
        else:
            batch = torch.utils.data.default_collate([self.dataset[i] for i in idx.tolist()])
        x, y = batch
        return x.to(self.network_device), y.to(self.network_device)

    def _member_losses(self, y_hat: torch.Tensor, y: torch.Tensor, shared_y: bool) -> torch.Tensor:
        """Loss per member: ``y_hat (K, B, ...)``, ``y (B, ...)`` or ``(K, B, ...)`` -> ``(K,)``."""
        if self._vmap_ok is not False:
            try:
                out = torch.func.vmap(self.loss, in_dims=(0, None if shared_y else 0))(y_hat, y)
                self._vmap_ok = True
                return out.reshape(-1).float()
            except Exception:
                if self._vmap_ok:
                    raise
                self._vmap_ok = False
        losses = [self.loss(y_hat[k], y if shared_y else y[k]) for k in range(y_hat.shape[0])]
        return torch.stack([torch.as_tensor(v, device=y_hat.device).reshape(()) for v in losses]).float()

    def _member_minibatches(self, forward: PopulationForward) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One minibatch per evaluated member (``common_minibatch=False``).

        Members of the population draw in id order, ``0..N-1``; when only some of them are
        evaluated here (one rank's slice of a distributed population), the others' draws
        are skipped without loading their rows, so member ``m`` sees the data it would see
        in a single-process run and every rank's data cursor ends up in the same place.
        """
        ids = forward.member_ids.tolist()
        n = forward.population_size
        if ids == list(range(n)):
            return [self.get_minibatch() for _ in ids]
        rows = self._batch_rows()
        wanted = set(ids)
        drawn = {}
        for m in range(max(n, max(ids) + 1)):
            idx = self._indices(rows)
            if m in wanted:
                drawn[m] = self._fetch(idx)
        return [drawn[m] for m in ids]

    def _evaluate_members(self, forward: PopulationForward) -> torch.Tensor:
        k = forward.num_members
        total = torch.zeros(k, dtype=torch.float32, device=forward.member_ids.device)
        for _ in range(self._num_minibatches):
            if self._common_minibatch:
                x, y = self.get_minibatch()
                losses = self._member_losses(forward.shared(x), y, shared_y=True)
            else:
                pairs = self._member_minibatches(forward)
                xs = torch.stack([p[0] for p in pairs])  # (K, B, *in)
                ys = torch.stack([p[1] for p in pairs])  # (K, B, *out)
                losses = self._member_losses(forward.per_member(xs), ys, shared_y=False)
            total += losses.to(total.device) / self._num_minibatches
        return total

