"""Global pruning (biprop_hpc/nn/global_prune.py, README "Global pruning"): one |S| threshold over all BIPROP
layers, the original's schedule of the kept fraction, runs (2 ranks, resume), the archive, tickets, import.

Facts about the original (chrundle/biprop) used below: main.py sets the kept fraction per epoch before training
it (`if conv_type == "GlobalSubnetConv" and epoch < prune_rate_epoch: if prune_rate <= 0.5: prune_decay = (1 -
epoch / prune_rate_epoch) ** 3 ...`, then `prune_rate = final` at epoch == prune_rate_epoch), args.py defaults
prune_rate_epoch to 10; trainers/default.py global_prune_threshold sorts the |scores| of all layers and takes
z[int((1 - prune_rate) N) - 1]; utils/conv_type.py GetGlobalSubnet keeps |S| > threshold and divides by the kept
count; main.py saves `conv_type` and the epoch's `prune_rate` in the checkpoint.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import test_ticket_original as original_format
from biprop_hpc.archive import read_archive
from biprop_hpc.config import Config, ConfigError, build_config
from biprop_hpc.dist import Local
from biprop_hpc.nn import BipropConv2d, BipropLinear, attach_mask_engine, fixed_effective_weights, kept_count
from biprop_hpc.nn.global_prune import at_target_keep_ratio, global_kept_counts, scheduled_keep_ratio, set_run_pruning, trained_epoch
from biprop_hpc.ticket import TicketError, import_original, load, read, write_ticket
from biprop_hpc.ticket.export import export_ticket
from biprop_hpc.train.checkpoint import load_checkpoint
from biprop_hpc.train.loop import evaluate_checkpoint, model_from_config
from test_distributed import assert_same_models, models, worker

GLOBAL = ("pruning=global", "keep_ratio=0.1")


# ------------------------------------------------------------------------------------ the threshold

def sorted_reference(scores: list[torch.Tensor], keep_ratio: float) -> list[torch.Tensor]:
    """Each layer's mask by a plain sort of all |S| together (ties: lower index of the concatenation first), then
    the collapse rule: a layer with nothing kept keeps its largest |S| (ties: lower flat index)."""
    flat = torch.cat([s.abs().flatten() for s in scores])
    order = torch.sort(-flat, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:kept_count(flat.numel(), keep_ratio)]] = True
    masks = list(keep.split([s.numel() for s in scores]))
    for index, (mask, s) in enumerate(zip(masks, scores)):
        if not mask.any():
            mask = mask.clone()
            mask[torch.sort(-s.abs().flatten(), stable=True).indices[0]] = True
            masks[index] = mask
    return [m.view_as(s) for m, s in zip(masks, scores)]


def three_layers(seed: int, ties: bool, dead_layer: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(BipropConv2d(2, 4, 3, padding=1, keep_ratio=0.5), nn.Flatten(),
                          BipropLinear(4 * 5 * 5, 30, keep_ratio=0.5), BipropLinear(30, 7, keep_ratio=0.5))
    with torch.no_grad():
        for layer in (model[0], model[2], model[3]):
            if ties:   # few distinct values: ties at the threshold inside and across layers
                layer.scores.copy_(torch.randint(-4, 5, layer.scores.shape) / 4)
        if dead_layer:  # the classifier's scores all far below the others': the global threshold drops it all
            model[3].scores.fill_(1e-6)
    return attach_mask_engine(model)


@pytest.mark.parametrize("keep_ratio", [0.003, 0.05, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("ties,dead_layer", [(False, False), (True, False), (True, True), (False, True)])
def test_global_masks_equal_a_sort_of_all_scores(keep_ratio, ties, dead_layer):
    model = three_layers(int(keep_ratio * 1000), ties, dead_layer)
    layers = [model[0], model[2], model[3]]
    expected = sorted_reference([layer.scores.detach() for layer in layers], keep_ratio)
    assert global_kept_counts([layer.scores for layer in layers], keep_ratio) == [int(m.sum()) for m in expected]
    model.mask_engine.set_global_keep_ratio(keep_ratio)
    for method in ("layerwise", "batched"):
        model.mask_engine.method = method
        for layer, mask, weight in zip(layers, expected, model.mask_engine.effective_weights()):
            assert torch.equal(weight != 0, mask), (method, layer)        # the frozen W has no exact zeros
            alpha = (layer.weight.abs() * mask).sum(dtype=torch.float64) / mask.sum()
            torch.testing.assert_close(weight[mask].abs(), alpha.float().expand(int(mask.sum())))
    if keep_ratio == 1.0:
        assert all(bool(m.all()) for m in expected)
    if dead_layer and keep_ratio < 1:        # the dead layer keeps exactly one weight, the first (all tie)
        assert int(expected[2].sum()) == 1 and bool(expected[2].flatten()[0])


def test_one_weight_in_all_leaves_every_other_layer_its_one_best_weight():
    model = three_layers(4, ties=False)
    layers = [model[0], model[2], model[3]]
    total = sum(layer.weight.numel() for layer in layers)
    keep_ratio = 0.5 / total                 # kept_count: exactly 1 of all
    assert kept_count(total, keep_ratio) == 1
    counts = global_kept_counts([layer.scores for layer in layers], keep_ratio)
    assert counts == [1, 1, 1]
    best = max(range(3), key=lambda i: float(layers[i].scores.detach().abs().max()))
    model.mask_engine.set_global_keep_ratio(keep_ratio)
    for layer, weight in zip(layers, model.mask_engine.effective_weights()):
        assert int((weight != 0).sum()) == 1
        assert (weight != 0).flatten().nonzero().item() == layer.scores.abs().flatten().argmax().item()
    assert sorted_reference([layer.scores.detach() for layer in layers], keep_ratio)[best].sum() == 1


def test_the_score_gradient_is_unchanged_under_global_pruning():
    """dL/dS = dL/dW_eff * W * sign(S) (SPEC.md), whatever the kept counts."""
    model = three_layers(7, ties=False)
    model.mask_engine.set_global_keep_ratio(0.2)
    x = torch.randn(3, 2, 5, 5)
    hidden = model[1](model[0](x)).detach()
    out = model(x)
    weights = {}
    with torch.no_grad():
        for layer, weight in zip([model[0], model[2], model[3]], model.mask_engine.effective_weights()):
            weights[layer] = weight
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    # the last two layers are linear: dL/dW_eff by hand
    h2 = torch.nn.functional.linear(hidden, weights[model[2]])
    grad_w3 = upstream.T @ h2
    expected = grad_w3 * model[3].weight * torch.sign(model[3].scores.detach())
    torch.testing.assert_close(model[3].scores.grad, expected)


# ------------------------------------------------------------------------------------ the schedule

def originals_schedule(target: float, epochs: int, prune_rate_epoch: int) -> list[float]:
    """The kept fraction (args.prune_rate) each epoch trains with, as main.py's loop changes it."""
    prune_rate, final, out = target, target, []
    for epoch in range(epochs):
        if epoch < prune_rate_epoch:
            if prune_rate <= 0.5:
                prune_decay = (1 - (epoch / prune_rate_epoch)) ** 3
                curr_prune_rate = (1 - final) + ((0.5 - (1 - final)) * prune_decay)
                prune_rate = 1 - curr_prune_rate
        elif epoch == prune_rate_epoch:
            prune_rate = final
        out.append(prune_rate)
    return out


