"""A resumed fit continues exactly as the uninterrupted fit would have.

Lightning's checkpoint restores the weights, the optimizer, the schedule and the loop counters,
not what a fit draws at random: the training order, each training image's augmentation (random
crop and flip) and the dropout / drop-path masks. Drawn from the process-wide generators, these
depend on the process's history (``seed_everything`` at its start, then whatever the sanity
check, the loaders' worker seeds and the earlier epochs drew; persistent loader workers keep
their own generators across epochs), so a resumed run trained on other orders, crops and masks
than the run it resumed (configs/demo.yaml for 10 epochs, killed in epoch 9: test accuracy
0.5738 resumed against 0.5755 uninterrupted; with the streams below, 0.547 both).

Here each of them is a function of the run's seed and the epoch only:

- ``SeededShuffle`` orders an epoch from (seed, epoch), as torch's ``DistributedSampler`` does
  (it is one, for one process or many), and gives every sample a seed for its augmentation.
  The datamodule's checkpoint state holds the epoch a resumed fit starts with: Lightning builds
  the training loader, whose workers take their first indices at once, before it restores its
  loops and calls ``set_epoch``;
- ``SeededSamples`` runs each sample's transform on a torch generator seeded with that seed, so
  its crop and flip do not depend on which loader worker reads it, how many there are, or
  whether they persist;
- ``EpochSeeds`` (a callback ``ViTClassifier`` adds to every fit) restarts torch's (CPU and CUDA),
  numpy's and Python's generators from (seed, epoch, rank) at each epoch's first training batch:
  the dropout and drop-path masks follow.

The seed is Lightning's run seed (``PL_GLOBAL_SEED``: the config's ``seed_everything``, or what
``lightning.seed_everything`` set; 0 when unset, as Lightning's own distributed sampler takes).
The checkpoint records it, and a resumed fit continues with the checkpoint's seed.
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from typing import Any, Iterator, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset, DistributedSampler

SEED_ENV = "PL_GLOBAL_SEED"  # where lightning.seed_everything keeps the run's seed


def run_seed() -> int:
    """The run's seed as Lightning keeps it; 0 when no seed was set."""
    return int(os.environ.get(SEED_ENV, 0))


def next_epoch(trainer: L.Trainer) -> int:
    """The epoch a fit resumed from a checkpoint written now starts with: the one Lightning then
    passes to the samplers' ``set_epoch``."""
    return trainer.fit_loop.epoch_progress.current.processed


def derived_seed(*keys: Any) -> int:
    """A 63-bit seed from ``keys`` (ints and strings), the same in every process (Python's
    ``hash`` of a string is not)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededShuffle(DistributedSampler):
    """``DistributedSampler``'s shuffled order (from seed + epoch; Lightning calls
    ``set_epoch`` every epoch), yielding ``(index, sample_seed)``: the seed of that sample's
    augmentation in this epoch, a function of (seed, epoch, index) only, so that the same sample
    is augmented alike whichever process or worker reads it."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, "augment"))
        seeds = torch.randint(2**62, (len(self.dataset),), generator=generator).tolist()
        return iter([(index, seeds[index]) for index in indices])


class SeededSamples(Dataset):
    """A map-style dataset read with ``(index, seed)`` keys (``SeededShuffle``'s): the item's
    transform draws from torch's generator seeded with ``seed``, forked so that the process's
    own stream (the dropout masks, with zero loader workers) is left as it was. A plain index
    (from a sampler Lightning puts in instead, as for ``overfit_batches``) reads unseeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def seed_generators(seed: int) -> None:
    """Restart torch's (CPU and every CUDA device), numpy's and Python's generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class EpochSeeds(Callback):
    """At each epoch's first training batch, restart the process's generators from (run seed,
    epoch, rank): what the training steps draw (dropout, drop path) is then the same in a
    resumed fit as in the uninterrupted one, whatever the process drew before (the sanity
    check, validation, the loaders' worker seeds). Its state in the checkpoint is the run's
    seed, which a resumed fit continues with."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            seed_generators(derived_seed(run_seed(), trainer.current_epoch, trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": run_seed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored before the loaders are built, so SeededShuffle takes the checkpoint's seed.
        seed = state_dict.get("seed")
        if seed is not None and seed != run_seed():
            if SEED_ENV in os.environ:
                warnings.warn(f"the checkpoint's run was seeded {seed}, this process "
                              f"{run_seed()}: the resumed fit continues with the checkpoint's "
                              f"seed {seed}", stacklevel=2)
            L.seed_everything(seed, workers=os.environ.get("PL_SEED_WORKERS") == "1",
                              verbose=False)
