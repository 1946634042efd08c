"""Several nodes for real: a two-node Slurm cluster whose nodes are network namespaces (tests/netns_cluster.py).

`biprop jobs submit --nodes 2` (srun --mpi=pmix) and mpirun inside a two-node allocation each train 4 ranks on 2
hosts; the archive's /ranks table must say which rank ran where with which local rank, and the metrics must be
those of the same 4 ranks on one host (mpirun -np 4), bit for bit (a rank taking its data shard by its local
rank instead of its rank, a bug only several hosts show, fails it: checked). The fixture itself: names, addresses,
/etc/hosts and a free subnet per node; teardown after a failing body; leftovers of a killed run. Skipped where
network namespaces cannot be made (not root, no `ip`/`nsenter`/`unshare`), with the reason.
On the same cluster, a 2-node job that Slurm's own --time/--signal warning cuts mid-epoch is requeued and continues
exactly, and a node lost mid-epoch (link down, its processes SIGKILLed) ends the job within the documented bound
(README, "A lost node"), with the reason in the archive; submitting again continues exactly.
"""
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import pytest

from biprop_hpc.archive import RunRecord, read_archive, write_archive
from biprop_hpc.dist import Local
from biprop_hpc.train.stopping import DEADLINE_REASON
from conftest import FASHION_MNIST, write_tiny_dataset
from netns_cluster import NamespacesUnavailable, check_namespaces, netns_cluster, remove_stale, slurmd_command
from slurm_cluster import SlurmUnavailable
from test_jobs_slurm import COMPARED, ENDED, job_ids, logs, submit, wait_for_epochs, wait_until_ended


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
            # 4 ranks on this machine's 2 cores, which Slurm cannot tell Open MPI: a rank waiting in MPI must yield
            # its core to the rank it waits for instead of polling (mpirun --oversubscribe does this by itself).
            made.env["OMPI_MCA_mpi_yield_when_idle"] = "1"
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
    assert record.metrics["epoch"] == list(range(1, len(reference.metrics["epoch"]) + 1))
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


