"""bench/scaling.py: the ring allreduce model against hand-computed values, the fit, Horovod's fusion, the cited
inputs (the WRN-50-2 score count, the per-GPU step, the recipe's batch, Horovod 0.28.1's facts) and the README's
table. Seconds; no mpirun."""
import importlib.util
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def scaling():
    sys.path.insert(0, str(BENCH))     # scaling.py imports _timing beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_scaling", BENCH / "scaling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def layers(scaling):
    return scaling.wrn_layer_elements()


def test_one_rank_communicates_nothing(scaling):
    for n_bytes in (0, 1, 1e9):
        assert scaling.ring_allreduce_s(n_bytes, 1, bandwidth=1e9, alpha=1e-5) == 0.0


def test_ring_against_hand_computed_values(scaling):
    # 2(p-1)/p * n/B + 2(p-1) * alpha with n = 1 MB, p = 4, B = 1 GB/s, alpha = 10 us: 1.5 ms + 60 us
    assert scaling.ring_allreduce_s(1e6, 4, 1e9, 1e-5) == pytest.approx(1.56e-3, rel=1e-12)
    # p = 2: half the message each way, 2 steps
    assert scaling.ring_allreduce_s(8e6, 2, 2e9, 5e-6) == pytest.approx(4e-3 + 1e-5, rel=1e-12)


def test_doubling_bandwidth_halves_the_bandwidth_term(scaling):
    alpha, n, p = 7e-6, 3e8, 16
    latency = 2 * (p - 1) * alpha
    slow = scaling.ring_allreduce_s(n, p, 1e10, alpha) - latency
    fast = scaling.ring_allreduce_s(n, p, 2e10, alpha) - latency
    assert fast == pytest.approx(slow / 2, rel=1e-12)
    assert scaling.ring_allreduce_s(n, p, 2e10, alpha) > latency   # and the latency term stays


def test_bad_inputs_are_refused_by_name(scaling):
    with pytest.raises(ValueError, match="ranks"):
        scaling.ring_allreduce_s(1e6, 0, 1e9, 1e-6)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        scaling.ring_allreduce_s(1e6, 2, 0, 1e-6)
    with pytest.raises(ValueError, match="fusion threshold"):
        scaling.fuse([1, 2], -1)
    with pytest.raises(ValueError, match="hide"):
        scaling.step_s(1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="ranks >= 2"):
        scaling.fit_ring([(1e6, 1, 1e-3), (1e6, 2, 2e-3)])


def test_bad_flags_are_refused_by_name(scaling, capsys):
    for argv, words in ((["--ranks", "1,x"], "--ranks must be whole numbers"),
                        (["--hide", "1"], "--hide must be in [0, 1)"),
                        (["--gpu-img-s", "0"], "--gpu-img-s must be > 0")):
        with pytest.raises(SystemExit):
            scaling.parse_args(argv)
        assert words in capsys.readouterr().err


def synthetic(scaling, alpha, bandwidth, noise=()):
    sizes = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8]
    samples = [(n, p, scaling.ring_allreduce_s(n, p, bandwidth, alpha)) for p in (2, 4) for n in sizes]
    return [(n, p, t * (1 + (noise[i % len(noise)] if noise else 0))) for i, (n, p, t) in enumerate(samples)]


def test_fit_recovers_a_known_alpha_and_bandwidth(scaling):
    fit = scaling.fit_ring(synthetic(scaling, alpha=2.5e-5, bandwidth=3e9))
    assert fit.alpha_s == pytest.approx(2.5e-5, rel=1e-9)
    assert fit.bandwidth == pytest.approx(3e9, rel=1e-9)
    assert max(abs(e) for e in fit.residuals) < 1e-9
    # with +-3% noise on every time: still within 10%, and the residuals show the noise
    noisy = scaling.fit_ring(synthetic(scaling, 2.5e-5, 3e9, noise=(0.03, -0.03, 0.02, -0.01)))
    assert noisy.alpha_s == pytest.approx(2.5e-5, rel=0.1)
    assert noisy.bandwidth == pytest.approx(3e9, rel=0.1)
    assert 0.005 < max(abs(e) for e in noisy.residuals) < 0.1


