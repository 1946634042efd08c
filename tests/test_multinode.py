"""Several nodes for real: a two-node Slurm cluster whose nodes are network namespaces (tests/netns_cluster.py).

`biprop jobs submit --nodes 2` (srun --mpi=pmix) and mpirun inside a two-node allocation each train 4 ranks on 2
hosts; the archive's /ranks table must say which rank ran where with which local rank, and the metrics must be
those of the same 4 ranks on one host (mpirun -np 4), bit for bit (a rank taking its data shard by its local
rank instead of its rank, a bug only several hosts show, fails it: checked). The fixture itself: names, addresses,
/etc/hosts and a free subnet per node; teardown after a failing body; leftovers of a killed run. Skipped where
network namespaces cannot be made (not root, no `ip`/`nsenter`/`unshare`), with the reason.
"""
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from biprop_hpc.archive import RunRecord, read_archive, write_archive
from biprop_hpc.dist import Local
from conftest import write_tiny_dataset
from netns_cluster import NamespacesUnavailable, check_namespaces, netns_cluster, remove_stale
from slurm_cluster import SlurmUnavailable
from test_jobs_slurm import COMPARED, job_ids, logs, submit, wait_until_ended


def _namespaces_missing() -> str:
    try:
        check_namespaces()
    except NamespacesUnavailable as why:
        return str(why)
    return ""


