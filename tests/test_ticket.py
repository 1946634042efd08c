"""Tickets: export a run's found network as a small file, rebuild it from the file alone, and get the same
network (W_eff bit for bit) and the same metrics; plain PyTorch and ONNX exports; bad files are clear errors.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_tiny_dataset
import ticket_damage as damage

from biprop_hpc.cli import main as cli_main
from biprop_hpc.config import ConfigError, build_config
from biprop_hpc.dist import Local
from biprop_hpc.nn import BinaryActivation, BipropMixin, biprop_layers
from biprop_hpc.nn.layers import binary_masked_weight
from biprop_hpc.ticket import (SCHEMA_VERSION, TicketError, dense_ternary, evaluate_ticket, export_ticket, load, read,
                               write_ticket)
from biprop_hpc.ticket.export import build, records, sizes, ticket_from_model
from biprop_hpc.ticket.pretrained import load_pretrained
from biprop_hpc.train import Run, evaluate_checkpoint, train
from biprop_hpc.train.checkpoint import load_checkpoint
from biprop_hpc.train.loop import model_from_config

ROOT = Path(__file__).parent.parent
ORIGINAL = Path(os.environ.get("BIPROP_SHARED", ROOT.parent / "shared")) / "fixtures/original-biprop/conv4_k0.5.pth"
# MPT-1/1 with BN (1-D and 2-D), MPT-1/32 with BN, and a ResNet with learned BN and dense first/last layers.
MODELS = {
    "conv2_bin": {"width_mult": 0.25},
    "vgg_small": {"width_mult": 0.125},
    "resnet18_cifar": {"width_mult": 0.125, "learn_batchnorm": True, "first_layer": "trained", "last_layer": "frozen",
                       "keep_ratio": 0.3},
}


def tiny_config(out, data, model, **overrides):
    values = {"dataset": "mnist", "data": str(data), "model": model, "epochs": 2, "batch_size": 32,
              "eval_batch_size": 64, "val_fraction": 0.2, "out": str(out), "lr": 0.05, "threads": 1, "name": model,
              **MODELS.get(model, {}), **overrides}
    return build_config(None, values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short search per model on the tiny dataset; model -> best.pt (plus the data directory)."""
    root = tmp_path_factory.mktemp("ticket_runs")
    data = write_tiny_dataset(root)
    best = {}
    for model in MODELS:
        cfg = tiny_config(root / "runs", data, model)
        train(cfg, Local())
        best[model] = cfg.run_dir() / "checkpoints" / "best.pt"
    best["data"] = data
    return best


