"""The ``device`` loader: batches cut from uint8 images held on the training device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from cbam.data.batches import LoaderPosition, cut, epoch_plan, normalize, pad, shard_size


class DeviceLoader:
    """Batches cut from uint8 images held on the training device, with no worker processes.

    The epoch's plan (order, crops with ``padding`` pixels of zero padding, flips) comes from ``(seed, epoch, rank)``
    (see :mod:`cbam.data.batches`), so every run with the same seed sees the same batches, on any device,
    and a resumed run picks up where it stopped. Under DDP every rank takes a disjoint, equally long shard
    of each training epoch, and a disjoint slice of the evaluation set (every image exactly once).
    Training drops the last partial batch; evaluation keeps it (short: the data module fills it up).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.batch_size, self.padding = batch_size, padding
        self.images = pad(images, padding).to(self.device)
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(mean, device=self.device)
        self.std = torch.tensor(std, device=self.device)
        # Lightning calls set_epoch on a loader's ``sampler`` every epoch, and inspects ``batch_sampler``.
        self.sampler = LoaderPosition()
        self.batch_sampler = None

    def __len__(self) -> int:
        size = shard_size(len(self.labels), train=self.train, rank=self.rank, world_size=self.world_size)
        return size // self.batch_size if self.train else -(-size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = epoch_plan(
            len(self.labels), train=self.train, seed=self.seed, epoch=self.sampler.epoch, rank=self.rank,
            world_size=self.world_size, padding=self.padding,
        ).to(self.device)  # fmt: skip
        # Lightning knows this loader's length, so it never fetches ahead: batches_done counts exactly
        # the batches trained on when a checkpoint is saved.
        position = self.sampler
        for batch in range(position.begin_pass(len(self)), len(self)):
            position.batches_done = batch + 1
            window = plan[batch * self.batch_size : (batch + 1) * self.batch_size]
            images = cut(self.images, window, self.padding)
            yield normalize(images, self.mean, self.std), self.labels[window.indices]
        position.batches_done = 0

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