# --- a time limit and a lost node on two nodes -----------------------------------------------------------------
# A run long enough for Slurm's own warning to cut it: 3 epochs of 18000 Fashion-MNIST training images (and 2000
# to validate), 282 steps of 4 x 16 images each.
def long_args(out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--data", str(FASHION_MNIST), "--out", str(out), "--device", "cpu",
            "--threads", "1", "--width-mult", "0.25", "--batch-size", "16", "--train-subset", "20000",
            "--test-subset", "256", "--epochs", "3", *extra]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted reference of the long run: 4 ranks on one host, plain mpirun -np 4."""
    out = tmp_path_factory.mktemp("long-one-node")
    done = subprocess.run(mpirun("--oversubscribe", "-np", "4", sys.executable, "-m", "biprop_hpc", "train",
                                 *long_args(out)),
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **EXACT_SUMS})
    assert done.returncode == 0, done.stdout + done.stderr
    record = read_archive(next(out.rglob("archive.h5")))
    assert record.attrs["status"] == "completed" and record.restarts == []
    return record


def test_time_limit_on_two_nodes_checkpoints_requeues_and_continues_exactly(cluster, long_reference, tmp_path,
                                                                             monkeypatch):
    # A real limit: Slurm itself sends USR1 to the tasks --signal-before the end (sbatch(1), --signal: "may be
    # sent up to 60 seconds earlier than specified"), and the ranks' own BIPROP_STOP_AT is the end less the same.
    # 3 minutes less 90 s: the first leg trains for at most ~60 s after its start (25-40 s here), less than the
    # run needs however lightly loaded the machine is: Horovod's background loop runs every 120 ms in this job
    # (HOROVOD_CYCLE_TIME, in ms), and a step's allreduces wait for it, so a step takes at least that, mostly
    # idle (measured: 0.12 to 0.15 s a step), and the run's 846 steps take over 100 s. The sums stay the same
    # (tensor fusion is off: every tensor is its own allreduce, whatever the cycle).
    monkeypatch.setitem(cluster.env, "HOROVOD_CYCLE_TIME", "120")  # sbatch passes it on, also to the requeued job
    manifest = submit(cluster, tmp_path, *long_args(tmp_path / "runs"), "--nodes", "2", "--time", "3m",
                      "--signal-before", "90s", ranks=RANKS_PER_NODE)
    script = Path(manifest["path"]).with_name("job.sh").read_text()
    assert "#SBATCH --time=0-00:03:00" in script and "#SBATCH --signal=USR1@90" in script
    [job] = job_ids(manifest)
    run_dir = Path(manifest["runs"][0]["run_dir"])
    deadline = time.monotonic() + 300
    while "checkpointed; requeue 1 of 3" not in logs(tmp_path):
        assert cluster.job_info(job).get("JobState") not in ENDED and time.monotonic() < deadline, logs(tmp_path)
        time.sleep(1)
    first = read_archive(run_dir / "archive.h5")
    assert first.attrs["status"] != "completed" and len(first.metrics["epoch"]) < 3, logs(tmp_path)
    # The continuation gets a longer limit (a requeued job keeps its own), so that it ends the run however
    # slowly this shared machine goes; the cut and the requeue above were the real ones.
    done = cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=15")
    assert done.returncode == 0, done.stderr
    info = wait_until_ended(cluster, job, timeout=600)
    log = logs(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", f"{info}\n{log}"
    assert info["Restarts"] == "1" and "restart 1 (at most 3)" in log, f"{info}\n{log}"
    record = read_archive(run_dir / "archive.h5")
    [restart] = record.restarts
    assert restart["reason"] in ("SIGUSR1", DEADLINE_REASON) and restart["epoch"] < 3, restart
    assert record.attrs["job_id"] == job
    # The requeued job ran on both nodes again: the /ranks table (written by the last leg) is the fixture's.
    assert_placed_like_the_fixture(record, cluster, monkeypatch, log)
    assert_same_metrics(record, long_reference)
    # `biprop results --out` keeps the table in its copy of the run
    summary = tmp_path / "summary.h5"
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", "results", str(run_dir), "--out", str(summary)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tables = []
    with h5py.File(summary, "r") as h5:
        h5["runs"].visititems(lambda name, item: tables.append(item[()]) if name.endswith("/ranks") else None)
    [table] = tables  # dropped from the summary before (checked)
    assert [{"rank": int(row["rank"]), "host": row["host"].decode(), "local_rank": int(row["local_rank"]),
             "local_size": int(row["local_size"]), "device": row["device"].decode()} for row in table] == record.ranks


def test_lost_node_ends_the_job_in_bounded_time_and_a_resubmission_continues(cluster, long_reference, tmp_path):
    # slurmctld declares a silent node DOWN after SlurmdTimeout (Slurm's default 300 s; the fixture's 30 s) and
    # then requeues its jobs (#SBATCH --requeue). Here Slurm's default, as on a real cluster: what ends the job
    # before that is the ranks' watchdog (hang_timeout) and srun's --wait.
    conf = cluster.conf.read_text()
    cluster.conf.write_text(conf.replace("SlurmdTimeout=30\n", "SlurmdTimeout=300\n"))
    assert cluster.run("scontrol", "reconfigure").returncode == 0
    try:
        args = [*long_args(tmp_path / "runs"), "--hang-timeout", str(HANG_TIMEOUT)]
        manifest = submit(cluster, tmp_path, *args, "--nodes", "2", ranks=RANKS_PER_NODE)
        [job] = job_ids(manifest)
        run_dir = Path(manifest["runs"][0]["run_dir"])
        wait_for_epochs(run_dir, 1, timeout=300, log=tmp_path)
        time.sleep(2)  # into epoch 2
        lost_at = datetime.now(timezone.utc)
        lose_node(cluster, "node2")
        lost = time.monotonic()
        while "failed with exit code" not in logs(tmp_path):  # the batch script's last line
            assert time.monotonic() - lost < 300, f"{cluster.job_info(job)}\n{logs(tmp_path)}"
            time.sleep(0.5)
        ended_after = time.monotonic() - lost
        log = logs(tmp_path)
        # the documented bound: hang_timeout + the watchdog's poll (<= 5 s) + srun --wait + srun's abort wait
        # (KillWait + 2 s); SRUN_WAIT and KILL_WAIT are the hung-rank test's, below
        bound = HANG_TIMEOUT + 5 + SRUN_WAIT + KILL_WAIT + 2
        assert ended_after < bound + 45, f"ended {ended_after:.0f} s after the loss (bound {bound} s)\n{log}"
        assert "failed with exit code 124" in log, log
        record = read_archive(run_dir / "archive.h5")
        reason = record.attrs["end_reason"]
        assert record.attrs["status"] == "failed" and record.metrics["epoch"] == [1], record.attrs
        assert reason.startswith("rank 0 of 4 on node1: no progress for") and "on node2" in reason, reason
        recorded = (datetime.fromisoformat(record.attrs["end_time"]) - lost_at).total_seconds()
        assert HANG_TIMEOUT <= recorded < HANG_TIMEOUT + 5 + 30, recorded  # + poll, + slack
        print(f"lost node: the ranks recorded it after {recorded:.0f} s, the job ended after {ended_after:.0f} s")

        bring_back(cluster, "node2")
        assert wait_until_ended(cluster, job, timeout=120)["JobState"] == "FAILED"
        manifest = submit(cluster, tmp_path, *args, "--nodes", "2", ranks=RANKS_PER_NODE)  # the same command
        assert len(manifest["submissions"]) == 2
        [again] = job_ids(manifest)
        info = wait_until_ended(cluster, again, timeout=400)
        log = logs(tmp_path)
        assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", f"{info}\n{log}"
        record = read_archive(run_dir / "archive.h5")
        [restart] = record.restarts
        assert restart["epoch"] == 1 and restart["reason"] == reason, restart  # from epoch 1's checkpoint
        assert record.attrs["job_id"] == again and "taking over the lock" not in log, log
        assert_same_metrics(record, long_reference)
    finally:
        if cluster.procs["slurmd node2"].poll() is not None:
            bring_back(cluster, "node2")
        cluster.conf.write_text(conf)
        cluster.run("scontrol", "reconfigure")
        deadline = time.monotonic() + 60
        while cluster.node_states() != {"node1": "idle", "node2": "idle"} and time.monotonic() < deadline:
            time.sleep(1)


HANG_TIMEOUT = 20  # s: the ranks' watchdog in the lost-node test


def lose_node(cluster, node: str) -> None:
    """The node dies: its link goes down first, so that nothing it does from now on reaches the others (a dead
    machine sends no TCP reset), then every process in its namespace (slurmd, slurmstepd, the tasks) is SIGKILLed."""
    namespace = cluster.namespaces[node]
    subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=True).stdout
    for pid in (int(pid) for pid in pids.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.procs[f"slurmd {node}"].wait(10)


def bring_back(cluster, node: str) -> None:
    """The node is repaired: link up, its slurmd started again (the fixture's teardown stops it)."""
    subprocess.run(["ip", "-n", cluster.namespaces[node], "link", "set", "eth0", "up"], check=True)
    output = open(cluster.root / "log" / f"slurmd-{node}-again.out", "ab")
    with output:
        cluster.procs[f"slurmd {node}"] = subprocess.Popen(slurmd_command(cluster, node), env=cluster.env,
                                                           stdin=subprocess.DEVNULL, stdout=output,
                                                           stderr=subprocess.STDOUT, start_new_session=True,
                                                           cwd=cluster.root)


# --- a hung rank on two nodes (tests/hang_worker.py under srun) ------------------------------------------------
# srun as the job scripts run it (jobs/templates/slurm.sh.j2): --wait=60 ends the stopped rank 60 s after the
# others ended, and Slurm's kill (SIGCONT, SIGTERM, SIGKILL after KillWait: 5 s in the fixture) follows.
SRUN_WAIT, KILL_WAIT = 60, 5


def test_a_rank_stopped_on_node2_is_named_and_the_job_ends_within_the_bound(cluster, tiny_data, tmp_path):
    from test_hang import HANG_MARGIN, REPO, WORKER, sha256  # the one-node hang test's worker and slack
    timeout = 10.0
    out = tmp_path / "runs"
    out.mkdir()
    # rank 3 (the second rank on node2) stops after its 7th optimizer step: step 2 of epoch 2 (5 steps an epoch)
    command = ["srun", "--mpi=pmix", "--nodes=2", f"--ntasks-per-node={RANKS_PER_NODE}", f"--wait={SRUN_WAIT}",
               sys.executable, WORKER, str(out), "stop:7:3", *train_args(tiny_data, out), "--name", "run",
               "--hang-timeout", str(timeout)]
    script = tmp_path / "hang.sh"
    script.write_text(f"#!/bin/bash\nexport OMP_NUM_THREADS=1 PYTHONPATH={REPO}\n" + " ".join(command) + "\n")
    done = cluster.run("sbatch", "--parsable", "--nodes=2", f"--ntasks-per-node={RANKS_PER_NODE}", "--time=10",
                       f"--output={tmp_path / 'hang.out'}", str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    stopped = out / "stopped"
    deadline = time.monotonic() + 240
    while not stopped.exists() and time.monotonic() < deadline and cluster.job_info(job).get("JobState") not in ENDED:
        time.sleep(0.1)
    stopped_at = time.monotonic()
    assert stopped.exists(), logs(tmp_path)
    last = next(out.rglob("checkpoints/last.pt"))
    before = sha256(last)
    bound = timeout + HANG_MARGIN + SRUN_WAIT + KILL_WAIT
    info = wait_until_ended(cluster, job, timeout=bound + 60)
    ended_after = time.monotonic() - stopped_at
    log = logs(tmp_path)
    # srun's exit code is its tasks' highest: 124 from the live ranks' watchdogs, 137 (measured) for the stopped
    # rank, which Slurm kills once the step ends (its PMIx plugin aborts the step when a task exits: at once)
    assert info["JobState"] == "FAILED" and info["ExitCode"] in ("124:0", "137:0"), f"{info}\n{log}"
    assert "Exited with exit code 124" in log, log
    assert timeout - 1 <= ended_after <= bound, (ended_after, log)
    print(f"the job ended {ended_after:.1f} s after rank 3 stopped (hang_timeout {timeout:g} s)")
    lines = [line for line in log.splitlines() if "no progress for" in line]
    # the three live ranks (two of them on node1) each name rank 3 on node2; the stopped one says nothing
    assert sorted(line.split("] ", 1)[1].split(":")[0] for line in lines) == \
        ["rank 0 of 4 on node1", "rank 1 of 4 on node1", "rank 2 of 4 on node2"], log
    for line in lines:
        assert "for rank 3 of 4 on node2, silent for " in line and "(no heartbeat: stopped, or its node is lost)" \
            in line, line
    record = read_archive(next(out.rglob("archive.h5")))
    assert record.attrs["status"] == "failed" and "for rank 3 of 4 on node2, silent for" in record.attrs["end_reason"]
    assert sha256(last) == before  # the last checkpoint is intact
    assert record.metrics["epoch"] == [1]
