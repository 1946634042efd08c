"""Every paper config (configs/cifar10/, configs/imagenet/) trains with the original's recipe for its result.

The facts are ../shared/fixtures/original-biprop/recipes.json: the original code's recipe for each result its
README reports and for each Conv-sweep config, read from its YAML files (chrundle/biprop configs/ at f709fc5) and
argument defaults (args.py). `as_original` translates one of our configs into the original's terms, written once
here; each paper config must then equal its recipe key by key, so no config can drift from the recipe it claims.
Configs for which the fixture has no recipe (a signed-constant sibling of a kn row, ...) follow a named recipe
with the differences listed in VARIANTS.

Also here: the two new recipe keys at work (fan_scale in the built model, bn_weight_decay in the optimizer's
parameter groups), and their defaults meaning what the code did before they existed.
"""
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from biprop_hpc.config import EXECUTION_KEYS, Config, ConfigError, build_config
from biprop_hpc.nn import biprop_layers
from biprop_hpc.nn.init import WEIGHT_INITS, weight_std
from biprop_hpc.train.loop import make_optimizer, model_from_config
from biprop_hpc.train.schedule import lr_at_epoch

ROOT = Path(__file__).parent.parent
SHARED = Path(os.environ.get("BIPROP_SHARED", ROOT.parent / "shared"))
RECIPES_FILE = SHARED / "fixtures/original-biprop/recipes.json"
PAPER_DIRS = ("cifar10", "imagenet")

# ------------------------------------------------------------------ the mapping, original -> ours, written once

# The original's architecture (with its width_mult) -> our model (with ours). Its Wide_VGG_Small at width_mult 10
# scales 16/32/64 to 160/320/640, which is our vgg_small_bin at 1.0 (tests/test_models_original.py).
ARCHS = {("VGG_Small", 1.0): ("vgg_small", 1.0), ("Wide_VGG_Small", 10): ("vgg_small_bin", 1.0),
         ("cResNet18", 1.0): ("resnet18_cifar", 1.0), ("cResNet18_BinAct", 1.0): ("resnet18_cifar_bin", 1.0),
         ("WideResNet50_2", 1.0): ("wide_resnet50_2", 1.0),
         ("WideResNet34_2_BinAct", 1.0): ("wide_resnet34_2_bin", 1.0),
         **{(f"Conv{n}", 1.0): (f"conv{n}", 1.0) for n in (2, 4, 6, 8)},
         **{(f"Conv{n}_BinAct", 1.0): (f"conv{n}_bin", 1.0) for n in (2, 4, 6, 8)}}
OUR_ARCHS = {ours: theirs for theirs, ours in ARCHS.items()}
# The original's init -> the distribution of ours (biprop_hpc.nn.init.WEIGHT_INITS).
INITS = {"normal": "kaiming_normal", "signed_constant": "signed_constant", "constant": "unsigned_constant"}
# The original's scale_fan multiplies the fan by (1 - prune_rate), its prune_rate being the KEPT fraction
# (utils/builder.py `_init_conv`): that is our fan_scale pruned_fraction; no scale_fan is the plain fan.
SCALE_FAN = {"pruned_fraction": True, "none": False, "kept_fraction": "fan x k (not a formula of the original)"}
SCHEDULES = {"cosine": "cosine_lr", "warmup_cosine": "cosine_lr", "constant": "constant_lr",
             "multistep": "multistep_lr"}
# The original's sweep script (mpt_cifar_script.sh) ran these files with --epochs 250 (their YAML says 100).
SWEEP_SCRIPT_EPOCHS = {**{f"conv{n}_kn_unsigned": 250 for n in (2, 4, 6, 8)},
                       **{f"conv{n}_BinAct_kn_unsigned": 250 for n in (2, 4, 6, 8)}}

