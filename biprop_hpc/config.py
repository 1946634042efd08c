"""The run configuration: one typed, validated object built from YAML files and then the command line.

Precedence: defaults below < `base:` files (recursively) < the config file < command-line flags.
Every key can be given on the command line as `--key-with-dashes VALUE`. Unknown keys and flags are
errors naming the closest valid key. The object is passed explicitly; nothing reads a global.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import io
import json
import re
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import biprop_hpc
from biprop_hpc.choices import (EDGE_LAYER_TYPES, FAN_SCALES, FILE_DATASETS, IMAGE_TREE_DATASETS, LAYER_TYPES,
                                LOADERS, WEIGHT_INITS)
from biprop_hpc.package_data import config_file

# Old names accepted for compatibility with the original code: name -> key.
# `prune_rate` was the original's name for the fraction of weights KEPT (not pruned).
ALIASES = {"prune_rate": "keep_ratio"}

CHOICES = {
    "optimizer": ("sgd", "adam"),
    "lr_schedule": ("cosine", "warmup_cosine", "multistep", "constant"),
    "weight_init": tuple(WEIGHT_INITS),
    "fan_scale": FAN_SCALES,
    "layer_type": LAYER_TYPES,
    "first_layer": EDGE_LAYER_TYPES,
    "last_layer": EDGE_LAYER_TYPES,
    "device": ("auto", "cpu", "cuda"),
    "amp": ("none", "bf16", "fp16"),
    "loader": LOADERS,
    "pruning": ("layerwise", "global"),
    "dataset": FILE_DATASETS + IMAGE_TREE_DATASETS,
    "augmentation": ("none", "augmix", "gaussian"),
}


# Keys that say where and how a run executes, not what it computes: every other key changes a run's results,
# so two runs that differ in any other key never share a run directory, and a resume refuses a change of one.
# (device and channels_last change results at most by floating-point rounding; loader at most by its
# resampling filter: the sample plan and augmentation parameters are the same for every loader. config_name is
# not one: it names what was run, and is part of the run's path anyway.)
EXECUTION_KEYS = ("name", "out", "device", "threads", "save_every", "resume", "new_name",
                  "log_interval", "log_seconds", "data", "loader", "loader_workers", "eval_batch_size",
                  "channels_last", "paper_top1", "hang_timeout")


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message says which and how to fix it."""


class CommonError(ConfigError):
    """A bad-input error that every rank of a run raises alike, because rank 0 found it and broadcast it to all
    (train.loop._on_root: the config, the run directory, the checkpoint to resume). Rank 0 reports it; the other
    ranks exit with the same code without a word."""