@pytest.mark.parametrize("target", [0.01, 0.05, 0.1, 0.2, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("prune_rate_epoch", [0, 1, 3, 10])
def test_the_schedule_is_the_originals_per_epoch(target, prune_rate_epoch):
    expected = originals_schedule(target, 15, prune_rate_epoch)
    assert [scheduled_keep_ratio(target, epoch, prune_rate_epoch) for epoch in range(15)] == expected
    if target <= 0.5 and prune_rate_epoch:
        assert expected[0] == pytest.approx(0.5) and expected[prune_rate_epoch] == target


def test_pruning_keys_are_checked():
    assert build_config(None, {}).pruning == "layerwise" and build_config(None, {}).prune_rate_epoch == 10
    with pytest.raises(ConfigError, match="pruning: 'globl' is not one of layerwise, global"):
        build_config(None, {"pruning": "globl"})
    with pytest.raises(ConfigError, match="prune_rate_epoch: must be >= 0"):
        build_config(None, {"prune_rate_epoch": -1})
    with pytest.raises(ConfigError, match="pruning global prunes BIPROP layers, but layer_type is dense"):
        build_config(None, {"pruning": "global", "layer_type": "dense"})
    # a run that ends before the schedule reaches keep_ratio would report a ticket keeping more
    with pytest.raises(ConfigError, match="reaches keep_ratio 0.1 in epoch 4, but epochs is 3"):
        build_config(None, {"pruning": "global", "keep_ratio": 0.1, "prune_rate_epoch": 3, "epochs": 3})
    build_config(None, {"pruning": "global", "keep_ratio": 0.6, "prune_rate_epoch": 3, "epochs": 3})  # no decay
    build_config(None, {"pruning": "global", "keep_ratio": 0.1, "prune_rate_epoch": 0, "epochs": 1})


def test_only_an_epoch_at_the_keep_ratio_can_be_the_best():
    cfg = build_config(None, {"pruning": "global", "keep_ratio": 0.1, "prune_rate_epoch": 2, "epochs": 4})
    assert [at_target_keep_ratio(cfg, epoch) for epoch in range(4)] == [False, False, True, True]
    cfg = build_config(None, {"pruning": "layerwise", "keep_ratio": 0.1, "prune_rate_epoch": 2, "epochs": 4})
    assert all(at_target_keep_ratio(cfg, epoch) for epoch in range(4))


def test_a_run_keeps_the_scheduled_fraction_each_epoch_and_the_archive_records_it(tmp_path, tiny_idx_dir):
    worker("single", 1, "train", tmp_path, tiny_idx_dir, *GLOBAL, "prune_rate_epoch=2", "epochs=4")
    archive = next(tmp_path.rglob("archive.h5"))
    record = read_archive(archive)
    kept = record.kept_fraction
    weights = [layer["weights"] for layer in record.layers]
    assert kept["layers"] == [layer["name"] for layer in record.layers] and kept["epochs"] == [1, 2, 3, 4]
    schedule = originals_schedule(0.1, 4, 2)                 # 0.5, 0.15, 0.1, 0.1: epoch 1 (index 0) at 0.5
    for fractions, fraction in zip(kept["fractions"], schedule):
        counts = [round(f * n) for f, n in zip(fractions, weights)]
        assert min(counts) >= 1
        assert sum(counts) == kept_count(sum(weights), fraction)   # no layer collapsed in this run
        assert len({round(f, 3) for f in fractions}) > 1          # layers keep different fractions
    assert record.final["best_epoch"] in (3, 4)                     # epochs 1 and 2 keep more than 0.1
    tested = kept["fractions"][record.final["best_epoch"] - 1]       # /layers: the tested (best) model's
    assert [layer["kept"] for layer in record.layers] == [round(f * n) for f, n in zip(tested, weights)]
    # biprop results --layers shows them (json), a plot is drawn per global run
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", "results", str(tmp_path), "--layers", "--format",
                           "json", "--plot", str(tmp_path / "plots")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(done.stdout)
    assert [layer["kept_fraction_per_epoch"] for layer in run["layers"]] == [list(c) for c in zip(*kept["fractions"])]
    assert len(list((tmp_path / "plots/kept_fraction").glob("*.png"))) == 1
    table = subprocess.run([sys.executable, "-m", "biprop_hpc", "results", str(tmp_path), "--layers"],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "(global pruning)" in table.stdout and "epoch 1 %" in table.stdout and "epoch 4 %" in table.stdout
    first = record.layers[0]
    assert f"{100 * kept['fractions'][0][0]:.2f}" in table.stdout.split(f"\n{first['name']} ")[1].splitlines()[0]


# ------------------------------------------------------------------------------------ runs

@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")
def test_two_rank_global_run_equals_one_process(tmp_path, tiny_idx_dir):
    common = (*GLOBAL, "prune_rate_epoch=1", "epochs=2")      # conv2: no BatchNorm
    worker("single", 1, "train", tmp_path / "one", tiny_idx_dir, *common, "batch_size=16")
    worker("mpirun", 2, "train", tmp_path / "two", tiny_idx_dir, *common, "batch_size=8")
    (rank0, rank1), single = models(tmp_path / "two", 2), models(tmp_path / "one", 1)[0]
    assert_same_models(rank0, rank1)
    assert_same_models(rank0, single, rtol=1e-4, atol=1e-5)
    one = read_archive(next((tmp_path / "one").rglob("archive.h5")))
    two = read_archive(next((tmp_path / "two").rglob("archive.h5")))
    assert two.attrs["world_size"] == 2
    # the ranks' sums differ from one process's in the last bits (summation order): a score at the threshold may
    # swap with one of another layer, so a layer's count may differ by one; the total may not
    weights = [layer["weights"] for layer in one.layers]
    assert two.kept_fraction["epochs"] == one.kept_fraction["epochs"] == [1, 2]
    for a, b in zip(two.kept_fraction["fractions"], one.kept_fraction["fractions"]):
        a, b = [round(f * n) for f, n in zip(a, weights)], [round(f * n) for f, n in zip(b, weights)]
        assert sum(a) == sum(b) and max(abs(x - y) for x, y in zip(a, b)) <= 1
    assert sum(layer["kept"] for layer in two.layers) == sum(layer["kept"] for layer in one.layers)
    assert [layer["alpha"] for layer in two.layers] == pytest.approx([layer["alpha"] for layer in one.layers],
                                                                     rel=0.05)
    assert two.final["test_top1"] == pytest.approx(one.final["test_top1"], abs=1.01)


# a stop request after step S is decided at the next step's boundary (dist_worker.request_stop_at; README)
@pytest.mark.parametrize("stop_at,state", [(25, (1, 6)), (20, (1, 0))])
def test_a_resumed_global_run_ends_exactly_like_an_uninterrupted_one(tmp_path, tiny_idx_dir, stop_at, state):
    """Mid-epoch (after step 6 of epoch 2) and end-of-epoch stops during the decay: the kept fraction comes from the
    epoch, the counts from the scores, so the continuation computes the same masks."""
    common = (*GLOBAL, "prune_rate_epoch=2", "epochs=3")     # 20 steps an epoch
    worker("single", 1, "train", tmp_path / "whole", tiny_idx_dir, *common)
    worker("single", 1, "train", tmp_path / "split", tiny_idx_dir, *common, f"stop_at={stop_at}:0", returncode=75)
    archive = next((tmp_path / "split").rglob("archive.h5"))
    checkpoint = load_checkpoint(archive.parent / "checkpoints/last.pt")
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["step"]) == state
    worker("single", 1, "train", tmp_path / "split", tiny_idx_dir, *common, "resume=auto")
    assert_same_models(models(tmp_path / "split", 1)[0], models(tmp_path / "whole", 1)[0])
    whole, split = read_archive(next((tmp_path / "whole").rglob("archive.h5"))), read_archive(archive)
    assert split.kept_fraction == whole.kept_fraction and split.layers == whole.layers
    assert split.final == whole.final and split.metrics["val_loss"] == whole.metrics["val_loss"]


# ------------------------------------------------------------------------------------ tickets

def test_export_and_packed_inference_use_each_layers_own_count(tmp_path, tiny_idx_dir):
    """A binary-activation net (packable) keeping 0.2 of its weights from the start: each layer its own count;
    the ticket, its float network and the packed network compute what the checkpoint's model computes."""
    from biprop_hpc.packed import pack_model
    worker("single", 1, "train", tmp_path, tiny_idx_dir, "model=conv2_bin", "pruning=global", "keep_ratio=0.2",
           "prune_rate_epoch=0", "epochs=1")
    archive = next(tmp_path.rglob("archive.h5"))
    best = archive.parent / "checkpoints/best.pt"
    export_ticket(best, tmp_path / "t.h5")
    ticket = read(tmp_path / "t.h5")
    record = read_archive(archive)
    assert [(layer.name, layer.kept) for layer in ticket.layers] == [(l["name"], l["kept"]) for l in record.layers]
    total = sum(layer.numel for layer in ticket.layers)
    assert sum(layer.kept for layer in ticket.layers) == kept_count(total, 0.2)
    assert len({layer.kept / layer.numel for layer in ticket.layers}) > 1
    checkpoint = load_checkpoint(best)
    cfg = Config.from_dict(checkpoint["config"])
    model = model_from_config(cfg, 1, 10, 8)
    model.load_state_dict(checkpoint["model"])
    set_run_pruning(model, cfg, trained_epoch(checkpoint["state"]))
    model.eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), fixed_effective_weights(model):
        expected = model(x)
    network = load(tmp_path / "t.h5")
    with torch.no_grad():
        assert torch.equal(network(x), expected)
        packed = pack_model(network, example_input=x)
        assert packed.packed_layers
        got = packed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # biprop evaluate and biprop infer from the checkpoint: the test accuracy the run reported for it
    assert evaluate_checkpoint(str(best), "test", Local())["top1"] == record.final["test_top1"]
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", "infer", "--checkpoint", str(best), "--engine",
                           "float", "--threads", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["top1"] == record.final["test_top1"]


def originals_global_weff(threshold):
    """GetGlobalSubnet's W_eff for a fixed threshold, written as the original computes it."""
    def weff(state, name, k):
        w, s = state[f"{name}.weight"], state.get(f"{name}.scores")
        if s is None:
            return w
        out = torch.where(s.abs() > threshold, 1.0, 0.0)
        alpha = torch.sum(w.abs() * out) / int(torch.sum(out))
        return torch.sign(w) * (alpha * out)
    return weff


@pytest.mark.parametrize("arch", ["Conv2", "Conv4_BinAct"])
def test_an_originals_global_checkpoint_imports_with_its_logits(arch, tmp_path, monkeypatch):
    torch.manual_seed(11)
    net, model_name, size = original_format.family(arch, original_format.random_tensor)
    k = 0.07                                        # saved mid-decay: the prune_rate of the epoch it was saved at
    for key in [key for key in net.state if key.endswith("scores")][:2]:
        net.state[key] = net.state[key] * 3         # the first layers' scores larger: they keep more
    torch.save({"epoch": 4, "arch": arch, "state_dict": net.state, "prune_rate": k, "conv_type": "GlobalSubnetConv"},
               tmp_path / "g.pth")
    z = torch.cat([v.abs().flatten() for key, v in net.state.items() if key.endswith("scores")]).sort().values
    threshold = z[int((1 - k) * z.numel()) - 1]
    monkeypatch.setattr(original_format, "weff", originals_global_weff(threshold))
    ticket = import_original(tmp_path / "g.pth")
    assert ticket.config["model"] == model_name and ticket.config["pruning"] == "global"
    write_ticket(tmp_path / "t.h5", ticket)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = net.forward(x, net.state, k)
        got = load(tmp_path / "t.h5")(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    fractions = [layer.kept / layer.numel for layer in ticket.layers]
    assert fractions[0] > 2 * fractions[-1]
    assert sum(layer.kept for layer in ticket.layers) == z.numel() - int((1 - k) * z.numel())


def test_an_originals_global_checkpoint_with_an_empty_layer_is_refused(tmp_path):
    torch.manual_seed(12)
    net, _, _ = original_format.family("Conv2", original_format.random_tensor)
    net.state["linear.4.scores"] = torch.zeros_like(net.state["linear.4.scores"])
    torch.save({"arch": "Conv2", "state_dict": net.state, "prune_rate": 0.3, "conv_type": "GlobalSubnetConv"},
               tmp_path / "g.pth")
    with pytest.raises(TicketError, match="keeps no weight under the global threshold .* alpha is 0/0"):
        import_original(tmp_path / "g.pth")
