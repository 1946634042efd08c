"""A real one-node Slurm cluster (munged + slurmctld + slurmd) that lives entirely in a temporary directory.

    with slurm_cluster(tmp_dir) as cluster:
        subprocess.run(["srun", "-n", "2", "hostname"], env=cluster.env, check=True)

Nothing is exported globally: `cluster.env` is a copy of os.environ without inherited SLURM_*/SBATCH_*/SALLOC_*
variables (so a test run inside a real job does not talk to the site's scheduler) plus SLURM_CONF pointing at
this cluster's slurm.conf. Munge has its own key, socket, pid, seed and log files; Slurm has its own state, spool,
pid and log files and free TCP ports, so several clusters (or a site Slurm) can coexist on one machine.

The node is declared with `cpus` CPUs (default 4) whatever the machine has (SlurmdParameters=config_overrides),
so a few tasks never wait for CPUs. Teardown cancels jobs, runs `scontrol shutdown`, stops the daemons by pid and
finally ends any process still carrying this cluster's SLURM_CONF (stray slurmstepd or job tasks), also when the
test body raised. Tested as root (SlurmUser is whoever runs the tests).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "srun", "sbatch", "scontrol", "scancel", "squeue")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # daemons live here; a non-root PATH often lacks it
INSTALL_HINT = "`bash env/install.sh` installs them (Debian packages slurmctld slurmd slurm-client munge)"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes


class SlurmUnavailable(RuntimeError):
    """The Slurm/munge binaries are not installed."""


class SlurmStartError(RuntimeError):
    """The cluster did not come up; the message holds the daemons' log tails."""


def find_binaries() -> dict[str, str]:
    """name -> absolute path for every binary the cluster needs; SlurmUnavailable names what is missing."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    found = {name: shutil.which(name, path=search) for name in BINARIES}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise SlurmUnavailable(f"Slurm/munge binaries missing: {', '.join(missing)}; {INSTALL_HINT}")
    return found  # type: ignore[return-value]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free right now (bound together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as error:
        return f"    ({path}: {error.strerror})"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty)"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    cpus: int
    env: dict[str, str]
    bins: dict[str, str]
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command (`sinfo`, `srun`, ...) against this cluster, output captured as text."""
        command = [self.bins.get(args[0], args[0]), *args[1:]]
        kwargs.setdefault("env", self.env)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)

    def node_state(self) -> str:
        try:
            done = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%t", timeout=10)
        except subprocess.TimeoutExpired:
            return "(sinfo timed out)"
        return done.stdout.strip() if done.returncode == 0 else f"(sinfo failed: {done.stderr.strip()})"

    def diagnostics(self) -> str:
        parts = []
        for name, proc in self.procs.items():
            rc = proc.poll()
            parts.append(f"{name} (pid {proc.pid}): " + ("running" if rc is None else f"EXITED with {rc}"))
        for name, path in self.logs.items():
            if not path.exists():  # munged in the foreground logs to its stdout, not --log-file
                continue
            parts.append(f"--- {name} log tail ({path}):\n{tail(path)}")
        return "\n".join(parts)

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, ...); {} once the record is gone."""
        done = self.run("scontrol", "-o", "show", "job", job_id, timeout=10)
        return dict(item.split("=", 1) for item in done.stdout.split() if "=" in item) if done.returncode == 0 else {}


def _write_munge_key(path: Path) -> None:
    # Like `dd if=/dev/urandom bs=1 count=1024`, but never world-readable, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(1024))


def _slurm_conf(c: dict) -> str:
    return f"""\
ClusterName=biproptest
SlurmctldHost={c['host']}(127.0.0.1)
SlurmctldPort={c['ctld_port']}
SlurmdPort={c['slurmd_port']}
SlurmUser={c['user']}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c['munge_socket']},cred_expire=10
StateSaveLocation={c['root']}/state
SlurmdSpoolDir={c['root']}/spool
SlurmctldPidFile={c['root']}/run/slurmctld.pid
SlurmdPidFile={c['root']}/run/slurmd.pid
SlurmctldLogFile={c['root']}/log/slurmctld.log
SlurmdLogFile={c['root']}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={c['root']}/log/jobcomp.txt
ReturnToService=2
MpiDefault=pmix
MailProg=/bin/true
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName={c['node']} NodeAddr=127.0.0.1 NodeHostname={c['host']} CPUs={c['cpus']} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={c['node']} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def _processes_with(variable: str) -> list[int]:
    """Pids of processes (other than us) whose environment holds exactly `variable` (e.g. SLURM_CONF=<ours>)."""
    wanted = variable.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ:
            pids.append(int(entry.name))
    return pids


def _sweep(conf: Path) -> list[int]:
    """End every process that inherited this cluster's SLURM_CONF (only ones this cluster started have it)."""
    marker = f"SLURM_CONF={conf}"
    pids = _processes_with(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in _processes_with(marker) if p in pids]
        if not pids:
            break
    return pids


