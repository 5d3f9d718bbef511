"""Loggers of our own: what Lightning's loggers do not do for a resumed run."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing `metrics.csv` is continued instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose `metrics.csv` keeps the rows of the runs before a kill and continues after them.

    Steps logged after the last checkpoint and before the kill are trained, and logged, again by the
    resumed run: their later rows are the ones of the training that continued.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
