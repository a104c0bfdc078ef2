"""A real Ray cluster on this machine for tests and bench/scale.py: a head and worker nodes,
each a `ray start --block` process of its own (so one node can be stopped or killed without
`ray stop`, which would end every Ray process on the machine), all on 127.0.0.1.

    cluster = RayCluster(tmp, gpu_resource="dipnode_gpu")
    cluster.start_head(cpus=1, gpus=0)      # the head: GCS (+ its own raylet)
    cluster.add_worker(cpus=1, gpus=1)      # a "GPU worker": the custom resource stands in
    cluster.wait_for(nodes=2, gpus=1)
    ... cluster.address ...
    cluster.stop()

Ray's GCS and raylets listen on every interface (Ray 2.60 has no bind-address option); the
nodes advertise 127.0.0.1, so all traffic between them stays on loopback.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers import LOOPBACK, free_port

RAY_BIN = Path(sys.executable).parent / "ray"

#: Polls the cluster from a separate process (the test process never becomes a Ray driver).
_WAIT = """
import json, sys, time, ray
address, nodes, resource, amount, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
end = time.monotonic() + timeout
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources().get(resource, 0.0)
    if len(alive) == nodes and total == amount:
        print(json.dumps({"nodes": len(alive), resource: total}))
        break
    if time.monotonic() > end:
        sys.exit(f"cluster: expected {nodes} nodes and {amount} {resource}, got {len(alive)} and {total}")
    time.sleep(0.5)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
                # One torch thread per task, like the suite (2 cores shared).
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                # A dead node is noticed in seconds rather than the default ~30 s.
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    return env


class RayNode:
    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")
        self._offset = self._log.tell()  # a restart appends to the same log: read what is new
        self.proc = subprocess.Popen([str(RAY_BIN), "start", "--block", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=_env(), start_new_session=True)

    def started(self, timeout_s: float = 120.0) -> bool:
        """Whether `ray start` says the node runs (False: it exited, e.g. Ray's fixed 30 s
        wait for a raylet to register ran out on a busy machine)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if b"Ray runtime started" in self.log_path.read_bytes()[self._offset:]:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole node (its `ray start`, raylet, workers: one process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # what the SIGTERM left (workers) ends with the group
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class RayCluster:
    def __init__(self, workdir: Path, *, gpu_resource: str = "dipnode_gpu") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.gpu_resource = gpu_resource
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        # Ray's socket paths must stay short (AF_UNIX: 107 bytes): not under pytest's tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.nodes: list[RayNode] = []

    def _common(self, cpus: int, gpus: float) -> list[str]:
        resources = json.dumps({self.gpu_resource: gpus}) if gpus else "{}"
        return ["--node-ip-address", LOOPBACK, f"--num-cpus={cpus}", "--num-gpus=0",
                f"--resources={resources}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def _start(self, args: list[str], name: str, tries: int = 3) -> RayNode:
        """One node, started again (up to ``tries`` times) when `ray start` gives up."""
        for attempt in range(tries):
            node = RayNode(args, self.workdir / f"{name}.log")
            if node.started():
                self.nodes.append(node)
                return node
            node.stop()
        raise RuntimeError(f"Ray {name} did not start in {tries} tries; see {self.workdir / f'{name}.log'}")

    def start_head(self, *, cpus: int = 1, gpus: float = 0) -> RayNode:
        return self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                            f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
                            *self._common(cpus, gpus)], "ray-head")

    def add_worker(self, *, cpus: int = 1, gpus: float = 1) -> RayNode:
        """A worker node, started once the previous one runs (one at a time: a busy machine)."""
        return self._start([f"--address={self.address}", *self._common(cpus, gpus)],
                           f"ray-worker-{len(self.nodes)}")

    def wait_for(self, *, nodes: int, gpus: float, timeout_s: float = 120.0) -> None:
        """Return once ``nodes`` nodes are alive with ``gpus`` of the stand-in resource in all."""
        end = time.monotonic() + timeout_s
        while True:  # the GCS port first: ray.init on a closed port would retry for minutes
            try:
                import socket

                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > end or (self.nodes and self.nodes[0].proc.poll() is not None):
                    raise RuntimeError(f"Ray head did not listen on {self.address}; see "
                                       f"{self.nodes[0].log_path if self.nodes else '(no head)'}") from None
                time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", _WAIT, self.address, str(nodes), self.gpu_resource,
                              str(float(gpus)), str(max(1.0, end - time.monotonic()))],
                             capture_output=True, text=True, env=_env(), timeout=timeout_s + 60)
        if out.returncode != 0:
            raise RuntimeError(f"Ray cluster not ready: {out.stderr[-2000:]}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