def prepare_directories(tmp_dir: str | os.PathLike) -> tuple[Path, Path, list[Path]]:
    """The cluster's directories under tmp_dir/slurm and its munge key: (root, munge socket path, directories
    to remove at teardown: a short one for the socket when tmp_dir's path is too long for it)."""
    root = Path(tmp_dir).resolve() / "slurm"
    for sub in ("state", "spool", "run", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged and slurmd check their directories' permissions
    munge_dir = root / "munge"
    cleanup_dirs = []
    if len(str(munge_dir / "munge.socket")) > SOCKET_PATH_MAX:
        munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        cleanup_dirs.append(munge_dir)
    os.chmod(munge_dir, 0o755)
    key = root / "munge" / "munge.key"
    if not key.exists():
        _write_munge_key(key)
    return root, munge_dir / "munge.socket", cleanup_dirs


@contextlib.contextmanager
def slurm_cluster(tmp_dir: str | os.PathLike, cpus: int = 4, start_timeout: float = 30):
    """Start munged + slurmctld + slurmd under tmp_dir, wait for the node to be idle, yield a SlurmCluster."""
    bins = find_binaries()
    root, munge_socket, cleanup_dirs = prepare_directories(tmp_dir)
    host = socket.gethostname().split(".")[0]  # slurmctld compares SlurmctldHost with the short host name
    ctld_port, slurmd_port = free_ports(2)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(dict(host=host, node=host, cpus=cpus, root=root, ctld_port=ctld_port,
                                     slurmd_port=slurmd_port, munge_socket=munge_socket,
                                     user=pwd.getpwuid(os.geteuid()).pw_name)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env["SLURM_CONF"] = str(conf)
    logs = {"munged": root / "log" / "munged.log", "slurmctld": root / "log" / "slurmctld.log",
            "slurmd": root / "log" / "slurmd.log"}
    cluster = SlurmCluster(root=root, conf=conf, node=host, cpus=cpus, env=env, bins=bins, logs=logs)

    def start(name: str, *command: str) -> None:
        output = open(root / "log" / f"{name}.out", "ab")
        try:
            cluster.procs[name] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                                   stderr=subprocess.STDOUT, start_new_session=True,
                                                   cwd=root)
        finally:
            output.close()
        logs.setdefault(f"{name} stdout", root / "log" / f"{name}.out")

    try:
        deadline = start_controller(cluster, start, munge_socket, start_timeout)
        start("slurmd", bins["slurmd"], "-D", "-f", str(conf), "-N", host)
        state = ""
        while True:
            state = cluster.node_state()
            if state == "idle":
                break
            dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not idle after {start_timeout:.0f} s"
                raise SlurmStartError(f"Slurm test cluster did not come up ({why}; last sinfo state of node "
                                      f"{host}: {state!r}).\nSLURM_CONF={conf}\n{cluster.diagnostics()}")
            time.sleep(0.2)
        yield cluster
    finally:
        _teardown(cluster)
        for directory in cleanup_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def start_controller(cluster, start, munge_socket: Path, start_timeout: float) -> float:
    """munged (waited for: slurmctld needs its socket), then slurmctld, through `start(name, *command)`; the
    deadline (time.monotonic) by which the whole cluster must be up."""
    root, bins = cluster.root, cluster.bins
    start("munged", bins["munged"], "--foreground", "--force", f"--socket={munge_socket}",
          f"--key-file={root / 'munge' / 'munge.key'}", f"--pid-file={root / 'run' / 'munged.pid'}",
          f"--seed-file={root / 'munge' / 'munged.seed'}", f"--log-file={cluster.logs['munged']}")
    deadline = time.monotonic() + start_timeout
    while not munge_socket.exists():
        if cluster.procs["munged"].poll() is not None or time.monotonic() > deadline:
            raise SlurmStartError(f"munged did not create {munge_socket}\n{cluster.diagnostics()}")
        time.sleep(0.05)
    start("slurmctld", bins["slurmctld"], "-D", "-c", "-f", str(cluster.conf))
    return deadline


def _teardown(cluster: SlurmCluster) -> None:
    ours = set(_processes_with(f"SLURM_CONF={cluster.conf}"))  # daemons, slurmstepd, job tasks
    ctld = cluster.procs.get("slurmctld")
    if ctld is not None and ctld.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            cluster.run("scancel", "--partition=debug", timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                queue = cluster.run("squeue", "-h", "-t", "all", "-o", "%i %T", timeout=10)
                if queue.returncode != 0 or not any(state in queue.stdout
                                                    for state in ("RUNNING", "COMPLETING", "PENDING")):
                    break
                time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            cluster.run("scontrol", "shutdown", timeout=10)
    for name in ("slurmd", "slurmctld"):
        proc = cluster.procs.get(name)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            _stop(proc, grace=5)
    _sweep(cluster.conf)  # stray slurmstepd / job tasks
    munged = cluster.procs.get("munged")
    if munged is not None:
        _stop(munged, grace=5)
    # slurmstepd is reparented to init when slurmd exits; give init a moment to reap it, so that a
    # `pgrep slurm` right after the tests finds nothing (not even a <defunct> entry).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ours):
        time.sleep(0.1)