def test_fusion_packs_up_to_the_threshold(scaling):
    assert scaling.fuse([10, 20, 30, 100, 5], 50) == [30, 30, 100, 5]     # 100 > threshold: alone
    assert scaling.fuse([10, 20, 30], 0) == [10, 20, 30]                  # 0: no fusion, one message each
    assert scaling.fuse([10, 20, 30], 1000) == [60]
    assert scaling.fuse([10, 20, 30, 1], 60) == [60, 1]    # exactly the threshold fits (Horovod: size <= threshold)


def test_flat_ring_with_uniform_links_is_the_plain_ring(scaling):
    # NVLink steps as slow as network steps: the flat ring is t(n, P) with the node's network bandwidth
    net = scaling.Network("test", nics=2, nic_gbit_s=100.0, alpha_s=4e-6)
    node = scaling.NodeSpec(gpus=4, nvlink_bytes_s=1e12, nvlink_alpha_s=4e-6)
    cost = scaling.flat_allreduce(2e8, 8, node, net)
    assert cost.total_s == pytest.approx(scaling.ring_allreduce_s(2e8, 32, 25e9, 4e-6), rel=1e-12)
    # NCCL's split: 2(nodes-1) network steps, the other 2(P-1) - 2(nodes-1) on NVLink
    node = scaling.NodeSpec(gpus=4, nvlink_bytes_s=1e12, nvlink_alpha_s=1e-6)
    assert scaling.flat_allreduce(2e8, 8, node, net).latency_s == pytest.approx(14 * 4e-6 + 48 * 1e-6, rel=1e-12)


def test_hierarchical_against_hand_computed_values(scaling):
    net = scaling.Network("test", nics=2, nic_gbit_s=100.0, alpha_s=1e-5)          # 25 GB/s per node
    node = scaling.NodeSpec(gpus=4, nvlink_bytes_s=4e11, nvlink_alpha_s=1e-6, host_copy_bytes_s=5e10)
    cost = scaling.hierarchical_allreduce(4e8, 2, node, net)
    # inside: 2 * 3/4 * 4e8 / 4e11 = 1.5 ms and 6 steps of 1 us; copies: 2 * 1e8 / 5e10 = 4 ms;
    # across: 2 * 1/2 * 1e8 / (25e9 / 4) = 16 ms and 2 steps of 10 us
    assert cost.bandwidth_s == pytest.approx(1.5e-3 + 16e-3, rel=1e-12)
    assert cost.latency_s == pytest.approx(6e-6 + 2e-5, rel=1e-12)
    assert cost.copy_s == pytest.approx(4e-3, rel=1e-12)


def test_overlap_and_efficiency(scaling):
    assert scaling.step_s(1.0, 0.5, 0.0) == 1.5
    assert scaling.step_s(1.0, 0.5, 0.3) == pytest.approx(1.2)
    assert scaling.step_s(1.0, 0.5, 0.6) == 1.0                # all hidden, never faster than compute
    one_gpu = scaling.NodeSpec(gpus=1)
    net = scaling.NETWORKS["edr"]
    row = scaling.project([1000, 2000], compute_s=0.05, batch=128, nodes=1, node=one_gpu, net=net,
                          algorithm="flat", bytes_per_element=4, threshold_bytes=0, hide=0.0)
    assert row["allreduce_ms"] == 0.0 and row["efficiency"] == 1.0 and row["images_s"] == pytest.approx(128 / 0.05)


def test_wrn50_2_score_count_from_the_model_builder(scaling, layers):
    assert sum(layers) == 68_814_016 and len(layers) == 54


