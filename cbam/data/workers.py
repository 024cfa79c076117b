"""The ``workers`` loader: a DataLoader whose worker processes cut the planned crops of uint8 images.

The sampler, not the workers, draws the epoch's plan (see :mod:`cbam.data.batches`): it hands each
worker keys ``(index, row, col, flip)``, so the batches depend on ``(seed, epoch, rank)`` alone, not on the
number of workers or on any random state, and equal the ``device`` loader's. The loader counts the
batches it hands out (the workers fetch ahead; the training loop does not), which is what a checkpoint
records to resume mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cbam.data.batches import LoaderPosition, LoaderSpec, Plan, cut, normalize, pad

#: a planned crop: (image index, row offset, column offset, mirrored)
Key = tuple[int, int, int, bool]


class PlannedCrops(Dataset):
    """uint8 NHWC images served as normalised float (3, H, W) crops, each item fetched by its key."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
    ) -> None:
        self.padded, self.labels, self.padding = pad(images, padding), labels, padding
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list[Key]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # A whole batch of keys in one gather (the DataLoader's fetcher prefers this to __getitem__).
        indices, rows, cols, flips = zip(*keys)
        plan = Plan(torch.tensor(indices), torch.tensor(rows), torch.tensor(cols), torch.tensor(flips))
        images = normalize(cut(self.padded, plan, self.padding), self.mean, self.std)
        return list(zip(images, self.labels[plan.indices]))

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([key])[0]


class PlanSampler(DistributedSampler):
    """Yields the keys of this rank's plan for the current epoch, from ``start`` on.

    A DistributedSampler only so that Lightning keeps it: under DDP it replaces any other sampler of a
    DataLoader with its own DistributedSampler, which pads the evaluation sets with repeated images.
    None of the parent's shuffling or padding is used.
    """

    def __init__(self, dataset: PlannedCrops, spec: LoaderSpec) -> None:
        super().__init__(dataset, num_replicas=spec.world_size, rank=spec.rank, shuffle=False)
        self.spec = spec
        self.total = len(dataset)
        self.position = LoaderPosition()
        self.start = 0  # the first item of the next pass, set by the loader

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def __len__(self) -> int:
        return self.spec.shard_size(self.total)

    def __iter__(self) -> Iterator[Key]:
        plan = self.spec.epoch_plan(self.total, self.position.epoch)[self.start :]
        return zip(plan.indices.tolist(), plan.rows.tolist(), plan.cols.tolist(), plan.flips.tolist())


class WorkersLoader(DataLoader):
    """A DataLoader over :class:`PlannedCrops` keyed by a :class:`PlanSampler`, resumable mid-epoch.

    Training drops the last partial batch; evaluation keeps it (short: the data module fills it up).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: LoaderSpec,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        dataset = PlannedCrops(images, labels, spec.mean, spec.std, spec.padding)
        super().__init__(
            dataset,
            batch_size=spec.batch_size,
            sampler=PlanSampler(dataset, spec),
            drop_last=spec.train,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The sampler starts where this pass starts; the workers' iterator, created below, reads it.
        position = self.sampler.position
        self.sampler.start = position.begin_pass(len(self)) * self.batch_size
        for batch in super().__iter__():
            position.batches_done += 1
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.position.load_state_dict(state)
