"""mmseg's albumentations transform, seeded from numpy so mmengine's seeding applies."""
import numpy as np
from mmseg.datasets.transforms import Albu


class SeededAlbu(Albu):
    """``mmseg.Albu`` (works on ``img`` alone) drawing its randomness from ``np.random``.

    albumentations >= 2 keeps a private RNG seeded from OS entropy when the transform is
    built and ignores ``np.random``: forked dataloader workers then replay the parent's
    sequence (the same crops and flips in every worker, and every epoch again without
    persistent workers), and ``randomness.seed`` does not make a run reproducible.
    Reseeding it per sample from ``np.random`` follows mmengine's per-worker seeding, as
    mmcv's own random transforms do.
    """

    def transform(self, results: dict) -> dict:
        self.aug.set_random_seed(int(np.random.randint(2**31)))
        return super().transform(results)
