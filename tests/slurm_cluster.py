"""A throwaway one-machine SLURM cluster for the tests: munged, MariaDB, slurmdbd, slurmctld and two nodes.

    python tests/slurm_cluster.py install          # apt-get the packages where missing (what .ci/run does)
    python tests/slurm_cluster.py start <folder>   # prints the environment a client command needs
    python tests/slurm_cluster.py stop <folder>

Run as root (the daemons run as root). Everything lives in <folder>: the configs, the munge key and socket,
the database, slurm's state, spool, logs and pid files; each daemon listens on a free port of 127.0.0.1. The
nodes n1 and n2 (one CPU each) are two `slurmd -N` on this host, in one partition, `debug`.

Timing for tests (slurm 22.05; the settings are in `_slurm_conf`):
- A requeued job (`scontrol requeue`, or submitit's handler of the warning signal) is held back until
  `now + cred_expire + 1` (src/slurmctld/job_mgr.c), 121 s by default. The config sets
  `AuthInfo=...,cred_expire=10` (slurm's minimum is 5; it is also how long a step has to launch) and
  `SchedulerParameters=sched_interval=1`, so a requeued job runs again about 11 s later. `scontrol update
  jobid=X StartTime=now` once the job is PENDING again makes it run within a second or two (`scontrol release`
  changes nothing: a requeued job is not held).
- `--signal=[B:]SIG@T` is checked on the controller's 30 s time-limit pass (PERIODIC_TIMEOUT, compiled in, no
  setting): the signal comes when at most T + 30 s are left, i.e. up to 30 s (slurm says 60) before T. A job
  with `--time=1 --signal=B:USR2@60` gets it on the first pass, within 30 s of starting;
  `scancel --batch --signal=USR2 <jobid>` delivers it at once.
- KillWait=5 s from SIGTERM to SIGKILL at a time limit or cancel; finished jobs stay in scontrol for MinJobAge=300 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmdbd", "munge", "mariadb-server"]
BINARIES = ["munged", "mungekey", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld", "slurmd"]
BINARIES += ["sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo", "sacct", "sacctmgr"]
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"])
CLUSTER_NAME = "testcluster"
NODES = ("n1", "n2")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", *(f"slurmd-{node}" for node in NODES))  # start order
DB_NAME, DB_USER, DB_PASS = "slurm_acct_db", "slurm", "slurm"
CRED_EXPIRE = 10  # seconds: a step must launch within it; a requeued job waits it + 1 s (slurm: 120, at least 5)

_apt_updated = False


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _bin(name: str) -> str:
    path = _which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install_packages() installs {' '.join(PACKAGES)}")
    return path


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if _which(name) is None]


def why_unavailable() -> str | None:
    """Why the cluster cannot be started here, or None."""
    if not sys.platform.startswith("linux"):
        return f"not Linux but {sys.platform}"
    if os.geteuid() != 0:
        return "not root (its daemons run as root, its packages come from apt-get)"
    missing = missing_binaries()
    if missing and _which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install {' '.join(PACKAGES)}"
    return None


def install_packages() -> None:
    """apt-get install the packages when a binary is missing (apt-get update once per process)."""
    global _apt_updated
    if not missing_binaries():
        return
    apt = _which("apt-get")
    if apt is None:
        raise RuntimeError(f"no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    # keep the packages' scripts from starting system-wide munged and mariadbd
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        if not _apt_updated:
            _check([apt, *lock, "update", "-q"], env=env, timeout=900)
            _apt_updated = True
        _check([apt, *lock, "install", "-y", "-q", *PACKAGES], env=env, timeout=1800)
    finally:
        if made_policy:
            policy.unlink()
    if missing := missing_binaries():
        raise RuntimeError(f"{', '.join(missing)} still missing after apt-get install {' '.join(PACKAGES)}")


def _check(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{_tail(result.stdout + result.stderr)}")
    return result


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child, just reaped
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _terminate(pids: list[int], timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL what is still there after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        pids = [pid for pid in pids if _pid_alive(pid)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while (pids := [pid for pid in pids if _pid_alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)


class SlurmCluster:
    """The daemons of one cluster in `folder`; `start()`, `stop()`, and `run()` client commands with `env`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        self.etc, self.run_dir, self.log_dir = self.folder / "etc", self.folder / "run", self.folder / "log"
        self.conf = self.etc / "slurm.conf"
        self.munge_socket = self.run_dir / "munge.socket"
        self.db_socket = self.run_dir / "mariadb.socket"
        self.ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a client command (sbatch, srun, sacct, submitit) needs in its environment."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def marker(self) -> bytes:
        """In the environment of every daemon (and slurmstepd) of this cluster."""
        return f"SLURM_TEST_CLUSTER={self.folder}".encode()

    def run(self, cmd: list[str], *, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """Run a client command with `env`; text output captured unless told otherwise."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        result = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=env, timeout=timeout, **kw)
        if check and result.returncode:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout or ''}{result.stderr or ''}"
            )
        return result

    # start and stop

    def start(self, timeout: float = 120) -> None:
        """Start every daemon (after stopping leftovers of an earlier start) and wait until both nodes are idle."""
        if all(self._alive(name) for name in DAEMONS):
            self._wait(DAEMONS, self._nodes_idle, timeout)
            return
        self.stop()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        for folder in (self.etc, self.run_dir, self.log_dir, self.folder / "state", self.folder / "pids"):
            folder.mkdir(parents=True, exist_ok=True)
        for node in NODES:
            (self.folder / "spool" / node).mkdir(parents=True, exist_ok=True)
        listeners = ("slurmctld", "slurmdbd", "mariadb", *NODES)
        self.ports = dict(zip(listeners, _free_ports(len(listeners))))
        self._start_munged(timeout)
        self._start_mariadb(timeout)
        self._write(self.etc / "slurmdbd.conf", self._slurmdbd_conf(), mode=0o600)
        self._write(self.conf, self._slurm_conf())
        self._spawn("slurmdbd", [_bin("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.ports["slurmdbd"]), timeout)
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i"])
        self._wait("slurmctld", lambda: _port_open(self.ports["slurmctld"]), timeout)
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_bin("slurmd"), "-D", "-N", node])
        self._wait(DAEMONS, self._nodes_idle, timeout)
        self._wait(DAEMONS, self._cluster_registered, timeout)

    def stop(self, timeout: float = 20) -> None:
        """Cancel the jobs, then stop every daemon and slurmstepd of this cluster."""
        if self._alive("slurmctld") and self.conf.exists():
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=30).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False, timeout=30)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False, timeout=30).stdout:
                    time.sleep(0.5)
        for name in reversed(DAEMONS):
            if self._alive(name):
                _terminate([self._pid(name)], timeout)
            (self.folder / "pids" / name).unlink(missing_ok=True)
        self._procs.clear()
        _terminate(self._strays(), timeout=2)

    def _strays(self) -> list[int]:
        """slurmstepd and job processes of this cluster still there (when slurmctld could not cancel the jobs)."""
        job_conf = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                env = _environ(int(entry.name)).split(b"\0")
                if self.marker in env or (job_conf in env and any(var.startswith(b"SLURM_JOB_ID=") for var in env)):
                    pids.append(int(entry.name))
        return pids

    def task_pid(self, job_id: str, rank: int) -> int | None:
        """The Python process of task `rank` (SLURM_PROCID) of a running job of this cluster (its nodes are
        this machine), or None."""
        wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and wanted <= set(_environ(int(entry.name)).split(b"\0")):
                try:
                    if b"python" in (entry / "cmdline").read_bytes():
                        return int(entry.name)
                except OSError:  # ended meanwhile
                    continue
        return None

    # the daemons

    def _start_munged(self, timeout: float) -> None:
        key = self.etc / "munge.key"
        if not key.exists():
            _check([_bin("mungekey"), "--create", f"--keyfile={key}"])
        key.chmod(0o600)
        self.munge_socket.unlink(missing_ok=True)
        run = self.run_dir
        self._spawn(
            "munged",
            [
                _bin("munged"),
                "--foreground",  # logs to its output
                "--force",  # whatever the folder's permissions
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={run}/munged.pid",
                f"--seed-file={run}/munged.seed",
            ],
        )
        self._wait("munged", self.munge_socket.exists, timeout)

    def _start_mariadb(self, timeout: float) -> None:
        data = self.folder / "mariadb"
        if not (data / "mysql").exists():
            _check(
                [
                    _bin("mariadb-install-db"),
                    "--no-defaults",
                    f"--datadir={data}",
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                timeout=timeout,
            )
        self.db_socket.unlink(missing_ok=True)
        self._spawn(
            "mariadbd",
            [
                _bin("mariadbd"),
                "--no-defaults",
                f"--datadir={data}",
                "--user=root",
                f"--socket={self.db_socket}",
                f"--port={self.ports['mariadb']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={data}/mariadbd.pid",
                f"--log-error={self.log_dir}/mariadbd.log",
                "--innodb-buffer-pool-size=64M",
            ],
        )
        self._wait("mariadbd", self.db_socket.exists, timeout)
        user = f"'{DB_USER}'@'127.0.0.1'"
        sql = (
            f"CREATE DATABASE IF NOT EXISTS {DB_NAME}; CREATE USER IF NOT EXISTS {user} IDENTIFIED BY '{DB_PASS}';"
            f" GRANT ALL ON {DB_NAME}.* TO {user};"
        )
        _check([_bin("mariadb"), "--no-defaults", f"--socket={self.db_socket}", "-uroot", "-e", sql], timeout=timeout)

    def _slurmdbd_conf(self) -> str:
        return f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports["slurmdbd"]}
SlurmUser=root
DebugLevel=info
LogFile={self.log_dir}/slurmdbd.log
PidFile={self.run_dir}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports["mariadb"]}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""

    def _slurm_conf(self) -> str:
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.ports[node]} CPUs=1 RealMemory=2048"
            for node in NODES
        )
        return f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ports["slurmctld"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={self.folder}/state
SlurmdSpoolDir={self.folder}/spool/%n
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=300
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports["slurmdbd"]}
AccountingStoragePass={self.munge_socket}
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    # helpers

    def _write(self, path: Path, text: str, mode: int = 0o644) -> None:
        path.write_text(text)
        path.chmod(mode)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        env = {**os.environ, **self.env, "SLURM_TEST_CLUSTER": str(self.folder)}
        with open(self.log_dir / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.folder,
                start_new_session=True,
            )
        self._procs[name] = proc
        (self.folder / "pids" / name).write_text(f"{proc.pid}\n")

    def _pid(self, name: str) -> int | None:
        if name in self._procs:
            return self._procs[name].pid
        try:
            pid = int((self.folder / "pids" / name).read_text())
        except (OSError, ValueError):
            return None
        return pid if self.marker in _environ(pid).split(b"\0") else None  # not a reused pid

    def _alive(self, name: str) -> bool:
        if name in self._procs:
            return self._procs[name].poll() is None
        pid = self._pid(name)
        return pid is not None and _pid_alive(pid)

    def _wait(self, names: str | tuple[str, ...], ready: Callable[[], bool], timeout: float) -> None:
        """Until `ready()`; raise with the log of the first of `names` that exited, or of them all at the timeout."""
        names = (names,) if isinstance(names, str) else names
        deadline = time.monotonic() + timeout
        while not ready():
            if dead := [name for name in names if not self._alive(name)]:
                raise RuntimeError(
                    f"{dead[0]} of the SLURM test cluster in {self.folder} exited:\n{self.log_tail(dead[0])}"
                )
            if time.monotonic() > deadline:
                logs = "\n".join(self.log_tail(name) for name in names)
                raise RuntimeError(
                    f"{', '.join(names)} of the SLURM test cluster not ready in {timeout:.0f} s:\n{logs}"
                )
            time.sleep(0.2)

    def _nodes_idle(self) -> bool:
        states = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=30).stdout.split()
        return states == [word for node in NODES for word in (node, "idle")]

    def _cluster_registered(self) -> bool:
        cmd = ["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"]
        return CLUSTER_NAME in self.run(cmd, check=False, timeout=30).stdout.split()

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a daemon's log and of its output."""
        texts = []
        for path in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"):
            if path.exists() and (text := path.read_text(errors="replace").strip()):
                texts.append(f"--- {path}\n{_tail(text, lines)}")
        return "\n".join(texts) or f"(no log in {self.log_dir})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "start", "stop"])
    parser.add_argument("folder", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.action == "install":
        install_packages()
        return
    if args.folder is None:
        parser.error(f"{args.action} needs the cluster's folder")
    cluster = SlurmCluster(args.folder)
    if args.action == "stop":
        cluster.stop()
        return
    if reason := why_unavailable():
        sys.exit(f"cannot start a SLURM test cluster: {reason}")
    install_packages()
    began = time.monotonic()
    cluster.start()
    print(f"# SLURM test cluster up in {time.monotonic() - began:.1f} s; stop: {sys.argv[0]} stop {cluster.folder}")
    for key, value in cluster.env.items():
        print(f"export {key}={value}")


if __name__ == "__main__":
    main()
