"""Augmentation from "A Winning Hand": AugMix with the Jensen-Shannon consistency loss, and Gaussian noise.

Facts from the original code (github.com/chrundle/biprop, commit b4a0d32): args.py gives the defaults
(aug_severity 3, mixture_width 3, mixture_depth -1, std_gauss 0.1); data/cifar_augmix.py mixes with Dirichlet([1]
* width) weights and m ~ Beta(1, 1) after the flip and padded crop; trainers/default.py's loss is CE(clean) + 12 *
mean_i KL(p_i || clamp(M, 1e-7, 1)) over the clean and two augmented views in one forward pass;
data/cifar_gaussian.py adds N(0, std^2) to [0, 1] pixels, clamps to [0, 1], then normalises, on each image with
probability 1 - p_clean (transforms.RandomApply).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from biprop_hpc.archive import read_archive
from biprop_hpc.config import ConfigError, build_config
from biprop_hpc.data.augment import Augmentation, augment_batch
from biprop_hpc.data.batches import TrainBatches
from biprop_hpc.data.datasets import DATASETS, Split
from biprop_hpc.dist import Local
from biprop_hpc.train import Run
from biprop_hpc.train.checkpoint import load_checkpoint
from biprop_hpc.train.losses import consistency_loss_sum, js_divergence
from biprop_hpc.train.stopping import RunCheckpointed

CIFAR = DATASETS["cifar10"]          # 3 channels, crop padding 4
FASHION = DATASETS["fashion-mnist"]  # 1 channel, no crop
AUGMIX = Augmentation(kind="augmix")


def random_split(n: int, channels: int = 3, size: int = 16) -> Split:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 10, (n,), generator=generator))


# --- the consistency loss ---------------------------------------------------------------------------------------

def test_js_divergence_equals_the_entropy_form():
    """JS(p1, p2, p3) = H(M) - mean_i H(p_i) (a formula written another way, through torch.distributions), for
    logits whose mixture stays above the 1e-7 floor; 0 for equal views; the loss adds it with its weight to the
    summed CE of the clean logits."""
    logits = torch.randn(3, 50, 10, generator=torch.Generator().manual_seed(0)) * 3
    probabilities = logits.softmax(-1)
    expected = (Categorical(probs=probabilities.mean(0)).entropy()
                - torch.stack([Categorical(logits=view).entropy() for view in logits]).mean(0))
    assert torch.allclose(js_divergence(logits), expected, atol=1e-5)
    assert torch.allclose(js_divergence(logits[:1].expand(3, -1, -1)), torch.zeros(50), atol=1e-6)
    labels = torch.randint(0, 10, (50,))
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    total = consistency_loss_sum(criterion, logits.reshape(150, 10), labels, 12.0)
    assert torch.allclose(total, F.cross_entropy(logits[0], labels, reduction="sum") + 12 * expected.sum(), rtol=1e-5)


def test_js_divergence_equals_explicit_kl_sums():
    """JS as the mean of KL(p_i || M) over the three views, each KL from torch.distributions, in double."""
    logits = torch.randn(3, 20, 7, generator=torch.Generator().manual_seed(2)).double() * 4
    mixture = Categorical(probs=logits.softmax(-1).mean(0))
    expected = sum(kl_divergence(Categorical(logits=view), mixture) for view in logits) / 3
    assert torch.allclose(js_divergence(logits).double(), expected, atol=1e-5)


# --- AugMix views -------------------------------------------------------------------------------------------------

def views_by_sample(batches, epoch: int) -> dict:
    out = {}
    for batch, index in zip(batches.epoch(epoch), batches.epoch_indices(epoch)):
        for row, sample in enumerate(index.tolist()):
            out[sample] = (batch.images[row], batch.views[:, row])
    return out


def test_augmix_views_depend_on_seed_epoch_and_sample_only():
    """Each sample gets a clean image and two AugMix views; the same (seed, epoch, sample) gives the same views
    on one process, on either of two ranks, and from a mid-epoch start; another epoch, sample or seed gives
    others; the views are not the clean image."""
    split = random_split(40)
    one = TrainBatches(split, CIFAR, 8, 0, 1, seed=3, augment=True, augmentation=AUGMIX)
    whole = views_by_sample(one, 1)
    assert len(whole) == 40
    for rank in range(2):
        shard = TrainBatches(split, CIFAR, 4, rank, 2, seed=3, augment=True, augmentation=AUGMIX)
        for sample, (clean, views) in views_by_sample(shard, 1).items():
            assert torch.equal(clean, whole[sample][0]) and torch.equal(views, whole[sample][1]), (rank, sample)
    tail = list(one.epoch(1, start=3))
    assert torch.equal(tail[0].views, list(one.epoch(1))[3].views)
    again = views_by_sample(TrainBatches(split, CIFAR, 8, 0, 1, seed=3, augment=True, augmentation=AUGMIX), 1)
    assert all(torch.equal(again[s][1], whole[s][1]) for s in whole)
    other_epoch = views_by_sample(one, 2)
    other_seed = views_by_sample(TrainBatches(split, CIFAR, 8, 0, 1, seed=4, augment=True, augmentation=AUGMIX), 1)
    for sample, (clean, views) in whole.items():
        assert views.shape == (2, 3, 16, 16)
        assert not torch.equal(views[0], views[1])
        assert not torch.equal(views[0], clean) and not torch.equal(views[1], clean)
        assert not torch.equal(views, other_epoch[sample][1])
        assert not torch.equal(views, other_seed[sample][1])
    # Two samples with the same pixels still get different views (the draws are keyed by the sample index).
    twins = Split(split.images[:1].repeat(4, 1, 1, 1), split.labels[:4])
    images, views = augment_batch(twins.images, [0, 1, 2, 3], 0, 3, AUGMIX)
    assert len({views[:, i].numpy().tobytes() for i in range(4)}) == 4
    # Without the crop and flip (which differ by epoch themselves), epochs still get other views.
    assert not torch.equal(views, augment_batch(twins.images, [0, 1, 2, 3], 1, 3, AUGMIX)[1])
    assert torch.equal(views, augment_batch(twins.images, [0, 1, 2, 3], 0, 3, AUGMIX)[1])


def test_augmix_without_the_consistency_loss_trains_on_one_view():
    split = random_split(16, channels=1)
    single = TrainBatches(split, FASHION, 16, 0, 1, seed=0, augment=True,
                          augmentation=Augmentation(kind="augmix", jsd_weight=0.0))
    batch = next(single.epoch(0))
    double = next(TrainBatches(split, FASHION, 16, 0, 1, seed=0, augment=True, augmentation=AUGMIX).epoch(0))
    assert batch.views is None and double.views is not None
    assert torch.equal(batch.images, double.views[0])  # the first view of the same generator


def test_evaluation_batches_are_never_augmented(tmp_path, tiny_idx_dir):
    from biprop_hpc.data.build import build_data
    values = {"dataset": "mnist", "data": str(tiny_idx_dir), "val_fraction": 0.2, "out": str(tmp_path)}
    plain = build_data(build_config(None, values), 0, 1, torch.device("cpu"))
    mixed = build_data(build_config(None, {**values, "augmentation": "augmix"}), 0, 1, torch.device("cpu"))
    for split in ("val", "test"):
        for a, b in zip(getattr(plain, split), getattr(mixed, split)):
            assert b.views is None and torch.equal(a.images, b.images)
    train = next(mixed.train.epoch(0))
    assert train.views is not None and torch.equal(train.images, next(plain.train.epoch(0)).images)


# --- Gaussian noise -----------------------------------------------------------------------------------------------

def test_gaussian_noise_fraction_and_std_on_a_fixed_batch():
    """Mid-grey images (so clamping is 5 sigma away): about noise_fraction of them are noised, the others are
    untouched; the noise is added to the [0, 1] pixels before normalisation, with std noise_std."""
    n, fraction, std = 2000, 0.3, 0.1
    grey = Split(torch.full((n, 1, 8, 8), 128, dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
    aug = Augmentation(kind="gaussian", noise_std=std, noise_fraction=fraction)
    batch = next(TrainBatches(grey, FASHION, n, 0, 1, seed=0, augment=True, augmentation=aug).epoch(0))
    pixels = batch.images * FASHION.std[0] + FASHION.mean[0]      # undo the normalisation
    noise = pixels - 128 / 255
    noised = noise.flatten(1).abs().amax(1) > 1e-6
    # binomial(2000, 0.3): sd 20.5 images; 5 sd either side
    assert abs(noised.sum().item() - n * fraction) < 5 * math.sqrt(n * fraction * (1 - fraction))
    values = noise[noised].flatten()
    assert abs(values.mean().item()) < 0.002          # ~38000 values: sd of the mean 0.0005
    assert abs(values.std().item() - std) < 0.002     # sd of the sd ~0.0004
    # Clamped to [0, 1]: black images never go below 0.
    black = torch.zeros(200, 1, 8, 8, dtype=torch.uint8)
    images, _ = augment_batch(black, list(range(200)), 0, 0, Augmentation(kind="gaussian", noise_fraction=1.0))
    assert images.min() == 0.0 and images.max() > 0.1
    # Keyed by (seed, epoch, sample): the same again, another epoch differs.
    assert torch.equal(augment_batch(black, list(range(200)), 0, 0, Augmentation(kind="gaussian"))[0],
                       augment_batch(black, list(range(200)), 0, 0, Augmentation(kind="gaussian"))[0])
    assert not torch.equal(augment_batch(black, list(range(200)), 0, 0, Augmentation(kind="gaussian"))[0],
                           augment_batch(black, list(range(200)), 1, 0, Augmentation(kind="gaussian"))[0])


# --- configuration --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"dataset": "imagenet", "loader": "dali", "augmentation": "augmix"}, "use --loader torch"),
    ({"dataset": "imagefolder", "loader": "dali-cpu", "augmentation": "gaussian"}, "use --loader torch"),
    ({"augmentation": "cutmix"}, "augmentation: 'cutmix' is not one of none, augmix, gaussian"),
    ({"augmix_severity": 0}, "augmix_severity: 0 must be in 1..10"),
    ({"augmix_depth": 0}, "augmix_depth: must be >= 1 operations per chain, or -1"),
    ({"augmix_width": 0}, "augmix_width: must be >= 1"),
    ({"noise_fraction": 1.5}, "noise_fraction: 1.5 must be in [0, 1]"),
    ({"noise_std": 0}, "noise_std: must be > 0"),
    ({"jsd_weight": -1}, "jsd_weight: must be >= 0"),
])
def test_bad_augmentation_settings_are_clear_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_config(None, values)


def test_auto_loader_reads_an_augmented_image_tree_with_torch(tmp_path, monkeypatch):
    """With DALI installed `loader: auto` would choose it; an augmented run reads with the torch loader instead,
    whose batches carry the views (AugMix on the crop, keyed as the in-memory loader)."""
    from biprop_hpc.data import build
    from image_tree import make_image_tree
    make_image_tree(tmp_path, classes=2, per_class={"train": 3, "val": 1, "test": 1})
    monkeypatch.setattr(build, "dali_available", lambda: True)
    cfg = build_config(None, {"dataset": "imagefolder", "data": str(tmp_path), "augmentation": "augmix",
                              "crop_size": 16, "resize_size": 18, "batch_size": 3, "loader_workers": 0})
    data = build.build_data(cfg, 0, 1, torch.device("cpu"))
    assert data.loader == "torch"
    batch = next(data.train.epoch(0))
    assert batch.views.shape == (2, 3, 3, 16, 16) and batch.images.shape == (3, 3, 16, 16)
    assert torch.equal(next(data.train.epoch(0)).views, batch.views)
    assert next(iter(data.val)).views is None


def test_a_resume_with_another_augmentation_is_refused():
    from biprop_hpc.config import result_differences
    stored = build_config(None, {}).to_dict()
    stored = {key: value for key, value in stored.items() if key not in ("augmentation", "jsd_weight")}  # older
    changed = result_differences(stored, build_config(None, {"augmentation": "augmix", "jsd_weight": 6}))
    assert changed == [("augmentation", "none", "augmix"), ("jsd_weight", 12.0, 6.0)]


# --- a run -------------------------------------------------------------------------------------------------------

class StopAfter:
    """Stop requests as a scheduler's SIGUSR1 would make them, after `checks` step boundaries."""

    def __init__(self, checks: int):
        self.checks = checks

    @property
    def reason(self):
        self.checks -= 1
        return "SIGUSR1" if self.checks < 0 else None


