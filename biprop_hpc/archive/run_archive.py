"""The HDF5 run archive (`archive.h5`): everything a run leaves for later aggregation.

Schema (version 2; version 1 files, which lack the restart records and the heartbeat, are still read):
  /            attributes: schema_version, status (running | checkpointed | completed | failed | interrupted),
               config (JSON), keep_ratio, model, dataset, seed, epochs (planned), world_size, launcher,
               controller, loader, skipped_files, job_id (the scheduler's, "" outside one), job_nodes (Slurm's
               list of the job's nodes, e.g. "node[1-2]"; "" elsewhere; absent in older archives), start_time,
               end_time, heartbeat (ISO 8601, UTC; refreshed at every write, i.e. at least once per epoch),
               end_reason (only when a hung rank's watchdog ended the run: its line; train/watchdog.py),
               python_version, torch_version, biprop_hpc_version, horovod_version, dali_version ("" when absent)
  /metrics/    1-D datasets, one entry per completed epoch: epoch, lr, train_loss, train_top1, val_loss,
               val_top1, val_top5, epoch_seconds, images_per_second. `epoch` is an HDF5 dimension scale named
               "epoch", attached to dimension 0 of the others (netCDF-4 readers such as h5netcdf and xarray see an
               `epoch` dimension with `epoch` as its coordinate; archives written before have no scale)
  /final       attributes once the run completed: best_epoch, test_loss, test_top1, test_top5, and
               best_val_top1 when the run had a validation split (absent, never NaN, when it had none)
  /layers      compound table, one row per BIPROP layer: name, weights, kept, alpha
  /kept_fraction  group, one row per completed epoch (absent in older archives): `epoch` (int64, a dimension
               scale), `layer` (the BIPROP layers' names, module order, as /layers) and `fraction` (float64, epochs x
               layers): each layer's kept fraction (kept / weights) as validated at the end of that epoch. Constant
               for layerwise pruning; under global pruning (README) it shows how the one threshold shares the
               weights out among layers, epoch by epoch
  /restarts    compound table, one row per continuation of the run: time (ISO 8601 UTC), epoch (epochs
               finished before it), step (steps of the next epoch already done), reason (why the previous
               process stopped, e.g. "SIGUSR1", or "unknown (no stop recorded)" after a kill)
  /ranks       compound table, one row per rank of the processes that ran the run last (a continuation
               replaces it): rank, host (its host name), local_rank and local_size (its index among, and the
               number of, the ranks on its host, as the launcher placed them), device ("cpu", "cuda:1", ...).
               Archives written before it existed have none (read as [])
  /robustness  group, only after `biprop evaluate --corruptions` stored its results here (the latest evaluation
               replaces it): attributes source ("generate" or the directory read), seed (of the generated
               corruptions), evaluated (the checkpoint or ticket scored), time (ISO 8601 UTC), clean_top1 (the
               clean test split), mean_top1 (mean over every corruption and severity); `table`, a compound table
               with one row per corruption and severity: corruption, severity (1..5), top1, top5, loss, count
               (samples scored, over all ranks)

Every text is a variable-length UTF-8 string (h5py.string_dtype()): h5py reads the attributes back as str;
string fields of datasets (layers, restarts, ranks) it reads as bytes, as it does every dataset string (h5py's
documented rule; read_archive decodes them, `.asstr()` or `.astype("T")` does for a plain string dataset).

`status` checkpointed means the run stopped on a signal after writing a mid-epoch checkpoint, and waits for a
continuation (`--resume auto`). The whole file is written to a temporary name and renamed over the old one
(with fsync) at every update, so a killed run always leaves a complete, readable archive. HDF5 file locking
is off: readers never block a writer, and file systems without flock (many Lustre/GPFS/NFS mounts) work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from biprop_hpc.files import replace_atomically

SCHEMA_VERSION = 2
STATUSES = ("running", "checkpointed", "completed", "failed", "interrupted")
METRICS = ("epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
           "epoch_seconds", "images_per_second")
LAYER_DTYPE = np.dtype([("name", h5py.string_dtype()), ("weights", np.int64), ("kept", np.int64),
                        ("alpha", np.float64)])
RESTART_DTYPE = np.dtype([("time", h5py.string_dtype()), ("epoch", np.int64), ("step", np.int64),
                          ("reason", h5py.string_dtype())])
ROBUSTNESS_DTYPE = np.dtype([("corruption", h5py.string_dtype()), ("severity", np.int64), ("top1", np.float64),
                             ("top5", np.float64), ("loss", np.float64), ("count", np.int64)])
RANK_DTYPE = np.dtype([("rank", np.int64), ("host", h5py.string_dtype()), ("local_rank", np.int64),
                       ("local_size", np.int64), ("device", h5py.string_dtype())])


class ArchiveError(ValueError):
    """A file that is not a readable run archive of a schema this version knows; the message says why."""


@dataclass
class RunRecord:
    attrs: dict
    metrics: dict = field(default_factory=lambda: {name: [] for name in METRICS})
    final: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)     # dicts with name, weights, kept, alpha
    restarts: list = field(default_factory=list)   # dicts with time, epoch, step, reason
    ranks: list = field(default_factory=list)      # dicts with rank, host, local_rank, local_size, device
    # {} or /robustness: its attributes, and "rows" (dicts with ROBUSTNESS_DTYPE's fields)
    robustness: dict = field(default_factory=dict)
    # {"layers": [names], "epochs": [epoch numbers], "fractions": [[per layer] per epoch]}
    kept_fraction: dict = field(default_factory=lambda: {"layers": [], "epochs": [], "fractions": []})

    @property
    def config(self) -> dict:
        return json.loads(self.attrs["config"])


def write_archive(path: str | Path, record: RunRecord) -> None:
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", locking=False) as h5:
            h5.attrs["schema_version"] = SCHEMA_VERSION
            for key, value in record.attrs.items():
                h5.attrs[key] = attribute_value(value)
            write_metrics(h5.create_group("metrics"), {name: record.metrics[name] for name in METRICS})
            final = h5.create_group("final")
            for key, value in record.final.items():
                final.attrs[key] = value
            rows = [(layer["name"], layer["weights"], layer["kept"], layer["alpha"]) for layer in record.layers]
            h5.create_dataset("layers", data=np.array(rows, dtype=LAYER_DTYPE))
            rows = [(r["time"], r["epoch"], r["step"], r["reason"]) for r in record.restarts]
            h5.create_dataset("restarts", data=np.array(rows, dtype=RESTART_DTYPE))
            rows = [(r["rank"], r["host"], r["local_rank"], r["local_size"], r["device"]) for r in record.ranks]
            h5.create_dataset("ranks", data=np.array(rows, dtype=RANK_DTYPE))
            if record.robustness:
                write_robustness(h5, record.robustness)
            write_kept_fraction(h5.create_group("kept_fraction"), record.kept_fraction)

    replace_atomically(path, write)


def write_kept_fraction(group: h5py.Group, kept: dict) -> None:
    """The /kept_fraction group: epoch (dimension scale of fraction's rows), layer names, fraction[epoch, layer]."""
    layers, epochs = list(kept.get("layers", [])), list(kept.get("epochs", []))
    fractions = np.asarray(kept.get("fractions", []), dtype=np.float64).reshape(len(epochs), len(layers))
    epoch = group.create_dataset("epoch", data=np.asarray(epochs, dtype=np.int64))
    group.create_dataset("layer", data=np.array(layers, dtype=h5py.string_dtype()))
    fraction = group.create_dataset("fraction", data=fractions)
    if epoch.shape[0] == fraction.shape[0]:
        epoch.make_scale("epoch")
        fraction.dims[0].attach_scale(epoch)


def read_kept_fraction(h5: h5py.File) -> dict:
    if "kept_fraction" not in h5:
        return {"layers": [], "epochs": [], "fractions": []}
    group = h5["kept_fraction"]
    return {"layers": [plain_value(name) for name in group["layer"][()]], "epochs": group["epoch"][()].tolist(),
            "fractions": group["fraction"][()].tolist()}


def write_robustness(h5: h5py.File, robustness: dict) -> None:
    """The /robustness group (module docstring), replacing one already there."""
    if "robustness" in h5:
        del h5["robustness"]
    group = h5.create_group("robustness")
    for key, value in robustness.items():
        if key != "rows":
            group.attrs[key] = attribute_value(value)
    rows = [tuple(row[name] for name in ROBUSTNESS_DTYPE.names) for row in robustness["rows"]]
    group.create_dataset("table", data=np.array(rows, dtype=ROBUSTNESS_DTYPE))


def read_robustness(h5: h5py.File) -> dict:
    if "robustness" not in h5:
        return {}
    group = h5["robustness"]
    rows = [{name: plain_value(row[name]) for name in ROBUSTNESS_DTYPE.names} for row in group["table"][()]]
    return {**{key: plain_value(value) for key, value in group.attrs.items()}, "rows": rows}


def corruption_means(rows: list[dict]) -> dict:
    """{corruption: mean top-1 over its severities} of /robustness rows, in the rows' order."""
    by_name: dict[str, list[float]] = {}
    for row in rows:
        by_name.setdefault(row["corruption"], []).append(row["top1"])
    return {name: sum(values) / len(values) for name, values in by_name.items()}


def attribute_value(value):
    """A value as an HDF5 attribute that h5py reads back as it was: text (str, bytes, numpy strings) as one
    variable-length UTF-8 string, read back as str; a list of texts as an array of those; anything else as is."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode()
    if isinstance(value, str):
        return str(value)  # str subclasses and numpy str too
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, bytes)) for v in value):
        return np.array([attribute_value(v) for v in value], dtype=h5py.string_dtype())
    return value


def write_metrics(group: h5py.Group, metrics: dict) -> None:
    """Per-epoch metrics as 1-D datasets in `group`; `epoch` becomes the dimension scale of the others (same
    length), so that netCDF-4 readers see one `epoch` dimension instead of a phony one per dataset."""
    datasets = {name: group.create_dataset(name, data=np.asarray(values, dtype=np.int64 if name == "epoch"
                                                               else np.float64))
                for name, values in metrics.items()}
    scale = datasets.get("epoch")
    if scale is None:
        return
    scale.make_scale("epoch")
    for name, dataset in datasets.items():
        if name != "epoch" and dataset.shape == scale.shape:
            dataset.dims[0].attach_scale(scale)


def read_archive(path: str | Path) -> RunRecord:
    """Read one archive without taking a lock (a running writer is never disturbed).

    Raises ArchiveError for a file that is not HDF5, is truncated, lacks the archive's groups, or has a
    newer schema than this version of biprop-hpc reads.
    """
    try:
        with h5py.File(path, "r", locking=False) as h5:
            version = plain_value(h5.attrs.get("schema_version", 0))
            if not isinstance(version, int) or version < 1:
                raise ArchiveError(f"{path}: not a biprop-hpc run archive (no schema_version)")
            if version > SCHEMA_VERSION:
                raise ArchiveError(f"{path}: archive schema {version} is newer than this biprop-hpc reads "
                                   f"({SCHEMA_VERSION}); upgrade biprop-hpc")
            attrs = {key: plain_value(value) for key, value in h5.attrs.items()}
            metrics = {name: h5["metrics"][name][()].tolist() for name in h5["metrics"]}
            final = {key: plain_value(value) for key, value in h5["final"].attrs.items()}
            layers = [{"name": plain_value(row["name"]), "weights": int(row["weights"]), "kept": int(row["kept"]),
                       "alpha": float(row["alpha"])} for row in h5["layers"][()]]
            restarts = [{"time": plain_value(row["time"]), "epoch": int(row["epoch"]), "step": int(row["step"]),
                         "reason": plain_value(row["reason"])}
                        for row in (h5["restarts"][()] if "restarts" in h5 else [])]
            ranks = [{"rank": int(row["rank"]), "host": plain_value(row["host"]),
                      "local_rank": int(row["local_rank"]), "local_size": int(row["local_size"]),
                      "device": plain_value(row["device"])}
                     for row in (h5["ranks"][()] if "ranks" in h5 else [])]
            kept_fraction = read_kept_fraction(h5)
            robustness = read_robustness(h5)
    except ArchiveError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ArchiveError(f"{path}: not a readable run archive ({error})") from None
    return RunRecord(attrs, metrics, final, layers, restarts, ranks=ranks, kept_fraction=kept_fraction,
                     robustness=robustness)


def plain_value(value):
    """HDF5 attribute (or string/scalar dataset element) -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