def test_cited_gpu_step_and_batch(scaling):
    """The per-GPU figure is the log's row, and the batch is the ImageNet recipe's per-GPU batch."""
    log = (REPO / scaling.GPU_STEP_LOG).read_text()
    model, batch, precision = scaling.GPU_STEP_ROW
    rows = [line.split() for line in log.splitlines() if line.split()[:2] == [model, str(batch)]]
    row = next(r for r in rows if r[3] == precision)
    assert float(row[4]) == scaling.GPU_IMG_S and batch == scaling.GPU_BATCH
    recipe = yaml.safe_load((REPO / "configs/imagenet/_base.yaml").read_text())
    assert recipe["batch_size"] == scaling.GPU_BATCH


def test_horovod_facts_the_model_states():
    """bf16 gradients cannot be allreduced by Horovod 0.28.1's torch ops; its fusion default is 128 MiB, its
    cycle 1 ms."""
    horovod = pytest.importorskip("horovod")
    import torch
    from horovod.torch import mpi_ops
    from horovod.torch.compression import Compression
    assert horovod.__version__ == "0.28.1"
    assert hasattr(mpi_ops.mpi_lib, "horovod_torch_allreduce_async_torch_HalfTensor")
    assert not hasattr(mpi_ops.mpi_lib, "horovod_torch_allreduce_async_torch_BFloat16Tensor")
    assert not hasattr(mpi_ops.mpi_lib, "horovod_torch_allreduce_async_torch_cuda_BFloat16Tensor")
    with pytest.raises(ValueError, match="Tensor type torch.BFloat16Tensor is not supported"):
        mpi_ops._check_function(mpi_ops._allreduce_function_factory, torch.zeros(2, dtype=torch.bfloat16))
    assert {name for name in vars(Compression) if not name.startswith("_")} == {"none", "fp16"}
    launch = (Path(horovod.__file__).parent / "runner" / "launch.py").read_text()
    assert re.search(r"--fusion-threshold-mb.*?\(default: 128\)", launch, re.S)
    assert re.search(r"--cycle-time-ms.*?\(default: 1\b", launch, re.S)


def test_readme_holds_the_model_tables(scaling, layers):
    """README's tables are what `python bench/scaling.py --model-only` prints (the defaults)."""
    args = scaling.parse_args(["--model-only"])
    node = scaling.NodeSpec()
    rows = scaling.projections(layers, args, node, scaling.NETWORKS)
    blocks = scaling.model_report(rows, layers, args, node, scaling.NETWORKS)
    tables = [scaling.pipe_table(*block[1:]) for block in blocks if block[0] == "table"]
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Scaling (a model)"):]
    for markdown_table in tables[:2]:                         # the two networks' efficiency tables
        assert markdown_table in section


