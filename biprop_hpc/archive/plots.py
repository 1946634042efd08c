"""Plots of many runs for `biprop results --plot DIR` (matplotlib, Agg backend, PNG at 100 dpi: 10 x 6 inches,
taller when the legend needs it, saved with bbox_inches="tight" so the legend right of the axes is never cut).

- `top1_vs_keep_ratio.png`: test top-1 against the keep ratio, mean over seeds with +- one (sample) standard
  deviation as error bars; one line per model and MPT type (and per value of any other setting that varies
  between the runs, named in the legend); dense runs of the same network as dashed horizontal lines; the
  paper's reported accuracy (`paper_top1` of the configs) as star markers.
- `val_top1_curves.png`: validation top-1 per epoch, one line per group (every setting that varies except
  the seed), the mean over its runs with a band of +- one standard deviation.
- `kept_fraction/<run id with / as __>.png`, one per completed run with global pruning: each BIPROP layer's kept
  fraction per epoch (log scale), from the archive's /kept_fraction table.
Only completed runs are drawn, as in the statistics. A plot with nothing to draw says so in its middle.
Every line has its own (colour, marker, line style), see line_style: tab10's 10 colours alone repeat from the
11th group on.
"""
from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from biprop_hpc.archive.results import RunRow, group_runs, mean_std, varying_keys  # noqa: E402

FIGURE_INCHES = (10, 6)
DPI = 100                 # 1000 x 600 pixels, before the tight crop (and taller for a long legend)
# Keys that the keep-ratio plot does not split lines by: the x axis itself, the type (lines vs dense
# baselines) and the config's name (a sweep over keep ratios often uses one config file per ratio).
NOT_LINE_KEYS = ("keep_ratio", "layer_type", "config_name")
BARE_KEYS = ("config_name", "model", "layer_type")   # legend shows their values without the key
LEGEND_CHARACTERS = 44                                # legend lines wrap at this width (the figure's right third)
AXES_TOP = 0.92                                       # figure fraction; the legend hangs from the axes' top
MARKERS = ("o", "s", "^", "D", "v", "P", "X")         # 7, coprime with the 10 colours; "*" marks the paper
LINE_STYLES = ("-", "--", "-.", ":")


