"""Which examples each training step takes: epochs of a shuffled order, without replacement (as a PyTorch
``DataLoader(shuffle=True)`` under TRL's SFTTrainer), so every training example is seen once per epoch.

Every batch is full (the same cost per step): the one that crosses an epoch's end takes the rest of the old order
and the start of a fresh shuffle, whose examples already in that batch go to its end (no example twice in one
batch). The state (rng, order, position) is what a checkpoint keeps, so a resumed run draws the same batches.
"""

from __future__ import annotations

import math
import random


def steps_for(epochs: float, n_train: int, batch: int) -> int:
    """Steps that make ``epochs`` passes over ``n_train`` examples in batches of ``batch``: ceil(E * N / B)."""
    return max(1, math.ceil(epochs * n_train / min(batch, n_train) - 1e-9))


def epochs_of(steps: int, n_train: int, batch: int) -> float:
    """How many passes over the training examples ``steps`` batches make."""
    return steps * min(batch, n_train) / n_train


class Batches:
    """Indices of the examples each step trains on, ``size`` (at most ``n``) at a time."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size = n, min(size, n)
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0

    def next(self) -> list[int]:
        out = self.order[self.pos:self.pos + self.size]
        self.pos += len(out)
        if len(out) < self.size:  # the epoch's end: a fresh shuffle fills the batch
            fresh = list(range(self.n))
            self.rng.shuffle(fresh)
            taken = set(out)
            self.order = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
            self.pos = self.size - len(out)
            out += self.order[:self.pos]
        return out

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "pos": self.pos}

    def set_state(self, s: dict) -> None:
        version, internal, gauss = s["rng"]
        self.rng.setstate((version, tuple(internal), gauss))  # torch.load gives the tuple back as a list
        self.order, self.pos = list(s["order"]), int(s["pos"])