def test_which_knob_matters_where(scaling, layers):
    """The README's reading of the model: fusion where latency dominates, fp16 and hierarchical where
    bandwidth does, the figures it quotes."""
    def rows_for(*argv):
        return scaling.projections(layers, scaling.parse_args(["--model-only", *argv]), scaling.NodeSpec(),
                                   scaling.NETWORKS)

    rows = rows_for()

    def at(network, nodes, variant, table=rows):
        return next(r for r in table if (r["network"], r["nodes"], r["variant"]) == (network, nodes, variant))

    def eff(network, nodes, variant, table=rows):
        return round(100 * at(network, nodes, variant, table)["efficiency"])

    for network in ("edr", "slingshot"):
        per_layer, fused = at(network, 256, "flat fp32 per-layer"), at(network, 256, "flat fp32 fused")
        assert per_layer["latency_ms"] > 10 * per_layer["bandwidth_ms"]           # latency dominates ...
        assert fused["efficiency"] > 5 * per_layer["efficiency"]                  # ... and fusion fixes it
        assert per_layer["messages"] == 54 and fused["messages"] == 3
        assert at(network, 2, "flat fp16/bf16 fused")["messages"] == 2
        half = at(network, 2, "flat fp16/bf16 fused")
        assert half["bandwidth_ms"] == pytest.approx(at(network, 2, "flat fp32 fused")["bandwidth_ms"] / 2)
    # fusion: EDR 72/75% at 2 nodes, 51/71% at 16, 9/53% at 256; 557 against 31 ms of latency at 256
    assert [eff("edr", n, v) for n in (2, 16, 256) for v in ("flat fp32 per-layer", "flat fp32 fused")] == \
        [72, 75, 51, 71, 9, 53]
    assert round(at("edr", 256, "flat fp32 per-layer")["latency_ms"]) == 557
    assert round(at("edr", 256, "flat fp32 fused")["latency_ms"]) == 31
    one_buffer = rows_for("--fusion-mb", "512")
    assert [eff("edr", 256, v, one_buffer) for v in ("flat fp32 fused", "flat fp16/bf16 fused")] == [65, 73]
    sixty_four = rows_for("--fusion-mb", "64")
    assert [at("edr", 2, v, sixty_four)["messages"] for v in ("flat fp32 fused", "flat fp16/bf16 fused")] == [5, 3]
    # fp16: EDR bandwidth 19-22 ms of a 59 ms step; 75 -> 86% at 2 nodes, 53 -> 65% at 256; Slingshot +4..10
    assert all(19 <= at("edr", n, "flat fp32 fused")["bandwidth_ms"] <= 22 for n in scaling.NODE_COUNTS[1:])
    assert [eff("edr", n, v) for n in (2, 256) for v in ("flat fp32 fused", "flat fp16/bf16 fused")] == [75, 86, 53, 65]
    gains = [eff("slingshot", n, "flat fp16/bf16 fused") - eff("slingshot", n, "flat fp32 fused")
             for n in scaling.NODE_COUNTS[1:]]
    assert min(gains) == 4 and max(gains) == 10
    # hierarchical: EDR 2 nodes 75 -> 80%; 256 nodes 53 -> 59% (fp32), 65 -> 72% (fp16); not better at EDR 16
    # nodes nor on Slingshot up to 64 nodes
    two = at("edr", 2, "flat fp32 fused")
    assert two["bandwidth_ms"] > 50 * two["latency_ms"]                          # EDR, 2 nodes: bandwidth
    assert eff("edr", 2, "hier fp32 fused") == 80
    assert [eff("edr", 256, v) for v in ("hier fp32 fused", "hier fp16/bf16 fused")] == [59, 72]
    for network, nodes in [("edr", 16)] + [("slingshot", n) for n in (2, 4, 8, 16, 32, 64)]:
        assert eff(network, nodes, "hier fp32 fused") <= eff(network, nodes, "flat fp32 fused")
    # overlap 20%: EDR >= 94% up to 64 nodes, Slingshot 100% up to 128; 84% and 95% at 256
    overlap = "hier fp16/bf16 fused, overlap 20%"
    assert min(eff("edr", n, overlap) for n in scaling.NODE_COUNTS if n <= 64) >= 94
    assert min(eff("slingshot", n, overlap) for n in scaling.NODE_COUNTS if n <= 128) == 100
    assert [eff("edr", 256, overlap), eff("slingshot", 256, overlap)] == [84, 95]
    # the H100 figure (1032 img/s at batch 64) moves no efficiency by more than 2 points
    h100 = rows_for("--gpu-img-s", "1032", "--gpu-batch", "64")
    assert max(abs(round(100 * a["efficiency"]) - round(100 * b["efficiency"])) for a, b in zip(rows, h100)) <= 2


def test_bn_parameters_of_a_bn_config_are_few():
    """README: a _bn config adds 68,224 BN parameters to the 68.8M scores."""
    import torch
    from biprop_hpc.models import LayerBuilder, build_model
    with torch.device("meta"):
        model = build_model("wide_resnet50_2", LayerBuilder(learn_batchnorm=True), in_channels=3,
                            num_classes=1000, image_size=224)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "scores" not in n) == 68_224


