"""Which epoch's genotype is the best (reference 5.5).

The authors keep the genotype of the epoch whose validation wins by
`is_better`; `BestGenotype` holds the best so far as TensorFlow variables,
so that it is saved with every checkpoint and a resumed search keeps
comparing against the same best.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from nppnet_tf.search.genotype import Genotype


def is_better(
    miou: float, pckh: float, best_miou: float, best_pckh: float
) -> bool:
    """The authors' selection rule (reference 5.5), scores in percent.

    A genotype becomes the best when its mIoU improves and its PCKh did not
    drop by more than one point, or when its PCKh improves by more than one
    point whatever its mIoU. NaN scores never win.
    """
    if math.isnan(miou) or math.isnan(pckh):
        return False  # an undefined score would poison later comparisons
    if miou > best_miou:
        return pckh > best_pckh - 1.0
    return pckh > best_pckh + 1.0


class BestGenotype(tf.Module):
    """The best epoch so far, checkpointed with the rest of the state."""

    def __init__(self):
        super().__init__(name="best_genotype")
        with tf.device("/cpu:0"):
            # -inf, not the authors' 0: the first validated epoch is
            # always a best, even if it scores exactly 0 (docs/search.md).
            self.miou = tf.Variable(-np.inf, dtype=tf.float64, name="miou")
            self.pckh = tf.Variable(-np.inf, dtype=tf.float64, name="pckh")
            self.epoch = tf.Variable(-1, dtype=tf.int64, name="epoch")
            self.genotype_json = tf.Variable("", dtype=tf.string, name="json")

    def offer(
        self, epoch: int, miou: float, pckh: float, genotype: Genotype
    ) -> bool:
        """Takes `genotype` if it beats the best (`is_better`)."""
        if not is_better(
            miou, pckh, float(self.miou.numpy()), float(self.pckh.numpy())
        ):
            return False
        self.miou.assign(miou)
        self.pckh.assign(pckh)
        self.epoch.assign(epoch)
        self.genotype_json.assign(genotype.to_json())
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "epoch": int(self.epoch.numpy()),
            "miou": float(self.miou.numpy()),
            "pckh": float(self.pckh.numpy()),
        }

    def genotype(self) -> Genotype | None:
        text = self.genotype_json.numpy().decode()
        return Genotype.from_json(text, "best genotype") if text else None