@dataclass
class Config:
    # --- run ---
    name: str = ""                 # run name, the run directory's last part; "" means seed<seed>
    out: str = "runs"              # runs go to <out>/<config_name>/keep=<k>/<name>/
    config_name: str = ""          # the runs' directory under out; "" means the config file's stem (or default)
    seed: int = 0                  # seeds the random weights, scores, data order and augmentation
    device: str = "auto"           # auto: CUDA when available, else CPU
    threads: int = 0               # torch CPU threads per process (0: torch's default)
    save_every: int = 0            # also keep checkpoints/epoch_<N>.pt every N epochs (0: never)
    resume: str = ""               # "", "auto" (the run directory's last.pt if present) or a checkpoint path
    pretrained: str = ""           # start from this checkpoint's scores and weights (ours or the original code's)
    new_name: bool = False         # if the run directory holds a run: use <name>_2, <name>_3, ... (else an error)
    log_interval: int = 50         # TensorBoard scalars (and, without a terminal, a progress line) every N steps
    log_seconds: float = 60.0      # no terminal: a progress line every log_interval steps or N s (0: steps only)
    amp: str = "none"              # mixed precision on CUDA: none | bf16 | fp16
    channels_last: bool = False    # NHWC memory format (faster convolutions on recent GPUs)
    # --- data ---
    dataset: str = "fashion-mnist" # read from its files, or an image tree (imagefolder, imagenet)
    data: str = ""                 # dataset directory; "" means the dataset's standard location
    val_fraction: float = 0.1      # held out from the training data to choose the best checkpoint
    train_subset: int = 0          # use only the first N training images (0: all); for quick runs and tests
    test_subset: int = 0           # evaluate only the first N test images (0: all)
    batch_size: int = 128          # PER PROCESS (rank); the global batch is batch_size * world size
    eval_batch_size: int = 512     # per process, for validation and test
    augment: bool = True           # the dataset's standard training augmentation (none for IDX sets)
    # "A Winning Hand"'s training augmentation on top of `augment`: none | augmix | gaussian (README: Augmentation)
    augmentation: str = "none"
    augmix_severity: int = 3       # AugMix: operation strength, 1-10 (the original's aug_severity)
    augmix_width: int = 3          # AugMix: chains mixed per view (the original's mixture_width)
    augmix_depth: int = -1         # AugMix: operations per chain; -1: 1 to 3 at random (the original's mixture_depth)
    augmix_alpha: float = 1.0      # AugMix: Dirichlet and Beta parameter of the mixing weights (the original fixed 1)
    augmix_all_ops: bool = False   # AugMix: add colour, contrast, brightness, sharpness (--all-augmix-augmentations)
    # AugMix: weight of the Jensen-Shannon consistency loss over the clean and two augmented views (12 as the
    # AugMix paper and the original's --jsd); 0: one AugMix view per sample, cross-entropy only
    jsd_weight: float = 12.0
    noise_std: float = 0.1         # gaussian: std of the noise added to [0, 1] pixels (the original's std_gauss)
    noise_fraction: float = 0.5    # gaussian: probability that an image is noised (the original's 1 - p_clean)
    # image trees (dataset imagefolder / imagenet): loader and preprocessing
    loader: str = "auto"           # auto (DALI when installed, else torch) | dali | dali-cpu | torch
    loader_workers: int = 4        # DALI threads / torch DataLoader worker processes per rank
    crop_size: int = 224           # training random-resized-crop and evaluation centre-crop size
    resize_size: int = 256         # evaluation: resize the shorter side to this, then centre crop
    random_area_min: float = 0.08  # training crops cover [random_area_min, 1] of the image area
    skip_bad_images: bool = False  # skip (and count) non-image files instead of stopping with an error
    # --- model ---
    model: str = "conv2"           # a model of the zoo: `biprop models` lists them
    width_mult: float = 1.0        # multiplies every layer's channels
    layer_type: str = "biprop"     # biprop: search a ticket; dense: train the same network's weights
    keep_ratio: float = 0.5        # fraction of each layer's weights KEPT (alias: prune_rate)
    # layerwise: every BIPROP layer keeps keep_ratio of its weights | global: one |score| threshold over all
    # BIPROP layers together keeps keep_ratio of all their weights (layers keep different fractions; README)
    pruning: str = "layerwise"
    prune_rate_epoch: int = 10     # global, keep_ratio <= 0.5: epochs over which the kept fraction decays from 0.5
    weight_init: str = "kn"        # random weights: kn normal, sc signed constant, uc constant; u...: fan unscaled
    # what kn/sc/uc multiply the fan by: kept_fraction (k, our correction) | pruned_fraction (1 - k, the
    # original's formula, in the paper configs) | none; ukn/usc/uuc always use the plain fan
    fan_scale: str = "kept_fraction"
    first_layer: str = "biprop"    # the first layer: biprop | trained (dense, learned) | frozen (dense, random)
    last_layer: str = "biprop"     # the last layer: as first_layer
    learn_batchnorm: bool = False  # learn BN affine parameters (the paper's "+BN")
    # --- optimisation ---
    optimizer: str = "sgd"         # sgd (momentum, nesterov) or adam (adam_betas)
    lr: float = 0.1                # learning rate (scaled when lr_reference_batch > 0)
    momentum: float = 0.9          # SGD momentum
    nesterov: bool = False         # SGD with Nesterov momentum
    weight_decay: float = 1e-4     # on the scores and learned dense weights; on 1-D ones as bn_weight_decay says
    bn_weight_decay: bool = False  # weight decay on 1-D params (BN affine) too, as the original's SGD did
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's two betas
    lr_schedule: str = "cosine"    # per epoch; warmup_cosine uses warmup_epochs, multistep milestones, lr_gamma
    warmup_epochs: int = 0         # warmup_cosine: epochs of linear warmup
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1          # multistep: the lr factor at each milestone
    label_smoothing: float = 0.0   # cross-entropy label smoothing, in [0, 1)
    epochs: int = 10               # epochs to train
    lr_reference_batch: int = 0    # > 0: lr is per this many images, scaled by global batch / this (Goyal et al.)
    # --- distributed (Horovod) ---
    fp16_allreduce: bool = False   # compress gradients to fp16 for the allreduce
    sync_batchnorm: bool = False   # BN batch statistics over the global batch (Horovod SyncBatchNorm)
    backward_passes_per_step: int = 1  # gradient accumulation: backward passes per optimizer step
    hang_timeout: float = 600.0    # a rank with no progress for N s ends the job: exit 124 (0: never); see README
    # --- metadata (not used by training) ---
    paper_top1: float = 0.0        # the paper's reported test top-1 for this experiment (0: none), shown by results

    def validate(self) -> "Config":
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(choices)}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio: {self.keep_ratio} must be in (0, 1]; it is the fraction of "
                              "weights KEPT (the original's prune_rate means the same), e.g. --keep-ratio 0.5")
        if (self.fan_scale == "pruned_fraction" and self.keep_ratio == 1.0 and self.layer_type == "biprop"
                and WEIGHT_INITS[self.weight_init][1]):
            raise ConfigError(f"fan_scale pruned_fraction scales the fan of {self.weight_init} by 1 - keep_ratio, "
                              "which is 0 at keep_ratio 1: use --fan-scale kept_fraction or none, or a keep "
                              "ratio below 1")
        if self.pruning == "global" and self.layer_type != "biprop":
            raise ConfigError(f"pruning global prunes BIPROP layers, but layer_type is {self.layer_type}: use "
                              "--layer-type biprop, or --pruning layerwise for a dense run")
        if self.prune_rate_epoch < 0:
            raise ConfigError(f"prune_rate_epoch: must be >= 0 (the epochs over which global pruning's kept "
                              f"fraction decays from 0.5 to keep_ratio; 0: keep_ratio from the start), "
                              f"got {self.prune_rate_epoch}")
        if (self.pruning == "global" and self.keep_ratio <= 0.5 and self.epochs <= self.prune_rate_epoch):
            raise ConfigError(f"pruning global: the kept fraction decays from 0.5 over prune_rate_epoch "
                              f"{self.prune_rate_epoch} epochs and reaches keep_ratio {self.keep_ratio:g} in epoch "
                              f"{self.prune_rate_epoch + 1}, but epochs is {self.epochs}: a ticket must keep "
                              f"keep_ratio, so give --epochs above {self.prune_rate_epoch} or a smaller "
                              "--prune-rate-epoch (0: keep_ratio from the start)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: {self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing: {self.label_smoothing} must be in [0, 1)")
        if self.hang_timeout < 0:
            raise ConfigError(f"hang_timeout: must be >= 0 seconds (0: no watchdog), got {self.hang_timeout}")
        if self.log_seconds < 0:
            raise ConfigError(f"log_seconds: must be >= 0 (0: progress lines every log_interval steps only), "
                              f"got {self.log_seconds}")
        for key in ("epochs", "batch_size", "eval_batch_size", "log_interval", "backward_passes_per_step",
                    "crop_size", "resize_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "width_mult"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        self._validate_augmentation()
        if not 0.0 < self.random_area_min <= 1.0:
            raise ConfigError(f"random_area_min: {self.random_area_min} must be in (0, 1]")
        for key in ("save_every", "train_subset", "test_subset", "warmup_epochs", "threads", "loader_workers",
                    "lr_reference_batch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.lr_schedule == "warmup_cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        if self.lr_schedule == "multistep" and not self.milestones:
            raise ConfigError("lr_schedule multistep needs milestones, e.g. --milestones 30 60 90")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas: give two numbers, got {self.adam_betas}")
        return self

    def _validate_augmentation(self) -> None:
        if not 1 <= self.augmix_severity <= 10:
            raise ConfigError(f"augmix_severity: {self.augmix_severity} must be in 1..10 (AugMix's levels; the "
                              "original's default is 3)")
        if self.augmix_width < 1:
            raise ConfigError(f"augmix_width: must be >= 1 chains, got {self.augmix_width}")
        if self.augmix_depth == 0 or self.augmix_depth < -1:
            raise ConfigError(f"augmix_depth: must be >= 1 operations per chain, or -1 for 1 to 3 at random; "
                              f"got {self.augmix_depth}")
        if self.augmix_alpha <= 0:
            raise ConfigError(f"augmix_alpha: must be > 0, got {self.augmix_alpha}")
        if self.jsd_weight < 0:
            raise ConfigError(f"jsd_weight: must be >= 0 (0: no consistency loss), got {self.jsd_weight}")
        if self.noise_std <= 0:
            raise ConfigError(f"noise_std: must be > 0, got {self.noise_std}")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ConfigError(f"noise_fraction: {self.noise_fraction} must be in [0, 1] (the probability that a "
                              "training image is noised)")
        if (self.augmentation != "none" and self.dataset in IMAGE_TREE_DATASETS
                and self.loader in ("dali", "dali-cpu")):
            raise ConfigError(f"augmentation {self.augmentation} runs in the torch loader, not in DALI's pipeline: "
                              f"use --loader torch (loader: torch), or augmentation: none with loader "
                              f"{self.loader}")

    def run_dir(self) -> Path:
        """Where this run lives: <out>/<config_name>/keep=<k>/<name>/."""
        return Path(self.out) / self.config_name / f"keep={self.keep_ratio:g}" / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict, origin: str = "config") -> "Config":
        return cls(**_checked(values, origin)).validate()


# A run name (and a config's name) is one directory of the run's path, also inside job scripts and file names.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+,-]*")


def check_path_component(key: str, value: str) -> None:
    if value and not SAFE_NAME.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a valid run directory name: use one path component of letters, "
                          "digits and . _ = + , - starting with a letter or digit (no '/', spaces or newlines); "
                          "put a directory into --out instead, e.g. --out runs/exp --name seed0")


