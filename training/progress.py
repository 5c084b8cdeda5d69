"""tqdm progress for Keras training: a bar over epochs and one over each epoch's steps.

Keras' own ``verbose=1`` bar is one line per epoch that logs badly, ``verbose=2`` prints one
line per epoch and nothing in between.  On a terminal :class:`TqdmEpochs` shows where an epoch
is and the latest metrics; when stderr is not a terminal (logs, CI, a pipeline under nohup)
:func:`fit_progress` keeps Keras' one line per epoch instead, so log files stay readable.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

from training.tfenv import keras

log = logging.getLogger(__name__)

_SHOWN = ("loss", "auc", "val_loss", "val_auc")


class TqdmEpochs(keras.callbacks.Callback):
    """Epoch bar (with the epoch's metrics) plus a transient bar over the epoch's steps."""

    def __init__(self, file: Any = None) -> None:
        super().__init__()
        self._file = file
        self._epochs: tqdm | None = None
        self._steps: tqdm | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        total = int(self.params.get("epochs") or 0) or None
        self._epochs = tqdm(total=total, desc="epochs", unit="epoch", file=self._file, position=0)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        steps = self.params.get("steps")
        self._steps = tqdm(total=int(steps) if steps else None, desc=f"epoch {epoch + 1}", unit="step",
                           file=self._file, position=1, leave=False)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._steps is not None:
            self._steps.update(1)
            if logs and "loss" in logs:
                self._steps.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._epochs is not None:
            shown = {k: f"{float(v):.4f}" for k, v in (logs or {}).items() if k in _SHOWN}
            self._epochs.set_postfix(shown, refresh=False)
            self._epochs.update(1)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        for bar in (self._steps, self._epochs):
            if bar is not None:
                bar.close()
        self._steps = self._epochs = None


def fit_progress(progress: bool | None = None) -> tuple[list[keras.callbacks.Callback], int]:
    """(extra callbacks, Keras ``verbose``) for ``model.fit``.

    ``progress`` None: bars when stderr is a terminal, else Keras' one line per epoch (verbose=2);
    True/False force the bars / the lines.
    """
    on = sys.stderr.isatty() if progress is None else progress
    return ([TqdmEpochs()], 0) if on else ([], 2)
