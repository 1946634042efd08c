"""Checks of a job's runs before anything is written or queued: what `biprop train` would refuse on a compute
node hours later (an unknown model, a dataset that is not where the run looks for it) is refused on the login
node instead, naming the runs, the path and the fix.

The checks are cheap: no data is read. A data path is looked at once however many runs use it, and only for
what training opens first: the directory, the files a dataset reader opens (biprop_hpc/data/readers.py), an
image tree's train/ and val/ (biprop_hpc/data/tree.py). Training reports the same problems in the same words.
"""
from __future__ import annotations

import difflib

from biprop_hpc.config import Config, ConfigError
from biprop_hpc.jobs.schedulers import index_ranges

NO_CHECK_HINT = "(checked before queueing; if the path exists only on the compute nodes, pass --no-check-data)"


def check_runs(configs: list[Config], run_dirs: list[str], check_data: bool = True) -> None:
    """ConfigError for an unknown model, DatasetMissing for a missing dataset (unless not check_data);
    each names the runs (array indices 1..N, in the order of `configs`) it concerns."""
    from biprop_hpc.models import MODELS  # imports torch and the zoo: only when a job is written

    def runs(indices: list[int]) -> str:
        first = run_dirs[indices[0] - 1]
        more = f" and {len(indices) - 1} more" if len(indices) > 1 else ""
        return f"run{'s' if len(indices) > 1 else ''} {index_ranges(indices)} ({first}{more})"

    models: dict[str, list[int]] = {}
    places: dict[tuple[str, str], list[int]] = {}
    for index, cfg in enumerate(configs, start=1):
        models.setdefault(cfg.model, []).append(index)
        places.setdefault((cfg.dataset, cfg.data), []).append(index)
    for name, indices in models.items():
        if name not in MODELS:
            close = difflib.get_close_matches(name, MODELS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ConfigError(f"{runs(indices)}: model: unknown {name!r}{hint} Known models: "
                              f"{', '.join(sorted(MODELS))}")
    if not check_data:
        return
    from biprop_hpc.data import DatasetMissing
    for (dataset, data), indices in places.items():
        try:
            check_data_path(dataset, data)
        except DatasetMissing as error:
            raise DatasetMissing(f"{runs(indices)}: {error} {NO_CHECK_HINT}") from None


def check_data_path(dataset: str, data: str) -> None:
    """DatasetMissing, in training's words, when `dataset` is not found at `data` (its standard directory
    when ""): a path relative to the working directory, which the job's script runs `biprop train` in."""
    # Imported here, as the zoo above: they import torch, which `biprop jobs status` and --help do not need.
    from biprop_hpc.data.build import IMAGE_TREE_DATASETS, image_tree_root
    from biprop_hpc.data.datasets import check_dataset_files
    from biprop_hpc.data.tree import class_names

    if dataset in IMAGE_TREE_DATASETS:   # as build.py's _image_tree and tree.py's load_split
        for split in ("train", "val"):   # a run needs both (val/ is its test set when there is no test/)
            class_names(image_tree_root(dataset, data), split)
        return
    check_dataset_files(dataset, data)