# Our paper config -> the recipe (a key of recipes.json) it reproduces.
PAPER_CONFIGS = {
    "cifar10/vgg_small_mpt1-32_kn": "cifar10 VGG-Small MPT-1/32 kn, 5% kept (91.48)",
    "cifar10/resnet18_mpt1-32_kn": "cifar10 ResNet-18 MPT-1/32 kn, 20% kept (94.66)",
    "cifar10/resnet18_mpt1-32_kn_bn": "cifar10 ResNet-18 MPT-1/32 kn +BN, 20% kept (94.8)",
    "cifar10/vgg_small_bin_mpt1-1_kn": "cifar10 VGG-Small x1.25 MPT-1/1 kn, 25% kept (89.11)",
    "cifar10/vgg_small_bin_mpt1-1_kn_bn": "cifar10 VGG-Small x1.25 MPT-1/1 kn +BN, 25% kept (91.9)",
    "imagenet/wrn50-2_mpt1-32_sc": "imagenet WRN-50-2 MPT-1/32 signed constant, 20% kept (72.67)",
    "imagenet/wrn50-2_mpt1-32_sc_bn": "imagenet WRN-50-2 MPT-1/32 signed constant +BN, 20% kept (74.03)",
    "imagenet/wrn34-2_mpt1-1_kn": "imagenet WRN-34-2 MPT-1/1 kn, 40% kept (45.06)",
    "imagenet/wrn34-2_mpt1-1_kn_bn": "imagenet WRN-34-2 MPT-1/1 kn +BN, 40% kept (52.07)",
    **{f"cifar10/conv{n}_mpt1-32_kn": f"cifar10 conv{n}_kn_unsigned" for n in (2, 4, 6, 8)},
    **{f"cifar10/conv{n}_mpt1-32_sc": f"cifar10 conv{n}_sc_unsigned" for n in (2, 4, 6)},
    **{f"cifar10/conv{n}_mpt1-1_kn": f"cifar10 conv{n}_BinAct_kn_unsigned" for n in (2, 4, 6, 8)},
    **{f"cifar10/conv{n}_mpt1-1_sc": f"cifar10 conv{n}_BinAct_sc_unsigned" for n in (4, 6, 8)},
}
SC = {"init": "signed_constant"}
# Our configs with no recipe in the fixture -> (the recipe they follow, what differs, in the original's terms).
VARIANTS = {
    # the original's vgg_small_sc.yml: the kn file's recipe with signed constant (scale_fan true)
    "cifar10/vgg_small_mpt1-32_sc": ("cifar10 VGG-Small MPT-1/32 kn, 5% kept (91.48)", SC),
    # ours: signed-constant siblings of the paper's kn rows
    "cifar10/resnet18_mpt1-32_sc": ("cifar10 ResNet-18 MPT-1/32 kn, 20% kept (94.66)", SC),
    "cifar10/resnet18_mpt1-32_sc_bn": ("cifar10 ResNet-18 MPT-1/32 kn +BN, 20% kept (94.8)", SC),
    "cifar10/vgg_small_bin_mpt1-1_sc": ("cifar10 VGG-Small x1.25 MPT-1/1 kn, 25% kept (89.11)", SC),
    "cifar10/vgg_small_bin_mpt1-1_sc_bn": ("cifar10 VGG-Small x1.25 MPT-1/1 kn +BN, 25% kept (91.9)", SC),
    # the original's resnet18-BinAct-kn-unsigned.yaml: Adam lr 0.1, cosine, 100 epochs, batch 256, kn, scale_fan
    "cifar10/resnet18_bin_mpt1-1_kn": ("cifar10 VGG-Small x1.25 MPT-1/1 kn, 25% kept (89.11)",
                                       {"arch": "cResNet18_BinAct", "width_mult": 1.0, "batch_size": 256}),
    "cifar10/resnet18_bin_mpt1-1_sc": ("cifar10 VGG-Small x1.25 MPT-1/1 kn, 25% kept (89.11)",
                                       {"arch": "cResNet18_BinAct", "width_mult": 1.0, "batch_size": 256, **SC}),
    # ours: the original has no conv8 sc and no conv2 BinAct sc file; their family's sc recipe on that depth
    "cifar10/conv8_mpt1-32_sc": ("cifar10 conv6_sc_unsigned", {"arch": "Conv8"}),
    "cifar10/conv2_mpt1-1_sc": ("cifar10 conv4_BinAct_sc_unsigned", {"arch": "Conv2_BinAct"}),
}


def load_recipes() -> dict:
    if not RECIPES_FILE.is_file():
        pytest.fail(f"the recipes fixture is missing: {RECIPES_FILE} (set BIPROP_SHARED to the directory holding "
                    "fixtures/original-biprop)")
    return json.loads(RECIPES_FILE.read_text())["recipes"]


def recipe_key(recipes: dict, prefix: str) -> str:
    """The full key of the recipe that `prefix` names (the Conv-sweep keys go on with the keep ratios swept)."""
    keys = [key for key in recipes if key == prefix or key.startswith(prefix + " (")]
    assert len(keys) == 1, f"{prefix!r} names {len(keys)} recipes of {RECIPES_FILE}"
    return keys[0]