# Together they make the global batch, which is what changes results: each may change if the product does not.
GLOBAL_BATCH_KEYS = ("batch_size", "backward_passes_per_step")


def result_differences(stored: dict, requested: "Config") -> list[tuple[str, object, object]]:
    """(key, stored value, requested value) for every result-changing key whose values differ.

    `stored` is the config dict a checkpoint or archive holds; keys it lacks (written by an older version)
    take their defaults, which always mean what that version did. The batch size is compared as the global
    batch (batch_size x ranks x backward_passes_per_step) by the caller, which knows the ranks.
    """
    known = {key: value for key, value in stored.items() if key in FIELDS}
    then = Config(**_checked({**known, "name": known.get("name") or "x"}, "stored config"))
    return [(key, getattr(then, key), getattr(requested, key)) for key in FIELDS
            if key not in EXECUTION_KEYS and key not in GLOBAL_BATCH_KEYS
            and getattr(then, key) != getattr(requested, key)]


def describe_differences(differences: list[tuple[str, object, object]]) -> str:
    """`lr 0.1 -> 0.01, weight_decay 0.0001 -> 0.0`: stored value first."""
    return ", ".join(f"{key} {old!r} -> {new!r}" if isinstance(old, str) and key in FIELDS
                     else f"{key} {old} -> {new}" for key, old, new in differences)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def _closest(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS) + list(ALIASES), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _checked(values: dict, origin: str) -> dict:
    """Rename aliases, reject unknown keys, and coerce/verify each value's type."""
    out = {}
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if key not in FIELDS:
            raise ConfigError(f"{origin}: unknown key {key!r}{_closest(key)}")
        out[key] = _coerce(key, value, origin)
    return out


