"""`biprop configs list | show NAME | copy NAME [DEST]`: the paper's configs that ship inside the package
(package_data.py), usable without a clone.

    biprop configs list                                 every config: dataset, model, keep ratio, epochs, paper top-1
    biprop configs show cifar10/conv4_mpt1-32_kn        its YAML text
    biprop configs copy cifar10/conv4_mpt1-32_kn my/    my/conv4_mpt1-32_kn.yaml and the base file(s) it names
"""
from __future__ import annotations

import difflib
from pathlib import Path

from biprop_hpc.config import ConfigError
from biprop_hpc.package_data import config_names, configs_dir, packaged_config

NAME_HELP = "a packaged config: <dataset>/<name> as `biprop configs list` prints it (e.g. cifar10/conv4_mpt1-32_kn)"


def add_configs_commands(subparsers) -> None:
    """Register `configs list`, `configs show` and `configs copy` on an argparse subparsers object."""
    configs = subparsers.add_parser(
        "configs", allow_abbrev=False, help="list, show and copy the paper's configs that ship with the package",
        description="The configs of the paper's experiments, installed with the package. `biprop train --config` "
                    "and `biprop jobs --config` take a packaged name (cifar10/conv4_mpt1-32_kn) as well as a file.")
    commands = configs.add_subparsers(dest="configs_command", required=True, metavar="{list,show,copy}")
    commands.add_parser("list", allow_abbrev=False, help="one line per config: name, dataset, model, keep ratio, "
                                                         "epochs, the paper's top-1")
    show = commands.add_parser("show", allow_abbrev=False, help="print a config's YAML text")
    show.add_argument("name", metavar="NAME", help=NAME_HELP + "; `base:` files (names starting with _) too")
    copy = commands.add_parser("copy", allow_abbrev=False, help="write a config (and its base files) out to edit",
                               description="Write NAME's YAML file, and every `base:` file it builds on, beside "
                                           "it, so that the copy runs as it is: biprop train --config COPY.")
    copy.add_argument("name", metavar="NAME", help=NAME_HELP)
    copy.add_argument("dest", nargs="?", default=".", metavar="DEST",
                      help="a directory (created when given with a trailing /), or the file name of the copy "
                           "(default: the current directory)")
    copy.add_argument("--force", action="store_true", help="overwrite files that exist with other content")
    configs.set_defaults(handler=run_configs_command)


def run_configs_command(args) -> None:
    if args.configs_command == "list":
        print(config_table())
    elif args.configs_command == "show":
        print(config_path(args.name).read_text(), end="")
    else:
        for line in copy_config(args.name, args.dest, args.force):
            print(line)


def config_path(name: str) -> Path:
    """The packaged file of `name`; a ConfigError with the closest names when there is none."""
    path = packaged_config(name)
    if path is None:
        closest = difflib.get_close_matches(name.removesuffix(".yaml"), config_names(with_bases=True), n=3,
                                            cutoff=0.5)
        hint = f"; closest: {', '.join(closest)}" if closest else ""
        raise ConfigError(f"no packaged config {name!r}{hint} (`biprop configs list` shows them all)")
    return path


def config_table() -> str:
    """Every packaged config (not the `_` base files) with the keys that tell them apart, as merged with its
    bases and the defaults: the config train would run."""
    from biprop_hpc.config import build_config  # not at import: `biprop --help` stays fast

    rows = [("NAME", "DATASET", "MODEL", "KEEP", "EPOCHS", "PAPER_TOP1")]
    for name in config_names():
        cfg = build_config(str(configs_dir() / f"{name}.yaml"), {})
        rows.append((name, cfg.dataset, cfg.model, f"{cfg.keep_ratio:g}", str(cfg.epochs),
                     f"{cfg.paper_top1:.2f}" if cfg.paper_top1 else "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _with_bases(path: Path) -> list[Path]:
    """`path` and the `base:` files it builds on, recursively (bases are relative to the file naming them)."""
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    bases = values.get("base", []) if isinstance(values, dict) else []
    files = [path]
    for base in [bases] if isinstance(bases, str) else bases:
        files += [found for found in _with_bases(path.parent / base) if found not in files]
    return files


def copy_config(name: str, dest: str, force: bool) -> list[str]:
    """Write config `name` to `dest` (a directory, created when it ends in /, or the copy's file name) and its
    base files beside it, with their relative paths kept so that `base:` still finds them. Nothing is written when
    a file exists with other content, unless `force`. Returns one line per file."""
    source = config_path(name)
    into_directory = dest.endswith("/") or Path(dest).is_dir()  # Path() drops a trailing /
    target = Path(dest) / source.name if into_directory else Path(dest)
    if not into_directory and not target.parent.is_dir():
        raise ConfigError(f"configs copy: directory {target.parent} does not exist (create it, or give DEST "
                          "with a trailing / to have it created)")
    plan = [(source, target)] + [(base, target.parent / base.relative_to(source.parent))
                                 for base in _with_bases(source)[1:]]
    clashes = [str(to) for origin, to in plan if to.exists() and to.read_bytes() != origin.read_bytes()]
    if clashes and not force:
        raise ConfigError(f"configs copy: {', '.join(clashes)} exists with other content: add --force to "
                          "overwrite it, or give another DEST")
    lines = []
    for origin, to in plan:
        if to.exists() and to.read_bytes() == origin.read_bytes():
            lines.append(f"unchanged {to}")
            continue
        to.parent.mkdir(parents=True, exist_ok=True)
        to.write_bytes(origin.read_bytes())
        lines.append(f"wrote {to}")
    return lines