def test_readme_holds_the_measured_fit(scaling):
    """README's fit table and the figures it quotes are those of the recorded run
    (bench/results/2026-12-06-scaling/scaling.json), refitted by the script's code."""
    import json
    record = json.loads((REPO / "bench/results/2026-12-06-scaling/scaling.json").read_text())
    results = record["measured"]
    fits = scaling.fits_of(results)
    across = record["across_nodes"]
    blocks = scaling.measured_report(results, fits, 68_814_016, across)
    *_, across_table, fit_table = [scaling.pipe_table(*block[1:]) for block in blocks if block[0] == "table"]
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Scaling (a model)"):]
    assert fit_table in section
    prose = " ".join(section.split())      # line breaks anywhere in the quoted sentences
    assert [r["ranks"] for r in results] == [1, 2, 4]
    loads = [value for r in results for value in r["load_average"]]
    assert f"{min(loads):.1f}-{max(loads):.1f}" in prose
    one, two = results[0]["allreduce_ms"], results[1]["allreduce_ms"]
    score = "68814016"
    assert f"256 floats take {one['fp32']['256']:.2f} ms on one rank" in prose
    assert f"{one['mpi4py fp32']['256']:.3f} ms for `MPI_Allreduce`" in prose
    assert round(fits["fp32"][0].alpha_s / fits["mpi4py fp32"][0].alpha_s) == 9 and "alpha is 9x MPI's" in prose
    assert round(sum(r["seconds"] for r in results)) == 277 and "277 s of `mpirun` runs" in prose
    # across the namespace nodes: 2 ranks on each of the fixture's nodes, beside the 4 ranks on one node
    assert across["hosts"] == ["node1", "node1", "node2", "node2"] and across_table in section
    assert f"{round(across['seconds'])} s across the namespace nodes" in prose
    ratios = [across["allreduce_ms"][v][score] / results[2]["allreduce_ms"][v][score] for v in scaling.NODE_VARIANTS]
    assert f"Two nodes took {min(ratios):.2f}-{max(ratios):.2f}x the one-node time" in prose
    rms = [math.sqrt(statistics.mean(e * e for e in fit.residuals)) for fit, _ in fits.values()]
    assert f"residuals of {100 * min(rms):.0f}-{100 * max(rms):.0f}% rms" in prose
    assert f"{two['mpi4py fp32']['1024']:.2f} ms and one of 16,384 floats {two['mpi4py fp32']['16384']:.0f} ms" in prose
    assert (f"{two['fp16 compression'][score] / 1e3:.2f} s against {two['fp32'][score] / 1e3:.2f} s at 2 ranks"
            in prose)
    assert f"takes {two['half tensor'][score] / 1e3:.2f} s" in prose


def test_across_nodes_is_skipped_with_the_reason_where_namespaces_cannot_be_made(scaling, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    across = scaling.launch_across_nodes(scaling.parse_args([]), 1000)
    assert across == {"skipped": "network namespaces need root (`ip netns add`); run the tests as root"}
    [(kind, text)] = scaling.across_nodes_report([], across, {}, 1000)
    assert text == f"MEASURED across nodes: not measured here ({across['skipped']})."


def test_across_nodes_runs_two_ranks_on_each_of_two_namespace_nodes(scaling, monkeypatch):
    """The real measurement, small: 1,000 floats by 2 + 2 ranks on the fixture's two nodes (about 20 s)."""
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from netns_cluster import NamespacesUnavailable, check_namespaces
        check_namespaces()
    except NamespacesUnavailable as why:
        pytest.skip(str(why))
    monkeypatch.setattr(sys, "argv", ["scaling.py"])
    across = scaling.launch_across_nodes(scaling.parse_args(["--repeats", "2"]), 1000)
    assert across["hosts"] == ["node1", "node1", "node2", "node2"] and across["ranks"] == 4
    assert set(across["allreduce_ms"]) == set(scaling.NODE_VARIANTS) == {"fp32", "half tensor", "mpi4py fp32"}
    assert all(0 < times["1000"] < 10_000 for times in across["allreduce_ms"].values())
    text, table = scaling.across_nodes_report([], across, {}, 1000)
    assert "node1 x 2, node2 x 2" in text[1] and table[2][0][:4] == ["fp32", "0", "-", table[2][0][3]]