def _coerce(key: str, value, origin: str):
    kind = _TYPES[key]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is str:
            return "" if value is None else str(value)  # `data:` left empty in YAML means ""
        if kind in (int, float):
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return kind(value)
        item = typing.get_args(kind)[0]
        return [item(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}") from None


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """The keys of a YAML config, with its `base:` file(s) (relative to it) merged underneath."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give a YAML file or the name of a packaged config "
                          "(`biprop configs list`), e.g. configs/fashion-mnist/conv2_mpt1-32.yaml")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `base:` files form a cycle")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    bases = values.pop("base", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged.update(read_yaml(path.parent / base, _seen + (path.resolve(),)))
    merged.update(_checked(values, str(path)))
    return merged


@functools.lru_cache(maxsize=1)
def field_comments() -> dict[str, str]:
    """Each Config key's comment in the class above, the one source of its --help text: the comment that ends
    the key's line, else the comment lines right above it (not a `# --- section ---` line)."""
    module = Path(__file__).read_text()  # (inspect.getsource(Config) parses the whole module: slow)
    start = module.index("\nclass Config:")
    source = module[start:module.index("\n    def ", start)] + "\n"
    comments = {token.start[0]: token.string.lstrip("# ").rstrip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    texts = {}
    for number, line in enumerate(lines, start=1):
        declared = re.match(r"    (\w+)\s*:", line)
        if not declared or declared.group(1) not in FIELDS:
            continue
        above = []
        while (number - 1 - len(above) in comments and lines[number - 2 - len(above)].lstrip().startswith("#")
               and not lines[number - 2 - len(above)].lstrip().startswith("# ---")):
            above.insert(0, comments[number - 1 - len(above)])
        texts[declared.group(1)] = comments.get(number) or " ".join(above)
    return texts


def default_text(value) -> str:
    """A default as the command line (and YAML) would write it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value) if value != "" else '""'


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--key-with-dashes` flag per config key (and alias), its help the key's comment in Config, its
    default and its allowed values; values stay None unless given (validation is Config's, one place)."""
    group = parser.add_argument_group("config overrides (any key of the YAML config)")
    comments = field_comments()
    defaults = Config().to_dict()
    for name in list(FIELDS) + list(ALIASES):
        key = ALIASES.get(name, name)
        kind = _TYPES[key]
        flag = "--" + name.replace("_", "-")
        text = comments[key] if key == name else f"the original code's name of --{key.replace('_', '-')}"
        help_text = f"{text} (default: {default_text(defaults[key])})".replace("%", "%%")
        if kind is bool:
            action = group.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                                        help=help_text)
        elif typing.get_origin(kind) is list:
            action = group.add_argument(flag, dest=name, default=None, nargs="*", metavar=key.upper(),
                                        help=help_text)
        else:
            metavar = "{" + ",".join(CHOICES[key]) + "}" if key in CHOICES else key.upper()
            action = group.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)
        if key in CHOICES:  # shell completion offers them (argcomplete calls an action's `completer`)
            action.completer = functools.partial(_offer, CHOICES[key])