def original_lr(lr_policy: str, lr: float, warmup: int, epochs: int, epoch: int) -> float:
    """The original's lr at 0-based `epoch`, set once per epoch (utils/schedulers.py: cosine_lr and constant_lr,
    linear warmup `_warmup_lr` = lr * (epoch + 1) / warmup_length while epoch < warmup_length)."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    if lr_policy == "constant_lr":
        return lr
    assert lr_policy == "cosine_lr", lr_policy
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) * lr


def from_recipe(recipe: dict) -> dict:
    """A recipe of recipes.json in the terms `as_original` uses (it also says what the original did implicitly)."""
    stem = Path(recipe["file"]).stem
    epochs = SWEEP_SCRIPT_EPOCHS.get(stem, recipe["epochs"])
    warmup = recipe.get("warmup_length", 0)
    terms = {
        "arch": (recipe["arch"], recipe.get("width_mult", 1.0)),
        "layers": "SubnetConv everywhere",            # no first_layer_type / dense layers in these files
        "optimizer": recipe["optimizer"], "lr": recipe["lr"], "lr_policy": recipe["lr_policy"],
        "warmup_length": warmup, "epochs": epochs,
        "lr_by_epoch": [round(original_lr(recipe["lr_policy"], recipe["lr"], warmup, epochs, e), 12)
                        for e in range(epochs)],
        "batch_size": recipe["batch_size"], "label_smoothing": recipe["label_smoothing"],
        "bn_type": recipe["bn_type"], "learn_batchnorm": recipe["learn_batchnorm"],
        "init": recipe["init"], "scale_fan": recipe["scale_fan"],
        "weight_decay_applied": recipe["weight_decay_applied"],
        "bn_weight_decay_applied": recipe["bn_weight_decay_applied"],
    }
    if recipe["optimizer"] == "sgd":
        # args.py defaults: nesterov false, no_bn_decay false (BN affine parameters are decayed if learned)
        terms.update(momentum=recipe["momentum"], nesterov=False, no_bn_decay=False)
    else:
        terms.update(adam_betas=(0.9, 0.999))          # get_optimizer passes Adam only the lr: torch's betas
    if "keep_ratio" in recipe:
        terms["keep_ratio"] = recipe["keep_ratio"]
    return terms


def as_original(cfg: Config, keys) -> dict:
    """Our config in the original's terms (the keys `from_recipe` gives)."""
    distribution, scaled = WEIGHT_INITS[cfg.weight_init]
    warmup = cfg.warmup_epochs if cfg.lr_schedule == "warmup_cosine" else 0
    terms = {
        "arch": OUR_ARCHS.get((cfg.model, cfg.width_mult), (cfg.model, cfg.width_mult)),
        "layers": ("SubnetConv everywhere" if (cfg.layer_type, cfg.first_layer, cfg.last_layer) == ("biprop",) * 3
                   else f"{cfg.layer_type} (first {cfg.first_layer}, last {cfg.last_layer})"),
        "optimizer": cfg.optimizer, "lr": cfg.lr, "lr_policy": SCHEDULES[cfg.lr_schedule],
        "warmup_length": warmup, "epochs": cfg.epochs,
        # at the global batch the lr is given for, where our lr scale is 1
        "lr_by_epoch": [round(lr_at_epoch(cfg.lr_schedule, cfg.lr, e, cfg.epochs, cfg.warmup_epochs,
                                          cfg.milestones, cfg.lr_gamma), 12) for e in range(cfg.epochs)],
        # the global batch the recipe's lr belongs to: lr_reference_batch when the lr scales with the batch (the
        # ImageNet configs; README), else batch_size on one rank (the CIFAR configs)
        "batch_size": cfg.lr_reference_batch or cfg.batch_size,
        "label_smoothing": cfg.label_smoothing,
        "bn_type": "AffineBatchNorm" if cfg.learn_batchnorm else "NonAffineBatchNorm",
        "learn_batchnorm": cfg.learn_batchnorm,
        "init": INITS[distribution], "scale_fan": SCALE_FAN[cfg.fan_scale] if scaled else False,
        "weight_decay_applied": cfg.weight_decay,
        "bn_weight_decay_applied": cfg.learn_batchnorm and cfg.bn_weight_decay and cfg.weight_decay > 0,
        "momentum": cfg.momentum, "nesterov": cfg.nesterov, "no_bn_decay": not cfg.bn_weight_decay,
        "adam_betas": tuple(cfg.adam_betas), "keep_ratio": cfg.keep_ratio,
    }
    return {key: terms[key] for key in keys}


