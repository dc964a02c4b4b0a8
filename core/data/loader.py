"""Deterministic, resumable data feeding for an iteration-based trainer.

The batch of iteration ``i`` is a pure function of ``(n, batch_size, seed, i)``: the sample stream is
the concatenation of per-epoch permutations ``default_rng([seed, epoch]).permutation(n)`` and every
sample carries its own augmentation seed. Resuming at iteration k therefore needs no saved sampler
state and reproduces exactly what an uninterrupted run would have fed, with any number of workers.

Under DDP (`world_size` > 1) ``batch_size`` stays the global batch and rank r reads the contiguous
slice ``[r * b, (r + 1) * b)`` of it (b = batch_size / world_size): the union over the ranks of
iteration i is exactly the batch a 1-process run reads, augmentation seeds included.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.data.coco import load_image
from core.data.transforms import ViewSettings, View, make_views
from core.data.types import DetectionDataset
from core.errors import BenchError


@lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def _aug_seed(seed: int, sample: int) -> int:
    """A 63-bit augmentation seed per global sample number, independent across samples."""
    a, b = np.random.SeedSequence([seed, sample]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


def sample_indices(n: int, batch_size: int, seed: int, iteration: int) -> list[tuple[int, int]]:
    """Batch of ``iteration`` as (dataset index, augmentation seed) pairs; sample s = it*bs + j."""
    if n <= 0:
        raise BenchError("cannot sample from an empty data set; check the split (no images selected)")
    if batch_size <= 0 or iteration < 0:
        raise BenchError(f"batch size {batch_size} must be > 0 and iteration {iteration} >= 0; fix the config")
    out = []
    for j in range(batch_size):
        s = iteration * batch_size + j
        epoch, pos = divmod(s, n)
        out.append((int(_epoch_permutation(n, seed, epoch)[pos]), _aug_seed(seed, s)))
    return out


class ViewDataset(Dataset):
    """Loads image ``index`` and builds its views with ``default_rng(aug_seed)``."""

    def __init__(self, dataset: DetectionDataset, aug_cfg: ViewSettings, views: tuple[str, ...] = ("weak", "strong")):
        self.dataset = dataset
        self.aug_cfg = aug_cfg
        self.views = tuple(views)

    def __len__(self) -> int:
        return len(self.dataset.records)

    def __getitem__(self, key) -> dict:
        index, aug_seed = key if isinstance(key, tuple) else (key, 0)
        record = self.dataset.records[index]
        image = load_image(record.file)
        views = make_views(image, record, np.random.default_rng(aug_seed), self.aug_cfg, self.views)
        return {"image_id": int(record.id), "views": views, "record": record}


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s part of a global batch: a contiguous slice of batch_size / world_size items."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise BenchError(f"rank {rank} of {world_size} processes is out of range; check RANK and WORLD_SIZE")
    if batch_size % world_size:
        raise BenchError(f"the global batch of {batch_size} images is not divisible by {world_size} processes; "
                         f"set the batch size to a multiple of {world_size}")
    b = batch_size // world_size
    return slice(rank * b, (rank + 1) * b)


class IterationBatchSampler(Sampler):
    """Yields ``sample_indices`` for iterations ``start_iter .. max_iter-1`` (this rank's slice)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_iter: int, max_iter: int,
                 rank: int = 0, world_size: int = 1):
        if start_iter < 0 or max_iter < start_iter:
            raise BenchError(f"iteration range {start_iter}..{max_iter} is empty or negative; "
                             "check start/max iteration (resume point beyond max_iter?)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_iter, self.max_iter = start_iter, max_iter
        self.part = rank_slice(batch_size, rank, world_size) if world_size > 1 else None

    def __iter__(self):
        for it in range(self.start_iter, self.max_iter):
            batch = sample_indices(self.n, self.batch_size, self.seed, it)
            yield batch if self.part is None else batch[self.part]

    def __len__(self) -> int:
        return self.max_iter - self.start_iter


def list_collate(items: list[dict]) -> list[dict]:
    """Keep the batch as a list: the model pads/batches variable-size images itself."""
    return items


def make_loader(dataset: DetectionDataset, aug_cfg: ViewSettings, views: tuple[str, ...], batch_size: int,
                seed: int, start_iter: int, max_iter: int, num_workers: int = 0,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """DataLoader over iterations ``start_iter..max_iter-1`` (one batch per iteration; under DDP
    this rank's slice of the global ``batch_size``)."""
    sampler = IterationBatchSampler(len(dataset.records), batch_size, seed, start_iter, max_iter, rank, world_size)
    return DataLoader(ViewDataset(dataset, aug_cfg, views), batch_sampler=sampler, collate_fn=list_collate,
                      num_workers=num_workers, persistent_workers=False, pin_memory=False,
                      # its own generator: creating the iterator must not draw from the global torch
                      # RNG, or a resumed run (iterator created at iteration k) diverges.
                      generator=torch.Generator().manual_seed(seed))


def collate_views(items: list[dict], view: str) -> tuple[list[torch.Tensor], list[dict]]:
    """Images and targets {"boxes", "labels"} of one view, in batch order."""
    try:
        vs: list[View] = [it["views"][view] for it in items]
    except KeyError:
        have = sorted(items[0]["views"]) if items else []
        raise BenchError(f"view {view!r} was not built by the loader (have {have}); add it to the loader's views") from None
    return [v.image for v in vs], [{"boxes": v.boxes, "labels": v.labels} for v in vs]
