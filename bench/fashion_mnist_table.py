"""Print the Fashion-MNIST evidence table (markdown) from run archives.

  python bench/fashion_mnist_table.py RUNS_DIR
"""
import sys
from pathlib import Path

from biprop_hpc.archive import read_archive

rows = []
for path in sorted(Path(sys.argv[1]).rglob("*.h5")):
    record = read_archive(path)
    cfg = record.config
    kind = "dense (trained weights)" if cfg["layer_type"] == "dense" else (
        "MPT-1/1" if cfg["model"].endswith("_bin") else "MPT-1/32")
    kept = "100%" if cfg["layer_type"] == "dense" else f"{cfg['keep_ratio']:.0%}"
    rows.append(f"| {kind} | {cfg['model']} | {kept} | {len(record.metrics['epoch'])} | "
                f"{record.final['best_val_top1']:.2f} (epoch {record.final['best_epoch']}) | "
                f"{record.final['test_top1']:.2f} | `configs/fashion-mnist/{cfg['config_name']}.yaml` |")
print("| network | model | weights kept | epochs | best val top-1 | test top-1 | config |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