def line_style(index: int) -> dict:
    """Colour, marker and line style of the index-th line. Colours (tab10) and markers cycle together, so a
    (colour, marker) pair repeats only after 10 x 7 = 70 lines; each further 70 lines take the next line style
    (280 distinct lines)."""
    colours = matplotlib.colormaps["tab10"].colors
    return {"color": colours[index % len(colours)], "marker": MARKERS[index % len(MARKERS)],
            "linestyle": LINE_STYLES[index // (len(colours) * len(MARKERS)) % len(LINE_STYLES)]}


def write_plots(rows: list[RunRow], directory: str | Path) -> list[Path]:
    """Write both plots into `directory` (created if needed); return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    done = [row for row in rows if row.completed]
    paths = [plot_top1_vs_keep_ratio(done, directory / "top1_vs_keep_ratio.png"),
             plot_learning_curves(done, directory / "val_top1_curves.png")]
    for row in done:
        if row.settings.get("pruning") == "global":
            (directory / "kept_fraction").mkdir(exist_ok=True)
            name = row.run_id.replace("/", "__") + ".png"
            paths.append(plot_kept_fraction(row, directory / "kept_fraction" / name))
    return paths


def plot_kept_fraction(row: RunRow, path: Path) -> Path:
    """One run: every BIPROP layer's kept fraction against the epoch, one line per layer."""
    figure, axes = plt.subplots(figsize=FIGURE_INCHES, dpi=DPI)
    kept = row.record.kept_fraction
    for index, name in enumerate(kept["layers"]):
        fractions = [epoch_row[index] for epoch_row in kept["fractions"]]
        axes.plot(kept["epochs"], fractions, **line_style(index), markersize=5, label=f"layer {name}")
    has_data = bool(kept["epochs"]) and bool(kept["layers"])
    if has_data:
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("kept fraction of the layer's weights")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"Kept fraction per layer: {row.run_id} (keep ratio {row.keep_ratio:g}, global pruning)")
    _finish(figure, axes, has_data=has_data, path=path)
    return path


def plot_top1_vs_keep_ratio(done: list[RunRow], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=FIGURE_INCHES, dpi=DPI)
    searched = [row for row in done if row.type != "dense" and row.test_top1 is not None]
    dense = [row for row in done if row.type == "dense" and row.test_top1 is not None]
    line_keys = [key for key in varying_keys(searched) if key not in NOT_LINE_KEYS]
    paper_shown = False
    lines = group_runs(searched, line_keys)
    for index, line in enumerate(lines):
        style = line_style(index)
        points = group_runs(line.runs, ["keep_ratio"])
        x = [100 * point.values["keep_ratio"] for point in points]
        stats = [mean_std([run.test_top1 for run in point.runs]) for point in points]
        axes.errorbar(x, [mean for mean, _ in stats], yerr=[std or 0.0 for _, std in stats], **style,
                      capsize=4, label=_label([line.runs[0].model, line.runs[0].type], line.values))
        for point, x_value in zip(points, x):
            paper = point.runs[0].paper_top1
            if paper is not None:
                axes.plot([x_value], [paper], marker="*", markersize=14, color=style["color"], markeredgecolor="black",
                          linestyle="none", label=None if paper_shown else "paper (reported)")
                paper_shown = True
    dense_keys = [key for key in varying_keys(dense) if key not in NOT_LINE_KEYS]
    for index, baseline in enumerate(group_runs(dense, dense_keys), start=len(lines)):
        mean, _ = mean_std([run.test_top1 for run in baseline.runs])
        # Dashed and without markers: unlike every searched line.
        axes.axhline(mean, color=line_style(index)["color"], linestyle="--",
                     label=_label([baseline.runs[0].model, "dense"], baseline.values,
                                  f"{mean:.2f} (n={len(baseline.runs)})"))
    axes.set_xlabel("weights kept (%)")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title("Test top-1 against keep ratio (mean \u00b1 std over seeds)")
    _finish(figure, axes, has_data=bool(searched or dense), path=path)
    return path


def plot_learning_curves(done: list[RunRow], path: Path) -> Path:
    figure, axes = plt.subplots(figsize=FIGURE_INCHES, dpi=DPI)
    drawn = 0
    for group in group_runs(done, varying_keys(done)):
        per_epoch: dict[int, list[float]] = {}
        for run in group.runs:
            for epoch, value in zip(run.record.metrics.get("epoch", []), run.record.metrics.get("val_top1", [])):
                if math.isfinite(value):
                    per_epoch.setdefault(int(epoch), []).append(value)
        if not per_epoch:
            continue  # runs without a validation split
        epochs = sorted(per_epoch)
        means = [statistics.mean(per_epoch[e]) for e in epochs]
        stds = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0 for e in epochs]
        style = line_style(drawn)
        axes.plot(epochs, means, **style, markersize=5, markevery=max(1, len(epochs) // 15),
                  label=_label([], group.values, f"(n={len(group.runs)})"))
        axes.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          color=style["color"], alpha=0.2)
        drawn += 1
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation top-1 (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Validation top-1 per epoch (mean \u00b1 std over the runs of each group)")
    _finish(figure, axes, has_data=drawn > 0, path=path)
    return path


def _label(first: list[str], values: dict, last: str = "") -> str:
    """A legend entry: `first`, then the group's values (bare for names, key=value otherwise), wrapped."""
    words = list(first)
    for key, value in values.items():
        text = f"{value:g}" if isinstance(value, float) else str(value)
        if text not in words:
            words.append(text if key in BARE_KEYS else f"{key}={text}")
    return textwrap.fill(" ".join(words + [last]).strip(), LEGEND_CHARACTERS, subsequent_indent="  ")


def _finish(figure, axes, has_data: bool, path: Path) -> None:
    axes.grid(True, alpha=0.3)
    figure.subplots_adjust(left=0.07, right=0.66, top=AXES_TOP, bottom=0.1)
    if has_data:
        legend = axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        # A legend taller than the axes would hang out of the figure: make the figure as tall as it needs
        # (font sizes are in points, so the legend keeps its height in inches while the figure grows).
        figure.canvas.draw()
        legend_inches = legend.get_window_extent().height / figure.dpi
        width, height = figure.get_size_inches()
        figure.set_size_inches(width, max(height, (legend_inches + 0.2) / AXES_TOP))
    else:
        axes.text(0.5, 0.5, "no completed runs to draw", ha="center", va="center", transform=axes.transAxes)
    figure.savefig(path, format="png", bbox_inches="tight")  # also keeps a long legend line whole
    plt.close(figure)
