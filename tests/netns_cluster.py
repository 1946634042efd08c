"""A real multi-node Slurm cluster on one machine: every node is a Linux network namespace of its own.

    with netns_cluster(tmp_dir, nodes=2, cpus=2) as cluster:
        cluster.run("srun", "-N", "2", "hostname")  # prints the two names in cluster.nodes

The pieces (root only; NamespacesUnavailable says why it cannot run, e.g. not root or no `ip`):
  - a bridge in the root namespace with the first address of a private /24 that this fixture picks and checks
    is used by no address or route of the machine (10.x.y.0/24); slurmctld and munged run in the root namespace
    (slurmctld listens on the bridge's address, the clients of the tests reach it there);
  - per node a network namespace (`ip netns add`) with a veth pair (`eth0` inside, on the bridge outside) and
    the address .11, .12, ... ; slurmd runs in it under `nsenter --net=/run/netns/NS unshare --uts --mount`
    with its own host name (the node name) and an /etc/hosts of all nodes bind-mounted over its own, so job
    tasks see the node's name and address and nothing of the machine's own network (`ip netns exec` would also
    mount a fresh /sys, without the cgroup mounts slurmd needs);
  - munged's socket is a file: the nodes reach it through the shared file system (a network namespace does
    not separate path-named Unix sockets); slurm.conf's NodeAddr are the nodes' addresses; SlurmdSpoolDir,
    SlurmdPidFile, SlurmdLogFile and TmpFS are per node (%n): Slurm's PMIx plugin makes its per-step
    directories under TmpFS, and two nodes sharing /tmp would collide there ("File exists");
  - the nodes share the machine's file system, users, CPUs and process ids: only the network and the host
    name are per node. Open MPI and Horovod take locality (local rank and size) from the launcher's placement.

Everything the fixture makes is named after its tag `<pid>-<hex>`: the namespaces `bm-<tag>-nodeN`, the bridge
`bm-<tag>` and the veths `bm-<tag>vN` (at most 15 characters, the kernel's limit for a link's name); every process
it starts carries BIPROP_NETNS_CLUSTER=<tag> in its environment (so do the jobs, through cluster.env). Teardown
(also when the body raised) does what slurm_cluster's does (cancel, `scontrol shutdown`, stop the daemons, end
every process with this SLURM_CONF), then ends what is left in the namespaces or carries the tag and deletes
namespaces and bridge. At start, what a killed earlier run left behind (a tag whose process no longer exists)
is removed the same way.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from slurm_cluster import (SlurmCluster, SlurmStartError, _slurm_conf, _stop, _sweep, _teardown, find_binaries,
                           free_ports, prepare_directories, start_controller)

PREFIX = "bm-"  # of every namespace, bridge and veth this fixture makes
MARKER = "BIPROP_NETNS_CLUSTER"  # environment variable carried by every process of a cluster
FIRST_HOST = 11  # node i (from 1) has address .(10 + i) of the subnet; the bridge .1


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`/`unshare`, or the kernel refuses)."""


@dataclass
class NetnsCluster(SlurmCluster):
    nodes: list[str] = field(default_factory=list)        # node names = host names, in order
    addresses: dict[str, str] = field(default_factory=dict)  # node name -> its address
    namespaces: dict[str, str] = field(default_factory=dict)  # node name -> its network namespace
    bridge: str = ""
    subnet: str = ""                                       # e.g. 10.57.3.0/24
    tag: str = ""

    def node_states(self) -> dict[str, str]:
        """node name -> sinfo's short state ({} when sinfo fails)."""
        try:
            done = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=10)
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)

    def node_state(self) -> str:
        states = self.node_states()
        return " ".join(f"{node}={states.get(node, '?')}" for node in self.nodes) or "(sinfo failed)"