def recipe_differences(cfg: Config, recipe: dict) -> list[str]:
    """`key: ours X, original Y` for every setting where `cfg` differs from `recipe`."""
    theirs = from_recipe(recipe)
    ours = as_original(cfg, theirs)
    return [f"{key}: ours {ours[key]!r}, original {theirs[key]!r}" for key in theirs if ours[key] != theirs[key]]


def paper_config_names() -> list[str]:
    return sorted(f"{path.parent.name}/{path.stem}" for folder in PAPER_DIRS
                  for path in (ROOT / "configs" / folder).glob("*.yaml") if not path.stem.startswith("_"))


def claimed_recipe(name: str, recipes: dict) -> dict:
    """The recipe config `name` must follow: its own, or a VARIANTS base with the listed differences."""
    if name in PAPER_CONFIGS:
        return recipes[recipe_key(recipes, PAPER_CONFIGS[name])]
    base, changes = VARIANTS[name]
    return {**recipes[recipe_key(recipes, base)], **changes}


# ------------------------------------------------------------------------------------------------ tests

def test_every_paper_config_claims_a_recipe_and_every_recipe_a_config():
    recipes = load_recipes()
    assert set(paper_config_names()) == set(PAPER_CONFIGS) | set(VARIANTS)
    assert not set(PAPER_CONFIGS) & set(VARIANTS)
    claimed = [recipe_key(recipes, prefix) for prefix in PAPER_CONFIGS.values()]
    assert sorted(claimed) == sorted(recipes), "each recipe of the fixture is some config's, exactly once"
    for base, _ in VARIANTS.values():
        recipe_key(recipes, base)


@pytest.mark.parametrize("name", paper_config_names())
def test_paper_config_is_the_originals_recipe(name):
    cfg = build_config(str(ROOT / "configs" / f"{name}.yaml"), {})
    assert recipe_differences(cfg, claimed_recipe(name, load_recipes())) == []


@pytest.mark.parametrize("name", sorted(n for n in PAPER_CONFIGS if re.search(r"\(\d", PAPER_CONFIGS[n])))
def test_paper_config_carries_its_rows_reported_accuracy(name):
    reported = float(re.search(r"\((\d+(?:\.\d+)?)\)$", PAPER_CONFIGS[name]).group(1))
    assert build_config(str(ROOT / "configs" / f"{name}.yaml"), {}).paper_top1 == reported


@pytest.mark.parametrize("name", paper_config_names())
def test_paper_config_differs_on_purpose_only_where_the_readme_says(name):
    # README "## Configs": a held-out validation split; bf16 autocast on ImageNet only; batch_size per rank with
    # the ImageNet lr per 256 images (128 per GPU by default), the CIFAR-10 lr fixed
    cfg = build_config(str(ROOT / "configs" / f"{name}.yaml"), {})
    imagenet = name.startswith("imagenet/")
    assert cfg.val_fraction == (0.01 if imagenet else 0.1)
    assert cfg.amp == ("bf16" if imagenet else "none")
    assert (cfg.lr_reference_batch, cfg.batch_size if imagenet else 0) == ((256, 128) if imagenet else (0, 0))
    if name in PAPER_CONFIGS:   # its comment names the original's file
        original_file = Path(claimed_recipe(name, load_recipes())["file"]).name
        assert original_file in (ROOT / "configs" / f"{name}.yaml").read_text()


def test_readme_fan_scale_numbers():
    # README: std relative to the plain fan's, 1 / sqrt(factor): k = 0.2 -> 1.12x (original) and 2.24x
    # (corrected, twice the original's); k = 0.5 equal; k = 0.05 -> 1.03x and 4.47x
    w = torch.empty(64, 100)

    def ratio(fan_scale, k):
        return weight_std(w, k, True, fan_scale=fan_scale) / weight_std(w, k, True, fan_scale="none")
    assert (round(ratio("pruned_fraction", 0.2), 2), round(ratio("kept_fraction", 0.2), 2)) == (1.12, 2.24)
    assert ratio("kept_fraction", 0.2) / ratio("pruned_fraction", 0.2) == pytest.approx(2)
    assert ratio("kept_fraction", 0.5) == pytest.approx(ratio("pruned_fraction", 0.5))
    assert (round(ratio("pruned_fraction", 0.05), 2), round(ratio("kept_fraction", 0.05), 2)) == (1.03, 4.47)


