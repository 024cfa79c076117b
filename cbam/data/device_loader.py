"""The ``device`` loader: batches cut from uint8 images held on the training device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cbam.data.batches import LoaderPosition, LoaderSpec, cut, normalize, pad


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
        spec: LoaderSpec,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec, self.device = spec, torch.device(device)
        self.batch_size, self.padding = spec.batch_size, spec.padding
        self.images = pad(images, spec.padding).to(self.device)
        self.labels = labels.to(self.device)
        self.mean = torch.tensor(spec.mean, device=self.device)
        self.std = torch.tensor(spec.std, device=self.device)
        # Lightning calls set_epoch on a loader's ``sampler`` every epoch, and inspects ``batch_sampler``.
        self.sampler = LoaderPosition()
        self.batch_sampler = None

    def __len__(self) -> int:
        return self.spec.batches(len(self.labels))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.spec.epoch_plan(len(self.labels), self.sampler.epoch).to(self.device)
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