def check_namespaces() -> None:
    """NamespacesUnavailable with the reason when this process cannot make network namespaces."""
    if os.geteuid() != 0:
        raise NamespacesUnavailable("network namespaces need root (`ip netns add`); run the tests as root")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [name for name in ("ip", "nsenter", "unshare") if shutil.which(name, path=search) is None]
    if missing:
        raise NamespacesUnavailable(f"{', '.join(missing)} missing (Debian packages iproute2, util-linux)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address in or a route to."""
    used = []
    for entry in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return used


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps no address or route of this machine (tries from a seed, e.g. the pid)."""
    used = _used_networks()
    for attempt in range(200):
        value = (seed * 7919 + attempt * 104729) % (250 * 250)
        candidate = ipaddress.ip_network(f"10.{value // 250 + 3}.{value % 250 + 1}.0/24")
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise NamespacesUnavailable("no free 10.x.y.0/24 subnet found for the test cluster's bridge")


def _tag_alive(tag: str) -> bool:
    pid = tag.split("-")[0]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def _marked_processes(tag: str) -> list[int]:
    wanted = f"{MARKER}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def _running(pid: int) -> bool:
    """The process exists and has not ended (a zombie, ended but not yet reaped by its parent, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_all(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for pid in pids if _running(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)


def remove_network(tag: str, namespaces: list[str], bridge: str) -> None:
    """End every process left in the namespaces or carrying the tag, then delete namespaces and bridge (a
    veth goes with the namespace that holds its peer)."""
    pids = set(_marked_processes(tag))
    for namespace in namespaces:
        done = _ip("netns", "pids", namespace, check=False)
        pids.update(int(pid) for pid in done.stdout.split() if pid.isdigit())
    _kill_all(sorted(pids))
    for namespace in namespaces:
        _ip("netns", "delete", namespace, check=False)
    if bridge:
        _ip("link", "delete", bridge, check=False)


def remove_stale() -> list[str]:
    """Remove what clusters of processes that no longer run left behind; their tags."""
    namespaces = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [entry["ifname"] for entry in json.loads(_ip("-j", "link", check=False).stdout or "[]")]
    tags = {name[len(PREFIX):].split("v")[0].rsplit("-node", 1)[0]
            for name in namespaces + links if name.startswith(PREFIX)}
    stale = sorted(tag for tag in tags if not _tag_alive(tag))
    for tag in stale:
        remove_network(tag, [n for n in namespaces if n.startswith(f"{PREFIX}{tag}-node")],
                       f"{PREFIX}{tag}" if f"{PREFIX}{tag}" in links else "")
    return stale


def _make_network(cluster: NetnsCluster, hosts_file: Path) -> None:
    network = ipaddress.ip_network(cluster.subnet)
    bridge_ip = f"{network[1]}/{network.prefixlen}"
    _ip("link", "add", cluster.bridge, "type", "bridge")
    _ip("addr", "add", bridge_ip, "dev", cluster.bridge)
    _ip("link", "set", cluster.bridge, "up")
    lines = []
    for i, node in enumerate(cluster.nodes, start=1):
        namespace, veth = cluster.namespaces[node], f"{cluster.bridge}v{i}"
        _ip("netns", "add", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", veth, "master", cluster.bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{cluster.addresses[node]}/{network.prefixlen}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        lines.append(f"{cluster.addresses[node]} {node}")
    hosts_file.write_text("127.0.0.1 localhost\n" + "\n".join(lines) + "\n")


def _conf(base: str, cluster: NetnsCluster, ctld_host: str, cpus: int) -> str:
    """slurm_cluster's slurm.conf with the controller on the bridge, per-node slurmd files and N nodes."""
    root = cluster.root
    replace = {"SlurmctldHost": f"{ctld_host}({ipaddress.ip_network(cluster.subnet)[1]})",
               "SlurmdSpoolDir": f"{root}/spool/%n", "SlurmdPidFile": f"{root}/run/slurmd-%n.pid",
               "SlurmdLogFile": f"{root}/log/slurmd-%n.log", "TmpFS": f"{root}/tmp/%n"}
    lines = [line for line in base.splitlines() if not line.startswith(("NodeName=", "PartitionName="))]
    lines = [f"{key}={replace.pop(key)}" if (key := line.split("=", 1)[0]) in replace else line for line in lines]
    lines += [f"{key}={value}" for key, value in replace.items()]
    for node in cluster.nodes:
        lines.append(f"NodeName={node} NodeAddr={cluster.addresses[node]} NodeHostname={node} CPUs={cpus} "
                     "RealMemory=1000 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(cluster.nodes)} Default=YES MaxTime=INFINITE State=UP "
                 "OverSubscribe=NO")
    return "\n".join(lines) + "\n"


def slurmd_command(cluster: NetnsCluster, node: str) -> list[str]:
    """The command that runs `node`'s slurmd in its namespace, as the node's host name (also to start it again
    after a test killed it)."""
    return ["nsenter", f"--net=/run/netns/{cluster.namespaces[node]}", "unshare", "--uts", "--mount", "sh", "-c",
            'hostname "$1" && mount --bind "$2" /etc/hosts && exec "$3" -D -f "$4" -N "$1"',
            "sh", node, str(cluster.root / "hosts"), cluster.bins["slurmd"], str(cluster.conf)]


@contextlib.contextmanager
def netns_cluster(tmp_dir: str | os.PathLike, nodes: int = 2, cpus: int = 2, start_timeout: float = 60):
    """Start munged + slurmctld and one slurmd per node namespace under tmp_dir; yield a NetnsCluster once every
    node is idle."""
    if not 1 <= nodes <= 9:  # a veth's name, bm-<tag>v<node>, must stay within 15 characters
        raise ValueError(f"netns_cluster: nodes={nodes}; give 1 to 9")
    check_namespaces()
    bins = find_binaries()
    remove_stale()
    tag = f"{os.getpid()}-{secrets.token_hex(1)}"
    root, munge_socket, cleanup_dirs = prepare_directories(tmp_dir)
    names = [f"node{i}" for i in range(1, nodes + 1)]
    subnet = pick_subnet(os.getpid())
    host = socket.gethostname().split(".")[0]  # slurmctld compares SlurmctldHost with the short host name
    ctld_port, slurmd_port = free_ports(2)
    conf = root / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env |= {"SLURM_CONF": str(conf), MARKER: tag}
    # Open MPI's shared-memory files (btl vader) are named <host>.<job>.<local rank>: node1's of job 1 would be
    # the same file in every cluster of this kind on the machine (its /dev/shm is shared), and two clusters'
    # ranks writing one file can crash (the likely cause of a SIGSEGV in mca_btl_vader_poll_handle_frag seen once
    # here). Each cluster has its own.
    (root / "shm").mkdir(exist_ok=True)
    env["OMPI_MCA_btl_vader_backing_directory"] = str(root / "shm")
    logs = {"munged": root / "log" / "munged.log", "slurmctld": root / "log" / "slurmctld.log",
            **{f"slurmd {node}": root / "log" / f"slurmd-{node}.log" for node in names}}
    cluster = NetnsCluster(root=root, conf=conf, node=names[0], cpus=cpus, env=env, bins=bins, logs=logs,
                           nodes=names, tag=tag, subnet=str(subnet), bridge=f"{PREFIX}{tag}",
                           addresses={node: str(subnet[FIRST_HOST - 1 + i]) for i, node in enumerate(names, 1)},
                           namespaces={node: f"{PREFIX}{tag}-{node}" for node in names})
    base = _slurm_conf(dict(host=host, node=names[0], cpus=cpus, root=root, ctld_port=ctld_port,
                            slurmd_port=slurmd_port, munge_socket=munge_socket,
                            user=pwd.getpwuid(os.geteuid()).pw_name))
    conf.write_text(_conf(base, cluster, host, cpus))

    def start(name: str, *command: str) -> None:
        output = open(root / "log" / f"{name.replace(' ', '-')}.out", "ab")
        try:
            cluster.procs[name] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
        finally:
            output.close()
        logs.setdefault(f"{name} stdout", root / "log" / f"{name.replace(' ', '-')}.out")

    try:
        _make_network(cluster, root / "hosts")
        deadline = start_controller(cluster, start, munge_socket, start_timeout)
        for node in names:
            # nsenter and unshare exec: the Popen's pid is slurmd's. --mount: the bind mount of /etc/hosts stays
            # in this node's mount namespace.
            (root / "spool" / node).mkdir(exist_ok=True)
            (root / "tmp" / node).mkdir(parents=True, exist_ok=True)
            start(f"slurmd {node}", *slurmd_command(cluster, node))
        while True:
            states = cluster.node_states()
            if all(states.get(node) == "idle" for node in names):
                break
            dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not all idle after {start_timeout:.0f} s"
                raise SlurmStartError(f"multi-node Slurm test cluster did not come up ({why}; sinfo: "
                                      f"{states}).\nSLURM_CONF={conf}\n{cluster.diagnostics()}")
            time.sleep(0.2)
        yield cluster
    finally:
        try:
            _teardown(cluster)  # stops "slurmd" only by name: the nodes' slurmd below
            for name, proc in cluster.procs.items():
                if name.startswith("slurmd "):
                    _stop(proc, grace=5)
            _sweep(conf)
        finally:
            remove_network(tag, list(cluster.namespaces.values()), cluster.bridge)
            for directory in cleanup_dirs:
                shutil.rmtree(directory, ignore_errors=True)
