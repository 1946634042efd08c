"""The HDF5 run archive (`archive.h5`): everything a run leaves for later aggregation.

Schema (version 1):
  /            attributes: schema_version, status (running|completed|failed|interrupted), config (JSON),
               keep_ratio, model, dataset, seed, world_size, launcher, controller, start_time, end_time
               (ISO 8601, UTC), python_version, torch_version, biprop_hpc_version, horovod_version,
               dali_version ("" when absent)
  /metrics/    1-D datasets, one entry per completed epoch: epoch, lr, train_loss, train_top1, val_loss,
               val_top1, val_top5, epoch_seconds, images_per_second
  /final       attributes: best_val_top1, best_epoch, test_loss, test_top1, test_top5 (once the run completed)
  /layers      compound table, one row per BIPROP layer: name, weights, kept, alpha

The whole file is rewritten to a temporary name and renamed over the old one after every epoch, so a
killed run always leaves a complete, readable archive of its last finished epoch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
METRICS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
           "epoch_seconds", "images_per_second")
LAYER_DTYPE = np.dtype([("name", h5py.string_dtype()), ("weights", np.int64), ("kept", np.int64),
                        ("alpha", np.float64)])


@dataclass
class RunRecord:
    attrs: dict
    metrics: dict = field(default_factory=lambda: {name: [] for name in METRICS})
    final: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)   # dicts with name, weights, kept, alpha

    @property
    def config(self) -> dict:
        return json.loads(self.attrs["config"])


def write_archive(path: str | Path, record: RunRecord) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in record.attrs.items():
            h5.attrs[key] = str(value) if isinstance(value, str) else value  # str subclasses too
        metrics = h5.create_group("metrics")
        for name in METRICS:
            dtype = np.int64 if name == "epoch" else np.float64
            metrics.create_dataset(name, data=np.asarray(record.metrics[name], dtype=dtype))
        final = h5.create_group("final")
        for key, value in record.final.items():
            final.attrs[key] = value
        rows = [(layer["name"], layer["weights"], layer["kept"], layer["alpha"]) for layer in record.layers]
        h5.create_dataset("layers", data=np.array(rows, dtype=LAYER_DTYPE))
    os.replace(tmp, path)


def read_archive(path: str | Path) -> RunRecord:
    with h5py.File(path, "r") as h5:
        attrs = {key: _plain(value) for key, value in h5.attrs.items()}
        metrics = {name: h5["metrics"][name][()].tolist() for name in h5["metrics"]}
        final = {key: _plain(value) for key, value in h5["final"].attrs.items()}
        layers = [{"name": row["name"].decode() if isinstance(row["name"], bytes) else row["name"],
                   "weights": int(row["weights"]), "kept": int(row["kept"]), "alpha": float(row["alpha"])}
                  for row in h5["layers"][()]]
    return RunRecord(attrs, metrics, final, layers)


def _plain(value):
    """HDF5 attribute -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