@pytest.fixture(scope="module")
def tickets(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tickets")
    return {model: Path(export_ticket(runs[model], out / f"{model}.h5")["ticket"]) for model in MODELS}


def checkpoint_model(path):
    checkpoint = load_checkpoint(path)
    cfg = build_config(None, checkpoint["config"])
    model = model_from_config(cfg, 1, 10, 8)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def bits(tensor):
    return tensor.contiguous().view(torch.int32)


def biprop(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "biprop_hpc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ------------------------------------------------------------------------------------ the same network

@pytest.mark.parametrize("model", MODELS)
def test_ticket_holds_the_checkpoints_effective_weights_bit_for_bit(runs, tickets, model):
    ours = checkpoint_model(runs[model])
    ticket = read(tickets[model])
    layers = biprop_layers(ours)
    assert [layer.name for layer in ticket.layers] == [name for name, _ in layers]
    loaded = dict(load(tickets[model]).named_modules())
    for record, (name, layer) in zip(ticket.layers, layers):
        weff = binary_masked_weight(layer.scores, layer.weight, layer.n_keep)
        assert torch.equal(record.effective_weight(), weff)                  # equal values
        assert torch.equal(bits(record.effective_weight()), bits(weff + 0.0))  # equal bits (+0.0 for pruned)
        assert torch.equal(bits(loaded[name].weight), bits(weff + 0.0))
        assert record.kept == layer.n_keep == int(record.mask().sum())
        assert record.alpha == np.float32(layer.alpha().item())
        assert torch.equal(record.mask(), layer.mask())
        assert torch.equal(record.signs(), torch.sign(layer.weight)[layer.mask()] > 0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluating_the_ticket_gives_the_checkpoints_metrics_exactly(runs, tickets, model, split):
    expected = evaluate_checkpoint(str(runs[model]), split, Local(), device="cpu")
    assert expected["count"] > 0
    assert evaluate_ticket(str(tickets[model]), split, Local(), device="cpu") == expected


@pytest.mark.parametrize("model", MODELS)
def test_load_returns_a_plain_eval_network_with_the_models_names(runs, tickets, model):
    ours = checkpoint_model(runs[model])
    net = load(tickets[model])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert not any(isinstance(m, BipropMixin) for m in net.modules())
    assert not net._forward_pre_hooks and not net._forward_hooks          # no mask engine left
    assert [name for name, _ in net.named_modules()] == [name for name, _ in ours.named_modules()]
    for name, layer in biprop_layers(ours):
        plain = net.get_submodule(name)
        assert type(plain) in (nn.Conv2d, nn.Linear) and plain.bias is None
        if isinstance(plain, nn.Conv2d):
            assert (plain.stride, plain.padding, plain.kernel_size) == (layer.stride, layer.padding,
                                                                       layer.kernel_size)
        values = plain.weight.abs().unique()
        assert len(values[values > 0]) == 1 and plain.weight.dtype == torch.float32
    skip = {f"{name}.scores" for name, _ in biprop_layers(ours)}
    expected = {k: v for k, v in ours.state_dict().items() if k not in skip}
    assert net.state_dict().keys() == expected.keys()
    for key, value in net.state_dict().items():
        if not any(key == f"{name}.weight" for name, _ in biprop_layers(ours)):
            assert torch.equal(value, expected[key]), key
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), ours(x))
        assert torch.equal(net(x), dense_ternary(checkpoint_model(runs[model]))(x))


def test_loading_leaves_the_global_random_state_alone(tickets):
    state = torch.get_rng_state()
    load(tickets["vgg_small"])
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------ size

def test_ticket_size_is_mask_bits_plus_kept_sign_bits_plus_the_float_parts(runs, tickets):
    for model, path in tickets.items():
        ticket = read(path)
        k = ticket.config["keep_ratio"]
        for layer in ticket.layers:
            assert layer.mask_bits.size == (layer.numel + 7) // 8
            assert layer.sign_bits.size == (layer.kept + 7) // 8
        assert ticket.bit_bytes() <= (1 + k) * ticket.biprop_weights / 8 + 2 * len(ticket.layers)
        floats = sum(v.numel() * v.element_size() for v in ticket.tensors.values())
        overhead = path.stat().st_size - ticket.bit_bytes() - floats
        assert 0 < overhead <= 8192 + 1024 * (len(ticket.tensors) + 3), (model, overhead)  # HDF5 headers
        assert path.stat().st_size * 12 < runs[model].stat().st_size


def test_a_full_width_resnet18_at_keep_02_takes_under_two_bits_per_weight(tmp_path):
    cfg = build_config(None, {"model": "resnet18_cifar", "keep_ratio": 0.2, "dataset": "cifar10"})
    torch.manual_seed(0)
    model = model_from_config(cfg, 3, 10, 32).eval()
    path = tmp_path / "r18.h5"
    write_ticket(path, ticket_from_model(model, cfg, (3, 10, 32), {"source": "test"}))
    size = sizes(path, read(path))
    assert size["biprop_weights"] == sum(layer.weight.numel() for _, layer in biprop_layers(model)) == 11_164_352
    assert size["bits_per_weight_masks_and_signs"] == pytest.approx(1.2, abs=1e-3)
    assert size["bits_per_weight"] < 1.27   # <= 2 bits per weight, BN statistics, HDF5 headers, digests included
    with h5py.File(path, "r") as h5:
        digests = h5.attrs["sha256_parts"]
    assert 80 < len(digests) / len(json.loads(digests)) < 100     # the README: about 90 bytes a part
    assert 11_000 < len(digests) < 13_000                        # about 12 KB for this ResNet-18
    assert size["ratio_to_fp32_weights"] > 25   # 32 bits / 1.25


# ------------------------------------------------------------------------------------ command line

def test_cli_export_evaluate_and_info(runs, tmp_path):
    ticket = tmp_path / "conv2_bin.h5"
    done = biprop("export", "--checkpoint", runs["conv2_bin"], "--out", ticket)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ticket_bytes"] == ticket.stat().st_size and result["ratio_to_source"] > 10
    assert "bits per weight" in done.stderr
    expected = biprop("evaluate", "--checkpoint", runs["conv2_bin"], "--device", "cpu")
    got = biprop("evaluate", "--ticket", ticket, "--device", "cpu")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)
    info = biprop("ticket", "info", ticket)
    assert info.returncode == 0, info.stderr
    text = info.stdout
    record = read(ticket)
    assert "conv2_bin" in text and "keep ratio  0.5" in text and "MPT-1/1 (binary weights and activations)" in text
    for layer in record.layers:
        row = next(line for line in text.splitlines() if line.startswith(layer.name + " "))
        assert f"{layer.kept:,}" in row and f"{float(layer.alpha):.6g}" in row
    assert f"{ticket.stat().st_size:,} bytes" in text and "bits per BIPROP weight" in text
    both = biprop("evaluate", "--checkpoint", runs["conv2_bin"], "--ticket", ticket)
    assert both.returncode == 2 and "either --checkpoint PATH or --ticket PATH" in both.stderr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")
