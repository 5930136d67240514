"""Training samples as the shared loop (`pipelines.learning.loop`) reads them, and their augmentation.

A batch is fetched by its sample indices in one call (`__getitems__`, which PyTorch's data loader
uses when a data set has it), so a tokenizer or an image reader works on whole batches. Each
sample is augmented with its own generator, seeded by (seed, epoch, sample index): what a sample
looks like in an epoch depends neither on which process of a data-parallel run reads it, nor on
whether the run was interrupted and resumed, so neither changes the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Fetch = Callable[[list[int]], dict[str, torch.Tensor]]  # sample indices -> a batch of model inputs (and labels)
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # one batch of inputs, a generator -> augmented


class Samples(torch.utils.data.Dataset):
    """`length` samples read in batches by `fetch`; `augment` (if any) transforms `augment_key` of each sample."""

    def __init__(
        self,
        fetch: Fetch,
        length: int,
        augment: Augment | None = None,
        augment_key: str = "pixel_values",
        seed: int = 0,
    ) -> None:
        self.fetch, self.length, self.augment, self.augment_key, self.seed = fetch, length, augment, augment_key, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.fetch(list(indices))
        if self.augment is not None:
            rows = batch[self.augment_key]
            batch[self.augment_key] = torch.cat(
                [self.augment(rows[j : j + 1], self.generator(i)) for j, i in enumerate(indices)]
            )
        batch["index"] = torch.as_tensor(list(indices), dtype=torch.int64)
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def generator(self, index: int) -> torch.Generator:
        """The generator sample `index` is augmented with in the current epoch."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)


def already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The data loader's collate function for `Samples`: its batches come collated."""
    return batch


def shift_and_flip(x: torch.Tensor, gen: torch.Generator, max_shift: int, background: float) -> torch.Tensor:
    """Random shifts of up to `max_shift` pixels (the edge filled with `background`) and horizontal
    flips, per image of `x [N, C, H, W]`."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, value=background)
    shifts = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    out = torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(shifts.tolist())])
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