def _offer(choices: tuple, **_context) -> tuple:
    return choices


def build_config(config_path: str | None, overrides: dict) -> Config:
    """Defaults < YAML (with bases) < command-line `overrides` (keys with None values are ignored)."""
    config_path = config_path and config_file(config_path)  # a file, or a packaged config's name
    values = read_yaml(config_path) if config_path else {}
    if config_path:
        values.setdefault("config_name", Path(config_path).stem)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(_checked(given, "command line"))
    values.setdefault("config_name", "default")
    if not values.get("name"):
        values["name"] = f"seed{values.get('seed', 0)}"
    cfg = Config.from_dict(values)
    for key in ("name", "config_name"):  # checked for new runs only: stored configs are read as they are
        check_path_component(key, getattr(cfg, key))
    return cfg


def config_yaml(cfg: Config, config_path: str | None = None) -> str:
    """`cfg` as a YAML config (`train --print-config`) that, given as --config, builds `cfg` again. Two values
    that follow from others are left out while they do: config_name, the stem of the config file (so a copy
    under another name runs as that name), and name, seed<seed>."""
    values = cfg.to_dict()
    derived = {"config_name": Path(config_path).stem if config_path else "default", "name": f"seed{cfg.seed}"}
    left_out = [key for key, value in derived.items() if values[key] == value]
    header = (f"# biprop-hpc {biprop_hpc.__version__}: the merged config of `biprop train"
              f"{' --config ' + config_path if config_path else ''} ...`\n")
    if left_out:
        header += "# left out, as they follow from the file's name and the seed: " + ", ".join(
            f"{key} {values.pop(key)}" for key in left_out) + "\n"
    return header + yaml.safe_dump(values, sort_keys=False, default_flow_style=None, width=1000)


def unknown_flag_error(flag: str) -> str:
    if not flag.startswith("-"):  # argparse leaves a command's positional arguments split by options over
        return (f"unexpected argument {flag!r}: give a command's positional arguments (e.g. results' PATHs) "
                "together, before or after its options")
    key = flag.lstrip("-").split("=")[0].replace("-", "_")
    hint = _closest(key)
    if hint:
        close = difflib.get_close_matches(key, list(FIELDS) + list(ALIASES), n=1, cutoff=0.5)[0]
        hint = f"; did you mean --{close.replace('_', '-')}?"
    return f"unknown option {flag}{hint}"