def test_evaluate_ticket_under_mpirun_equals_the_checkpoint_under_mpirun(runs, tickets):
    command = ["mpirun", "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        command.insert(1, "--allow-run-as-root")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def evaluate(*args):
        done = subprocess.run(command + [sys.executable, "-m", "biprop_hpc", "evaluate", *args, "--device", "cpu"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    got = evaluate("--ticket", str(tickets["vgg_small"]))
    assert got == evaluate("--checkpoint", str(runs["vgg_small"]))       # the same ranks: exactly the same
    single = evaluate_checkpoint(str(runs["vgg_small"]), "test", Local(), device="cpu")
    assert got["count"] == single["count"] == 100                         # every sample once over the two ranks
    assert (got["top1"], got["top5"]) == (single["top1"], single["top5"])


# ------------------------------------------------------------------------------------ bad input

def test_truncated_ticket_is_a_clear_error_and_nothing_is_written(tickets, tmp_path):
    data = tickets["conv2_bin"].read_bytes()
    broken = tmp_path / "broken.h5"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(TicketError, match="truncated"):
        read(broken)
    out = tmp_path / "out.pt"
    done = biprop("export", "--ticket", broken, "--out", out, "--format", "torch")
    assert done.returncode == 2 and "biprop: error:" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))
    info = biprop("ticket", "info", broken)
    assert info.returncode == 2 and "truncated" in info.stderr


def test_ticket_of_a_newer_schema_is_refused(tickets, tmp_path):
    newer = tmp_path / "newer.h5"
    shutil.copy(tickets["conv2_bin"], newer)
    with h5py.File(newer, "r+") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION + 1
        # a newer schema's digests are its own: ones that still match this schema's value mean damage (below)
        del h5.attrs["sha256_parts"], h5.attrs["sha256"]
    with pytest.raises(TicketError, match=f"schema version {SCHEMA_VERSION + 1}, newer .* upgrade biprop-hpc"):
        read(newer)
    done = biprop("evaluate", "--ticket", newer)
    assert done.returncode == 2 and "newer" in done.stderr


# ------------------------------------------------------------------------------------ damage: the digests

DAMAGED = "resnet18_cifar"   # learned BN, a dense first layer, strided 1x1 shortcuts: every kind of part
SHORTCUT = 6                 # /layers row of 5.shortcut.0: stride 2, padding 0, 1x1
COMMANDS = (("ticket", "info"), ("evaluate", "--device", "cpu", "--ticket"), ("infer", "--ticket"),
            ("export", "--format", "torch", "--out", "exported.pt", "--ticket"))


def assert_refused(path, pattern, capsys):
    """read and load refuse the ticket with a message matching `pattern`; so do `biprop ticket info`, `biprop
    evaluate --ticket`, `biprop infer` and `biprop export --ticket`: exit 2 and that message as one line on
    stderr, nothing else (and nothing exported)."""
    with pytest.raises(TicketError, match=pattern) as caught:
        read(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(TicketError, match=pattern):
        load(path)
    for command in COMMANDS:
        capsys.readouterr()
        argv = [str(path.parent / arg) if arg == "exported.pt" else arg for arg in command]
        assert cli_main([*argv, str(path)]) == 2, command
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("biprop: error: ") and not out, (command, out, err)
        assert re.search(pattern, lines[0]), (command, lines[0])
    assert not (path.parent / "exported.pt").exists()


def layer_name(path, row):
    with h5py.File(path, "r") as h5:
        return h5["layers"][row]["name"].decode()


@pytest.mark.parametrize("field", ["alpha", "kept", "shape", "stride", "padding", "dilation", "groups", "numel",
                                   "nonzero", "mask_offset", "sign_offset"])
def test_a_flipped_bit_in_a_layers_row_is_refused_naming_the_layer(tickets, tmp_path, capsys, field):
    path = damage.copy(tickets[DAMAGED], tmp_path)
    name = layer_name(path, SHORTCUT)
    assert name == "5.shortcut.0"
    damage.flip_in_layer(path, SHORTCUT, field)          # the bytes on disk
    assert_refused(path, rf"is damaged: /layers row of layer {SHORTCUT} \(5\.shortcut\.0\) no longer matches its "
                         "SHA-256 digest; do not use it", capsys)


def test_a_flipped_bit_in_a_layers_name_is_refused(tickets, tmp_path, capsys):
    path = damage.copy(tickets[DAMAGED], tmp_path)
    damage.flip_in_heap_string(path, layer_name(path, SHORTCUT), byte=2)   # "5.shortcut.0" -> "5.qhortcut.0"
    assert_refused(path, rf"/layers row of layer {SHORTCUT} \(5\.qhortcut\.0\) no longer matches", capsys)


@pytest.mark.parametrize("dataset", ["mask_bits", "sign_bits"])
def test_a_flipped_bit_in_the_bit_datasets_is_refused_naming_the_layer(tickets, tmp_path, capsys, dataset):
    path = damage.copy(tickets[DAMAGED], tmp_path)
    with h5py.File(path, "r") as h5:
        start = int(h5["layers"][SHORTCUT][dataset.replace("_bits", "_offset")])
    damage.flip_in_dataset(path, dataset, byte=start + 1, mask=0x10)
    assert_refused(path, rf"/{dataset} of layer {SHORTCUT} \(5\.shortcut\.0\) no longer matches", capsys)


@pytest.mark.parametrize("key", ["1.running_mean", "1.running_var", "1.num_batches_tracked", "1.weight", "1.bias",
                                 "0.weight", "13.weight"])
def test_a_flipped_bit_in_a_tensor_is_refused_naming_it(tickets, tmp_path, capsys, key):
    """BN statistics, learned BN affine parameters, the dense first layer and the frozen dense last layer."""
    path = damage.copy(tickets[DAMAGED], tmp_path)
    assert key in read(path).tensors
    damage.flip_in_dataset(path, f"tensors/{key}", byte=1)
    assert_refused(path, rf"is damaged: /tensors/{re.escape(key)} no longer matches", capsys)


def test_a_flipped_bit_in_any_root_attribute_is_refused_naming_it(tickets, tmp_path, capsys):
    """Strings (config, model, format, ...) live in HDF5's global heap, which has no checksum: flipped on disk.
    Numbers live in checksummed HDF5 metadata: rewritten through h5py with one bit flipped."""
    with h5py.File(tickets[DAMAGED], "r") as h5:
        attrs = {key: value for key, value in h5.attrs.items() if key not in ("sha256_parts", "sha256")}
    assert {"config", "in_channels", "num_classes", "image_size", "keep_ratio", "model"} <= attrs.keys()
    for index, (key, value) in enumerate(attrs.items()):
        path = damage.copy(tickets[DAMAGED], tmp_path, f"{key}.h5")
        if isinstance(value, str):
            damage.flip_in_heap_string(path, value, byte=len(value) // 2)
        else:
            damage.rewrite_attribute_bit(path, key, bit=index % 3)
        assert_refused(path, rf"is damaged: root attribute {key} ", capsys)


@pytest.mark.parametrize("key", ["in_channels", "num_classes", "image_size", "keep_ratio"])
def test_a_flipped_bit_in_a_numeric_attribute_on_disk_is_refused(tickets, tmp_path, capsys, key):
    """On disk a number's bytes are in HDF5 metadata whose checksum HDF5 checks first (the README says so): it
    cannot say which attribute, so the message names the root attributes."""
    path = damage.copy(tickets[DAMAGED], tmp_path)
    damage.flip_in_attribute(path, key)
    assert_refused(path, r"is damaged: HDF5 cannot read its root attributes \(config, in_channels, num_classes, "
                         r"image_size, \.\.\.\): .*checksum", capsys)


def test_damaged_digests_added_and_removed_parts_are_refused(tickets, tmp_path, capsys):
    path = damage.copy(tickets[DAMAGED], tmp_path, "digests.h5")
    damage.rewrite_string_attribute_bit(path, "sha256_parts", byte=200)
    assert_refused(path, r"its digests \(root attributes sha256_parts and sha256\) do not match", capsys)
    path = damage.copy(tickets[DAMAGED], tmp_path, "added.h5")
    with h5py.File(path, "r+") as h5:
        h5["tensors/extra.running_mean"] = np.zeros(3, np.float32)
    assert_refused(path, r"/tensors/extra\.running_mean has no digest \(added after the ticket was written\)", capsys)
    path = damage.copy(tickets[DAMAGED], tmp_path, "removed.h5")
    with h5py.File(path, "r+") as h5:
        del h5["tensors/1.running_var"]
    assert_refused(path, r"/tensors/1\.running_var is missing", capsys)
    path = damage.copy(tickets[DAMAGED], tmp_path, "stripped.h5")
    with h5py.File(path, "r+") as h5:
        del h5.attrs["sha256_parts"], h5.attrs["sha256"]
    assert_refused(path, r"schema version 2 without its digests", capsys)


def test_the_real_commands_refuse_a_damaged_ticket_in_one_line(tickets, tmp_path):
    """The review's case, each command in a process of its own: one flipped bit of an alpha gave another loss."""
    path = damage.copy(tickets[DAMAGED], tmp_path)
    damage.flip_in_layer(path, 0, "alpha")
    for command in COMMANDS:
        done = biprop(*[tmp_path / arg if arg == "exported.pt" else arg for arg in command], path)
        errors = [line for line in done.stderr.splitlines() if line.startswith("biprop")]
        assert done.returncode == 2 and not done.stdout and "Traceback" not in done.stderr, done.stderr
        assert errors == [f"biprop: error: {path} is damaged: /layers row of layer 0 (3.conv1) no longer matches "
                          "its SHA-256 digest; do not use it: export it again from its checkpoint (or copy it "
                          "again)"]
    assert not (tmp_path / "exported.pt").exists()


def test_an_undamaged_ticket_says_it_is_verified(tickets, capsys):
    assert read(tickets[DAMAGED]).verified
    assert cli_main(["ticket", "info", str(tickets[DAMAGED])]) == 0
    assert "schema version 2, verified whole (SHA-256)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ schema 1

def as_schema_1(path, out):
    """The ticket as schema 1 wrote it (biprop-hpc 53a9d84, biprop_hpc/ticket/file.py: write_ticket): no
    digests, schema_version 1, /mask_bits and /sign_bits in equal chunks of at most 1 MiB with Fletcher-32."""
    shutil.copy(path, out)
    with h5py.File(out, "r+") as h5:
        del h5.attrs["sha256_parts"], h5.attrs["sha256"]
        h5.attrs["schema_version"] = 1
        for name in ("mask_bits", "sign_bits"):
            data = h5[name][()]
            del h5[name]
            size = max(data.size, 1)
            h5.create_dataset(name, data=data, chunks=(-(-size // -(-size // (1 << 20))),), fletcher32=True)
    return out


def test_schema_1_tickets_are_still_read_with_a_warning_that_they_are_unverified(tickets, tmp_path, caplog, capsys):
    old = as_schema_1(tickets[DAMAGED], tmp_path / "schema1.h5")
    with caplog.at_level("WARNING", logger="biprop_hpc"):
        ticket = read(old)
    assert not ticket.verified and ticket.attrs["schema_version"] == 1
    assert "schema version 1, which holds no digests" in caplog.text and "export it again" in caplog.text
    current = load(tickets[DAMAGED]).state_dict()
    assert all(torch.equal(value, current[key]) for key, value in load(old).state_dict().items())
    assert cli_main(["ticket", "info", str(old)]) == 0
    assert "schema version 1, UNVERIFIED: no digests, export it again" in capsys.readouterr().out


def test_schema_1_bit_datasets_still_fail_their_fletcher32_checksum(tickets, tmp_path):
    damaged = as_schema_1(tickets["vgg_small"], tmp_path / "damaged.h5")
    with h5py.File(damaged, "r") as h5:
        offset = h5["mask_bits"].id.get_chunk_info(0).byte_offset
    damage.flip(damaged, offset + 3, 0x10)
    with pytest.raises(TicketError, match=r"is damaged: HDF5 cannot read /mask_bits, whose Fletcher-32 checksum fails"):
        read(damaged)


def test_other_files_are_not_tickets(runs, tickets, tmp_path):
    archive = runs["vgg_small"].parent.parent / "archive.h5"
    with pytest.raises(TicketError, match="not a biprop ticket"):
        read(archive)
    with pytest.raises(TicketError, match="not a readable ticket"):
        read(runs["vgg_small"])                             # a torch checkpoint
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nowhere.h5")
    with pytest.raises(TicketError, match="not a checkpoint"):
        export_ticket(tickets["vgg_small"], tmp_path / "x.h5")   # a ticket where a checkpoint is expected
    with pytest.raises(TicketError, match="biprop import-original"):
        export_ticket(ORIGINAL, tmp_path / "x.h5")               # the original code's checkpoint
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TicketError, match="not a readable checkpoint"):
        export_ticket(junk, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_a_checkpoint_of_another_architecture_is_refused(runs, tmp_path):
    checkpoint = load_checkpoint(runs["conv2_bin"])
    checkpoint["config"]["model"] = "conv4_bin"                # the config says conv4_bin, the weights are conv2
    wrong = tmp_path / "wrong.pt"
    torch.save(checkpoint, wrong)
    out = tmp_path / "wrong.h5"
    done = biprop("export", "--checkpoint", wrong, "--out", out)
    assert done.returncode == 2 and "conv4_bin" in done.stderr and "another architecture" in done.stderr
    assert not out.exists()


def test_a_dense_run_has_no_ticket(runs, tmp_path):
    checkpoint = load_checkpoint(runs["vgg_small"])
    checkpoint["config"]["layer_type"] = "dense"
    dense = tmp_path / "dense.pt"
    torch.save(checkpoint, dense)
    with pytest.raises(TicketError, match="dense run"):
        export_ticket(dense, tmp_path / "dense.h5")


# ------------------------------------------------------------------------------------ round trips

def test_write_read_round_trip_keeps_everything(tickets, tmp_path):
    first = read(tickets["resnet18_cifar"])
    again = tmp_path / "again.h5"
    write_ticket(again, first)
    second = read(again)
    assert first.config == second.config and first.config["first_layer"] == "trained"
    assert (first.in_channels, first.num_classes, first.image_size) == (second.in_channels, second.num_classes,
                                                                        second.image_size)
    for a, b in zip(first.layers, second.layers):
        assert (a.name, a.kind, a.shape, a.kept, a.alpha, a.stride, a.padding) == (b.name, b.kind, b.shape, b.kept,
                                                                                    b.alpha, b.stride, b.padding)
        assert np.array_equal(a.mask_bits, b.mask_bits) and np.array_equal(a.sign_bits, b.sign_bits)
    assert first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    assert "0.weight" in first.tensors and "1.weight" in first.tensors      # dense first layer, learned BN


def test_strided_and_1x1_layers_keep_their_geometry(tickets):
    ticket = read(tickets["resnet18_cifar"])
    shortcuts = [layer for layer in ticket.layers if layer.name.endswith("shortcut.0")]
    assert shortcuts and all(s.stride == (2, 2) and s.padding == (0, 0) and s.shape[2:] == (1, 1)
                             for s in shortcuts)


# ------------------------------------------------------------------------------------ torch and ONNX

class Sign(nn.Module):
    def forward(self, x):
        return torch.where(x >= 0, 1.0, -1.0)


def hand_written_conv2_bin(width=16):
    """Conv2_BinAct at width 0.25 for 1 x 8 x 8 inputs, written with torch.nn only (no biprop_hpc)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, affine=False), Sign(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(width, affine=False), Sign(),
        nn.Flatten(), nn.Linear(width * 16, 64, bias=False), nn.BatchNorm1d(64, affine=False), Sign(),
        nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64, affine=False), Sign(), nn.Linear(64, 10, bias=False))


@pytest.mark.parametrize("model", MODELS)
def test_torch_export_loads_into_a_model_without_biprop_layers(tickets, tmp_path, model):
    out = tmp_path / f"{model}.pt"
    done = biprop("export", "--ticket", tickets[model], "--out", out, "--format", "torch")
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    net = load(tickets[model])
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    ticket = read(tickets[model])
    plain = dense_ternary(build(ticket.config, ticket.in_channels, ticket.num_classes, ticket.image_size))
    plain.load_state_dict(state)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))
        if model == "conv2_bin":
            hand = hand_written_conv2_bin().eval()
            hand.load_state_dict(state)
            assert torch.equal(hand(x), net(x))


@pytest.mark.parametrize("model", MODELS)
def test_onnx_export_runs_in_onnxruntime_and_matches_the_ticket(runs, tickets, tmp_path, model):
    import onnx          # the ONNX export is a feature: without these packages this test fails, it is not skipped
    import onnxruntime
    out = tmp_path / f"{model}.onnx"
    done = biprop("export", "--checkpoint", runs[model], "--out", out, "--format", "onnx")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["within_tolerance"]
    onnx.checker.check_model(onnx.load(str(out)))
    from biprop_hpc.data.datasets import load_splits
    splits = load_splits("mnist", str(runs["data"]), 0.2)
    mean, std = splits.info.mean[0], splits.info.std[0]
    x = (splits.test.images[:64].float() / 255 - mean) / std     # real test images, normalised as evaluation does
    net = load(tickets[model])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        expected = net(x)
    assert got.shape == expected.shape == (64, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ------------------------------------------------------------------------------------ --pretrained

def test_pretrained_starts_a_search_from_a_checkpoints_scores(runs, tmp_path):
    cfg = tiny_config(tmp_path / "runs", runs["data"], "conv2_bin", pretrained=str(runs["conv2_bin"]), epochs=1,
                      name="from_best")
    run = Run(cfg, Local())
    source = load_checkpoint(runs["conv2_bin"])["model"]
    for key, value in run.model.state_dict().items():
        assert torch.equal(value.cpu(), source[key]), key
    result = run.fit()
    assert load_checkpoint(run.checkpoints / "initial.pt")["config"]["pretrained"] == str(runs["conv2_bin"])
    assert "test_top1" in result


def test_pretrained_takes_what_fits_and_says_what_it_left(runs, caplog):
    torch.manual_seed(1)
    cfg = build_config(None, {"model": "conv2_bin", "width_mult": 0.25})
    model = model_from_config(cfg, 1, 5, 8)                 # 5 classes: the last layer does not fit
    report = load_pretrained(model, runs["conv2_bin"])
    assert "8.scores" in report["loaded"] and "14.scores" in report["ignored"]
    assert "ignored" in caplog.text and "14.scores" in caplog.text


def test_pretrained_refuses_a_ticket_and_other_architectures(runs, tickets, tmp_path):
    cfg = build_config(None, {"model": "conv2_bin", "width_mult": 0.25})
    with pytest.raises(ConfigError, match="not the frozen weights"):
        load_pretrained(model_from_config(cfg, 1, 10, 8), tickets["conv2_bin"])
    other = build_config(None, {"model": "vgg_small", "width_mult": 0.5})
    with pytest.raises(ConfigError, match="none of its scores fit"):
        load_pretrained(model_from_config(other, 1, 10, 8), runs["conv2_bin"])
    done = biprop("train", "--dataset", "mnist", "--data", runs["data"], "--model", "conv2_bin", "--width-mult",
                  "0.25", "--out", tmp_path / "runs", "--pretrained", tickets["conv2_bin"], "--epochs", "1")
    assert done.returncode == 2 and "|W|" in done.stderr and "scores" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_records_of_an_untrained_model_equal_its_layers(tmp_path):
    cfg = build_config(None, {"model": "conv4", "keep_ratio": 0.9, "width_mult": 0.25})
    torch.manual_seed(3)
    model = model_from_config(cfg, 3, 10, 32)
    for record, (_, layer) in zip(records(model), biprop_layers(model)):
        assert record.kept == layer.n_keep and torch.equal(record.mask(), layer.mask())
    assert any(isinstance(m, BinaryActivation) for m in build(build_config(None, {"model": "conv2_bin"}), 1, 10, 8,
                                                                 "meta").modules())


# ------------------------------------------------------------------------------------ on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", MODELS)
def test_on_cuda_the_ticket_reproduces_the_checkpoint(runs, tickets, model):
    """The checkpoint evaluated on the GPU (W_eff from the GPU's mask engine) and the ticket evaluated on the GPU
    give the same metrics; the GPU's W_eff is the ticket's bit for bit."""
    from biprop_hpc.nn import fixed_effective_weights
    for split in ("test", "val"):
        expected = evaluate_checkpoint(str(runs[model]), split, Local(), device="cuda")
        assert evaluate_ticket(str(tickets[model]), split, Local(), device="cuda") == expected
    ours = checkpoint_model(runs[model]).cuda()
    net = load(tickets[model], device="cuda")
    with fixed_effective_weights(ours):
        for name, layer in biprop_layers(ours):
            assert torch.equal(bits(net.get_submodule(name).weight), bits(layer._fixed_weight + 0.0)), name
    x = torch.randn(16, 1, 8, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(x), rtol=0, atol=0)