pytestmark = [pytest.mark.skipif(bool(_namespaces_missing()), reason=_namespaces_missing()),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI (env/install.sh installs it)")]

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist" / "conv2_mpt1-32.yaml"
RANKS_PER_NODE = 2
# In every compared run: Horovod's tensor fusion off. Which gradients it fuses into one allreduce depends on when
# each rank has them ready; the fused buffer's size picks Open MPI's allreduce algorithm, and with 4 ranks the
# algorithm decides in which order the 4 values of an element are summed (its last bits).
EXACT_SUMS = {"HOROVOD_FUSION_THRESHOLD": "0"}


def expected_ranks(nodes: list[str]) -> list[dict]:
    """/ranks of 2 ranks on each of the fixture's nodes, placed in blocks (Slurm's and Open MPI's default)."""
    return [{"rank": rank, "host": nodes[rank // RANKS_PER_NODE], "local_rank": rank % RANKS_PER_NODE,
             "local_size": RANKS_PER_NODE, "device": "cpu"} for rank in range(len(nodes) * RANKS_PER_NODE)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with netns_cluster(tmp_path_factory.mktemp("netns"), nodes=2, cpus=RANKS_PER_NODE) as made:
            made.env.update(EXACT_SUMS)  # sbatch passes the environment on to the jobs
            yield made
    except NamespacesUnavailable as why:  # e.g. root in a container without CAP_NET_ADMIN
        pytest.skip(str(why))
    except SlurmUnavailable as missing:
        pytest.fail(str(missing))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def train_args(data: Path, out: Path) -> list[str]:
    """A 2-epoch search on the tiny dataset: 320 training images, 5 steps of 4 x 16 images per epoch."""
    return ["--config", str(CONFIG), "--dataset", "mnist", "--data", str(data), "--out", str(out), "--device", "cpu",
            "--threads", "1", "--width-mult", "0.25", "--batch-size", "16", "--val-fraction", "0.2",
            "--lr-schedule", "constant", "--epochs", "2"]


def mpirun(*args: str) -> list[str]:
    return ["mpirun", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), *args]


@pytest.fixture(scope="module")
def one_node(tiny_data, tmp_path_factory):
    """The reference: the same 4-rank run on one host, plain mpirun -np 4."""
    out = tmp_path_factory.mktemp("one-node")
    done = subprocess.run(mpirun("--oversubscribe", "-np", "4", sys.executable, "-m", "biprop_hpc", "train",
                                 *train_args(tiny_data, out)),
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **EXACT_SUMS})
    assert done.returncode == 0, done.stdout + done.stderr
    record = read_archive(next(out.rglob("archive.h5")))
    assert record.attrs["status"] == "completed" and record.attrs["world_size"] == 4
    assert {row["host"] for row in record.ranks} == {os.uname().nodename}
    assert [row["local_rank"] for row in record.ranks] == [0, 1, 2, 3]
    return record


def assert_placed_like_the_fixture(record, cluster, monkeypatch, log: str) -> None:
    """/ranks against what the fixture made: 2 ranks on each node, local ranks 0 and 1 on each; and the GPU each
    rank would take on nodes with 4 GPUs: 0 and 1 on each node (2 and 3 on node2 would be the global rank's)."""
    assert cluster.nodes == ["node1", "node2"]
    # local_rank = hvd.rank() instead of hvd.local_rank() fails here (checked): 2 and 3 on node2
    assert record.ranks == expected_ranks(cluster.nodes), f"{record.ranks}\n{log}"
    assert record.attrs["job_nodes"] == "node[1-2]"  # Slurm's compressed node list
    # The context's own device choice, with torch told there are 4 GPUs (no GPU here) and each rank's ranks.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.setattr("torch.cuda.set_device", lambda device: None)
    for node in cluster.nodes:
        gpus = []
        for row in (row for row in record.ranks if row["host"] == node):
            ctx = Local()
            ctx.rank, ctx.local_rank, ctx.local_size, ctx.size = row["rank"], row["local_rank"], row["local_size"], 4
            gpus.append(str(ctx.device("auto")))  # select_device(..., self.rank) fails here (checked)
        assert gpus == ["cuda:0", "cuda:1"], (node, gpus)


def assert_same_metrics(record, reference) -> None:
    assert record.attrs["status"] == "completed" and record.attrs["world_size"] == 4
    assert record.metrics["epoch"] == [1, 2]
    assert {name: record.metrics[name] for name in COMPARED} == {name: reference.metrics[name] for name in COMPARED}
    assert record.final == reference.final


def test_every_node_has_its_own_name_and_address(cluster):
    done = cluster.run("srun", "-N", "2", "hostname", timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == cluster.nodes == ["node1", "node2"]
    done = cluster.run("srun", "-N", "2", "--ntasks-per-node", "2", "sh", "-c",
                       'echo "$SLURM_PROCID $(hostname) $SLURM_LOCALID $(hostname -I)"', timeout=60)
    assert done.returncode == 0, done.stderr
    seen = sorted(tuple(line.split()) for line in done.stdout.splitlines())
    assert seen == [(str(r), f"node{r // 2 + 1}", str(r % 2), cluster.addresses[f"node{r // 2 + 1}"])
                    for r in range(4)]
    assert len(set(cluster.addresses.values())) == 2 and os.uname().nodename not in cluster.nodes
    done = cluster.run("srun", "-N", "2", "getent", "hosts", *cluster.nodes, timeout=60)  # each node's /etc/hosts
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(2 * [*cluster.nodes, *cluster.addresses.values()])
    # The subnet was free: in the machine's own namespace only the fixture's bridge has an address in it.
    subnet = ipaddress.ip_network(cluster.subnet)
    links = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    holders = {link["ifname"] for link in links for info in link["addr_info"]
               if ipaddress.ip_address(info["local"]) in subnet}
    assert holders == {cluster.bridge}


def test_without_root_the_reason_is_given(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NamespacesUnavailable, match="need root"):
        check_namespaces()


def test_biprop_job_on_two_nodes_matches_one_node(cluster, tiny_data, one_node, tmp_path, monkeypatch):
    manifest = submit(cluster, tmp_path, *train_args(tiny_data, tmp_path / "runs"), "--nodes", "2",
                      ranks=RANKS_PER_NODE)
    assert "srun --mpi=pmix --nodes=2 --ntasks-per-node=2" in Path(manifest["path"]).with_name("job.sh").read_text()
    [job] = job_ids(manifest)
    info = wait_until_ended(cluster, job, timeout=240)
    log = logs(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", f"{info}\n{log}"
    record = read_archive(Path(manifest["runs"][0]["run_dir"]) / "archive.h5")
    assert record.attrs["launcher"] == "srun" and record.attrs["job_id"] == job
    assert_placed_like_the_fixture(record, cluster, monkeypatch, log)
    assert_same_metrics(record, one_node)


def test_mpirun_in_a_two_node_allocation_matches_one_node(cluster, tiny_data, one_node, tmp_path, monkeypatch):
    # Open MPI's mpirun sees the Slurm allocation and starts its daemon on the other node with srun (its
    # plm/slurm component), which runs it in that node's namespace; the ranks talk TCP over the bridge.
    command = " ".join(mpirun("--bind-to", "none", sys.executable, "-m", "biprop_hpc", "train",
                              *train_args(tiny_data, tmp_path / "runs")))
    script = tmp_path / "mpirun.sh"
    script.write_text(f"#!/bin/bash\nexport OMP_NUM_THREADS=1\n{command}\n")
    done = cluster.run("sbatch", "--parsable", "--nodes=2", f"--ntasks-per-node={RANKS_PER_NODE}", "--time=10",
                       f"--output={tmp_path / 'mpirun.out'}", str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    info = wait_until_ended(cluster, job, timeout=240)
    log = logs(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", f"{info}\n{log}"
    # mpirun's daemon on node2 is the job's step 0, launched by node2's slurmd
    assert f"launch task StepId={job}.0 " in cluster.logs["slurmd node2"].read_text()
    record = read_archive(next((tmp_path / "runs").rglob("archive.h5")))
    assert record.attrs["launcher"] == "mpirun" and record.attrs["job_id"] == job
    assert_placed_like_the_fixture(record, cluster, monkeypatch, log)
    assert_same_metrics(record, one_node)


def test_teardown_removes_everything_also_after_an_error(tmp_path):
    made = {}
    with pytest.raises(RuntimeError, match="the test body failed"):
        with netns_cluster(tmp_path, nodes=2, cpus=1) as cluster:
            made = {"namespaces": list(cluster.namespaces.values()), "bridge": cluster.bridge, "tag": cluster.tag,
                    "pids": [proc.pid for proc in cluster.procs.values()]}
            raise RuntimeError("the test body failed")
    assert made["namespaces"] and made["bridge"]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(namespace in listed for namespace in made["namespaces"]), listed
    assert subprocess.run(["ip", "link", "show", made["bridge"]], capture_output=True).returncode != 0
    assert not [pid for pid in made["pids"] if Path(f"/proc/{pid}").exists()]  # daemons ended and reaped


def test_leftovers_of_a_killed_run_are_removed_at_start():
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()  # pid now unused
    tag = f"{dead}-00"
    namespace, bridge = f"bm-{tag}-node1", f"bm-{tag}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    sleeper = subprocess.Popen(["nsenter", f"--net=/run/netns/{namespace}", "sleep", "600"])
    try:
        assert tag in remove_stale()
        assert sleeper.wait(10) != 0  # ended: it ran in the stale namespace
        assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    finally:
        sleeper.kill()
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)


def test_ranks_table_round_trip_and_older_archives_without_it(tmp_path):
    path = tmp_path / "archive.h5"
    ranks = expected_ranks(["node1", "node2"])
    write_archive(path, RunRecord({"status": "completed", "job_nodes": "node[1-2]"}, ranks=ranks))
    assert read_archive(path).ranks == ranks and read_archive(path).attrs["job_nodes"] == "node[1-2]"
    with h5py.File(path, "a") as h5:  # as written before the table existed
        del h5["ranks"]
    assert read_archive(path).ranks == []
