"""Progress of a training phase: a tqdm bar in a terminal, log lines inside Airflow."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("sae_pipeline.engine.trainer")


class _Progress:
    """A tqdm bar in a terminal; plain log lines (every ~10% of epochs) inside Airflow."""

    def __init__(self, total: int, desc: str):
        self.desc, self.total = desc, total
        self.bar = None
        if sys.stderr.isatty() and not os.environ.get("AIRFLOW_CTX_DAG_ID"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)
        self.every = max(1, total // 10)

    def update(self, epoch: int, train: float, val: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(train=f"{train:.5f}", val=f"{val:.5f}")
        elif (epoch + 1) % self.every == 0 or epoch + 1 == self.total:
            log.info(
                "%s epoch %d/%d train %.6f val %.6f", self.desc, epoch + 1, self.total, train, val
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