def test_recipe_check_catches_each_kind_of_drift():
    # the check itself can fail: one changed setting of a correct config is reported, named
    recipes = load_recipes()
    cfg = build_config(str(ROOT / "configs/imagenet/wrn50-2_mpt1-32_sc_bn.yaml"), {})
    recipe = claimed_recipe("imagenet/wrn50-2_mpt1-32_sc_bn", recipes)
    cases = {"fan_scale": ("kept_fraction", "scale_fan"), "bn_weight_decay": (False, "bn_weight_decay_applied"),
             "warmup_epochs": (4, "lr_by_epoch"), "lr_reference_batch": (512, "batch_size"),
             "optimizer": ("adam", "optimizer"), "label_smoothing": (0.0, "label_smoothing"),
             "first_layer": ("trained", "layers"), "adam_betas": ([0.9, 0.99], None)}
    for key, (value, reported) in cases.items():
        found = recipe_differences(dataclasses.replace(cfg, **{key: value}), recipe)
        if reported is None:    # adam_betas do not matter to an SGD recipe
            assert found == []
        else:
            assert any(line.startswith(reported + ":") for line in found), (key, found)


# ------------------------------------------------------------------- fan_scale and bn_weight_decay at work

def test_new_keys_default_to_what_the_code_did_before_them():
    # configs stored before these keys existed are rebuilt with the defaults: fan x k, 1-D parameters exempt
    cfg = Config()
    assert (cfg.fan_scale, cfg.bn_weight_decay) == ("kept_fraction", False)
    stored = {key: value for key, value in build_config(None, {}).to_dict().items()
              if key not in ("fan_scale", "bn_weight_decay")}
    assert Config.from_dict(stored) == build_config(None, {})
    assert "fan_scale" not in EXECUTION_KEYS and "bn_weight_decay" not in EXECUTION_KEYS


@pytest.mark.parametrize("fan_scale,factor", [("pruned_fraction", 0.8), ("kept_fraction", 0.2), ("none", 1.0)])
def test_model_from_config_builds_layers_with_the_configs_fan_scale(fan_scale, factor):
    # conv2 (conv 3x3 x2, FC 256-256-10) at k = 0.2, signed constant: |W| = sqrt(2 / (fan_in x factor)) exactly;
    # the dense first layer draws from the plain fan whatever fan_scale says
    cfg = build_config(None, {"model": "conv2", "keep_ratio": 0.2, "weight_init": "sc", "fan_scale": fan_scale,
                              "first_layer": "trained"})
    model = model_from_config(cfg, in_channels=3, num_classes=10, image_size=32)
    layers = biprop_layers(model)
    assert len(layers) == 4
    for name, layer in layers:
        fan_in = layer.weight[0].numel()
        expected = torch.full_like(layer.weight, math.sqrt(2 / (fan_in * factor)))
        torch.testing.assert_close(layer.weight.abs(), expected, rtol=1e-6, atol=0, msg=name)
    first = next(m for m in model.modules() if type(m) is nn.Conv2d)
    torch.testing.assert_close(first.weight.abs(), torch.full_like(first.weight, math.sqrt(2 / 27)), rtol=1e-6, atol=0)


def test_pruned_fraction_at_keep_ratio_one_is_a_clear_error():
    with pytest.raises(ConfigError, match="fan_scale pruned_fraction.*keep_ratio 1.*kept_fraction or none"):
        build_config(None, {"keep_ratio": 1.0, "weight_init": "kn", "fan_scale": "pruned_fraction"})
    build_config(None, {"keep_ratio": 1.0, "weight_init": "ukn", "fan_scale": "pruned_fraction"})  # plain fan
    with pytest.raises(ConfigError, match="fan_scale: 'pruned' is not one of kept_fraction, pruned_fraction, none"):
        build_config(None, {"fan_scale": "pruned"})


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(param): group["weight_decay"] for group in optimizer.param_groups for param in group["params"]}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("bn_weight_decay", [False, True])
def test_bn_weight_decay_shows_in_the_optimizers_parameter_groups(optimizer, bn_weight_decay):
    cfg = build_config(None, {"model": "conv4_bin", "learn_batchnorm": True, "weight_decay": 5e-4,
                              "optimizer": optimizer, "bn_weight_decay": bn_weight_decay})
    model = model_from_config(cfg, in_channels=3, num_classes=10, image_size=32)
    decay = _decay_of(make_optimizer(cfg, model))
    bn = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
    scores = [layer.scores for _, layer in biprop_layers(model)]
    assert bn and scores
    assert set(decay) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {decay[id(p)] for p in scores} == {5e-4}
    assert {decay[id(p)] for p in bn} == ({5e-4} if bn_weight_decay else {0.0})
