"""Training under a real one-node Slurm cluster: `srun --mpi=pmix` and `sbatch --wait` (see slurm_cluster.py)."""
import shlex
import sys
from pathlib import Path


from biprop_hpc.archive import read_archive

RANKS = 2


def job_env(cluster) -> dict:
    # Open MPI refuses root without these; one thread per rank keeps two ranks on a small machine quick.
    return {**cluster.env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMP_NUM_THREADS": "1"}


def train_command(data: Path, out: Path) -> list[str]:
    return ["srun", "--mpi=pmix", "-n", str(RANKS), sys.executable, "-m", "biprop_hpc", "train",
            "--dataset", "mnist", "--data", str(data), "--model", "conv2", "--width-mult", "0.25",
            "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(out)]


def launcher_env(cluster) -> str:
    """What an srun task sees (for failure messages about launcher detection)."""
    done = cluster.run("srun", "--mpi=pmix", "-n", "1", "bash", "-c", "env | grep -E 'SLURM|PMIX|OMPI|PMI' | sort",
                       env=job_env(cluster), timeout=30)
    return done.stdout + done.stderr


def check_archive(cluster, out: Path, log: str) -> None:
    archives = list(out.rglob("archive.h5"))
    assert len(archives) == 1, f"{archives}\n{log}"
    attrs = read_archive(archives[0]).attrs
    assert attrs["status"] == "completed", log
    assert attrs["world_size"] == RANKS
    assert attrs["controller"] == "mpi"
    assert attrs["launcher"] == "srun", f"launcher {attrs['launcher']!r}; srun task env:\n{launcher_env(cluster)}"


def test_srun_pmix_two_ranks_train(slurm, tiny_idx_dir, tmp_path):
    out = tmp_path / "out"
    done = slurm.run(*train_command(tiny_idx_dir, out), env=job_env(slurm), cwd=tmp_path, timeout=120)
    log = f"{done.stdout}\n{done.stderr}\n{slurm.diagnostics()}"
    assert done.returncode == 0, log
    check_archive(slurm, out, log)


def test_sbatch_wait_runs_srun_inside_the_allocation(slurm, tiny_idx_dir, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "job.sh"
    script.write_text("\n".join([
        "#!/bin/bash",
        f"#SBATCH --ntasks={RANKS}",
        "#SBATCH --job-name=biprop-test",
        f"#SBATCH --output={tmp_path}/slurm-%j.out",
        "set -euo pipefail",
        shlex.join(train_command(tiny_idx_dir, out)),
        "",
    ]))
    done = slurm.run("sbatch", "--wait", "--parsable", str(script), env=job_env(slurm), cwd=tmp_path, timeout=120)
    job_id = done.stdout.strip().split(";")[0]
    outputs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("slurm-*.out"))
    log = f"sbatch: {done.stdout}{done.stderr}\njob output:\n{outputs}\n{slurm.diagnostics()}"
    assert done.returncode == 0, log
    info = slurm.job_info(job_id)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log}"
    check_archive(slurm, out, log)