def test_an_augmix_run_stopped_mid_epoch_resumes_exactly(tmp_path, tiny_idx_dir, monkeypatch):
    """Stopped in the middle of epoch 1 and continued, an AugMix + JS run ends bit for bit as the uninterrupted
    one (metrics and every tensor of the model); its loss is the consistency loss over one forward pass of the
    clean and two augmented views; the archive records the augmentation."""
    from biprop_hpc.train import loop
    calls, losses, correct = [], [], []

    def recorded(criterion, logits, labels, jsd_weight):
        calls.append((tuple(logits.shape), len(labels), jsd_weight))
        correct.append((logits[:len(labels)].argmax(1) == labels).sum().item())  # on the clean images
        loss = consistency_loss_sum(criterion, logits, labels, jsd_weight)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(loop, "consistency_loss_sum", recorded)
    def config(name, **extra):
        return build_config(None, {"dataset": "mnist", "data": str(tiny_idx_dir), "model": "conv2_bin",
                                   "width_mult": 0.25, "epochs": 2, "batch_size": 32, "val_fraction": 0.2,
                                   "out": str(tmp_path), "threads": 1, "name": name, "augmentation": "augmix",
                                   "lr_schedule": "constant", **extra})

    whole = Run(config("whole"), Local()).fit()
    assert len(calls) == 20 and set(calls) == {((3 * 32, 10), 32, 12.0)}  # 2 epochs of 10 steps
    first_epoch = read_archive(tmp_path / "default/keep=0.5/whole/archive.h5").metrics["train_loss"][0]
    assert first_epoch == pytest.approx(sum(losses[:10]) / 320, rel=1e-6)  # train_loss is this loss
    top1 = read_archive(tmp_path / "default/keep=0.5/whole/archive.h5").metrics["train_top1"][0]
    assert top1 == pytest.approx(100 * sum(correct[:10]) / 320)
    with pytest.raises(RunCheckpointed) as stopped:
        Run(config("split"), Local(), StopAfter(checks=4)).fit()
    assert stopped.value.epoch == 0 and 0 < stopped.value.step < 10  # mid-epoch (10 steps of 32 images)
    resumed = Run(config("split", resume="auto"), Local()).fit()
    assert resumed["test_loss"] == whole["test_loss"] and resumed["test_top1"] == whole["test_top1"]
    runs = tmp_path / "default/keep=0.5"
    a, b = read_archive(runs / "whole/archive.h5"), read_archive(runs / "split/archive.h5")
    for name in ("train_loss", "train_top1", "val_loss", "val_top1"):
        assert a.metrics[name] == b.metrics[name], name
    assert a.config["augmentation"] == "augmix" and a.config["jsd_weight"] == 12.0
    final_whole = load_checkpoint(runs / "whole/checkpoints/last.pt")["model"]
    final_split = load_checkpoint(runs / "split/checkpoints/last.pt")["model"]
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_split[name]), name
