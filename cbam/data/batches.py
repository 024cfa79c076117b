"""What both loaders share: which images an epoch visits, how each is cropped and flipped, and where a
loader stands in its epoch.

An epoch's plan (image order, crop offsets and flips) is drawn on the CPU from ``(seed, epoch, rank)``
alone, never from the global random state, so the ``device`` and the ``workers`` loaders cut the same
batches for the same seed, whatever the device or the number of worker processes, and a resumed run can
skip exactly the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: the label of the rows that fill up a short evaluation batch (:func:`fill_batch`): cross-entropy's
#: ``ignore_index``, left out by the module's loss and metrics and by the callbacks
IGNORED_LABEL = -100


def default_padding(image_size: Sequence[int]) -> int:
    """Zero padding around each image before its random crop: 1/8 of its shorter side (4 px at 32x32, the
    usual CIFAR augmentation)."""
    return min(image_size) // 8


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW (channels_last in memory), scaled to [0, 1] and standardised with the
    per-channel ``mean`` and ``std`` (tensors on the images' device: making them here would be a blocking
    host-to-device copy, which a per-batch caller should not pay)."""
    return ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2)


def pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    """uint8 NHWC images with ``padding`` zero pixels on every side: a crop is then a plain gather."""
    return torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))


def fill_batch(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch filled up to ``batch_size`` rows with zero images labelled ``IGNORED_LABEL``, in the images'
    own memory layout (a full batch is returned as it is).

    Every evaluation batch then has one shape and one layout: a compiled network is not recompiled, nor
    its CUDA graphs recaptured, for the last batch. The network runs in eval mode there, where no row
    affects another, so the real rows' outputs do not change.
    """
    missing = batch_size - len(labels)
    if missing <= 0:
        return images, labels
    after_last_row = (0, 0) * (images.dim() - 1) + (0, missing)  # pad lists the last dimension first
    pad_rows = torch.nn.functional.pad
    return pad_rows(images, after_last_row), pad_rows(labels, (0, missing), value=IGNORED_LABEL)


@dataclass
class Plan:
    """Images to visit, in order, with the top-left corner of each one's crop in its padded copy and
    whether it is mirrored. All four are 1-d tensors of one length."""

    indices: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    flips: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, window: slice) -> Plan:
        return Plan(self.indices[window], self.rows[window], self.cols[window], self.flips[window])

    def to(self, device: torch.device) -> Plan:
        return Plan(*(t.to(device) for t in (self.indices, self.rows, self.cols, self.flips)))


def shard_size(total: int, *, train: bool, rank: int, world_size: int) -> int:
    """Images one rank visits per epoch: training shards are equally long (the remainder is left out, as
    every rank must take the same number of steps); evaluation shards cover every image exactly once."""
    return total // world_size if train else len(range(rank, total, world_size))


def epoch_plan(
    total: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int, padding: int
) -> Plan:
    """This rank's plan for an epoch over ``total`` images padded by ``padding`` pixels.

    Training: a permutation shared by all ranks (from ``seed`` and ``epoch``), dealt out round-robin, and
    per-image crops and flips from a generator of this rank's own. Evaluation: every ``world_size``-th
    image from ``rank`` on, centred and unflipped, so the ranks' shards are disjoint and complete.
    """
    size = shard_size(total, train=train, rank=rank, world_size=world_size)
    if not train:
        centred = torch.full((size,), padding, dtype=torch.long)
        unflipped = torch.zeros(size, dtype=torch.bool)
        return Plan(torch.arange(rank, total, world_size), centred, centred.clone(), unflipped)
    epoch_seed = seed * 1_000_003 + epoch
    order = torch.randperm(total, generator=torch.Generator().manual_seed(epoch_seed))
    own = torch.Generator().manual_seed(epoch_seed * 8191 + rank)
    rows = torch.randint(0, 2 * padding + 1, (size,), generator=own)
    cols = torch.randint(0, 2 * padding + 1, (size,), generator=own)
    flips = torch.rand(size, generator=own) < 0.5
    return Plan(order[rank::world_size][:size], rows, cols, flips)


def cut(padded: torch.Tensor, plan: Plan, padding: int) -> torch.Tensor:
    """The planned crops of uint8 NHWC images padded by ``padding``, as uint8 (len(plan), H, W, 3), the
    images' own size: one gather."""
    height, width = padded.shape[1] - 2 * padding, padded.shape[2] - 2 * padding
    rows = plan.rows[:, None] + torch.arange(height, device=padded.device)  # (B, H)
    across = torch.arange(width, device=padded.device)
    # A flip reads the columns of the crop right to left.
    cols = plan.cols[:, None] + torch.where(plan.flips[:, None], width - 1 - across, across)
    return padded[plan.indices[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclass(frozen=True)
class LoaderSpec:
    """What both loaders are built from: batches of ``batch_size`` (training drops the last partial one),
    normalised by the per-channel ``mean`` and ``std``, cropped with ``padding`` pixels of zero padding;
    the epoch's plan from ``seed``; this process's shard ``rank`` of ``world_size``."""

    batch_size: int
    train: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def shard_size(self, total: int) -> int:
        return shard_size(total, train=self.train, rank=self.rank, world_size=self.world_size)

    def batches(self, total: int) -> int:
        """Batches per epoch over ``total`` images."""
        size = self.shard_size(total)
        return size // self.batch_size if self.train else -(-size // self.batch_size)

    def epoch_plan(self, total: int, epoch: int) -> Plan:
        return epoch_plan(
            total, train=self.train, seed=self.seed, epoch=epoch, rank=self.rank,
            world_size=self.world_size, padding=self.padding,
        )  # fmt: skip


class LoaderPosition:
    """The epoch a training loader is in and how many of its batches it has handed out: all a checkpoint
    needs to resume it exactly, since the epoch's plan follows from the seed and the epoch.

    Lightning calls ``set_epoch`` before each epoch. A pass over the epoch starts at its first batch,
    unless it is the first pass over the epoch a loaded state was saved in: that one skips the batches
    already trained on.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_done = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches_done) of a loaded state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def begin_pass(self, num_batches: int) -> int:
        """The batch this pass starts at (0, or the resume point)."""
        start, resume, self._resume = 0, self._resume, None
        if resume is not None and resume[0] == self.epoch:
            start = min(resume[1], num_batches)
        self.batches_done = start
        return start

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self._resume = (state["epoch"], state["batches_done"])
