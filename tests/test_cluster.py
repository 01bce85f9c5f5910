"""What only a cluster meets, rehearsed on the tiny world with real processes: several nodes
(torchrun's c10d rendezvous on one host, so a rank's LOCAL_WORLD_SIZE is below WORLD_SIZE: the
HSDP mesh), the process-group timeout, and the paper's recipe in its proportions under torchrun
with 2 ranks, preempted by a real SIGTERM and resumed, equal bit for bit to the uninterrupted run.

Every launch has a timeout, so a hang fails in bounded time. The slowest variants run only with
CARPE_SLOW_TESTS=1:  CARPE_SLOW_TESTS=1 python -m pytest -q tests/test_cluster.py"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import train
from test_train import REPO, flags, lrs, read_log, small_data, weights_of  # noqa: F401 (small_data is a fixture)

SLOW = pytest.mark.skipif(not os.environ.get("CARPE_SLOW_TESTS"), reason="slow; set CARPE_SLOW_TESTS=1")
LAUNCH_TIMEOUT = 400  # seconds: a hang fails here, not in CI's global limit


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_nodes(out, nodes, per_node, train_flags, env=None, timeout=LAUNCH_TIMEOUT, script="train.py"):
    """`nodes` torchrun launchers on this host, `per_node` ranks each, meeting through a c10d
    rendezvous as the nodes of a cluster do. -> (return codes, outputs)."""
    endpoint = f"localhost:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank",
                               str(i), "--nproc_per_node", str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               endpoint, "--rdzv-id", os.path.basename(out), os.path.join(REPO, script),
                               *train_flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(nodes)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


def assert_close_runs(a, b, loss_rel, weight_tol):
    """Same steps and learning rates; losses and final weights within the given tolerances."""
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [(r["lr_adapter"], r["lr_rest"]) for r in la] == [(r["lr_adapter"], r["lr_rest"]) for r in lb]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=loss_rel, abs=1e-7)
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=weight_tol, atol=weight_tol * 1e-2) for k in wa), \
        max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def single(small_data, tmp_path_factory):
    """The 6-step run of tests/test_train.py in one process (the reference of the launches below)."""
    out = tmp_path_factory.mktemp("single")
    train.main(flags(small_data, out, "--max-steps", "6"))
    return out


def test_two_nodes_train_as_one_process(single, small_data, tmp_path):
    """Two one-rank "nodes" meeting through a c10d rendezvous: the HSDP mesh (replicate 2 x shard 1)
    trains as one process does, within the tolerance of tests/test_train.py's 2-rank runs (the
    gradient is summed over ranks in another order)."""
    out = tmp_path / "two_nodes"
    codes, outputs = launch_nodes(str(out), 2, 1, flags(small_data, out, "--max-steps", "6", "--fsdp"))
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "FSDP2 mesh: HSDP, replicated over 2 nodes x sharded over 1 ranks each" in outputs[0] + outputs[1]
    summary = json.load(open(out / "summary.json"))
    assert summary["world"] == 2 and summary["rank_checksums"][0] == summary["rank_checksums"][1]
    assert_close_runs(out, single, loss_rel=1e-4, weight_tol=1e-3)


@SLOW
def test_two_nodes_of_two_ranks_equal_one_node_of_four(small_data, tmp_path):
    """2 "nodes" x 2 ranks (HSDP: shard within a node, replicate across) against 1 node x 4 ranks
    (flat FSDP2), both at world 4 (so micro-batches of 2: 8 samples over 4 ranks). Not bit for bit:
    HSDP sums each gradient as (a + b) + (c + d), a reduce-scatter over one mesh of 4 in gloo's
    ring order, so float32 rounding differs in the last bits (measured: losses 1.5e-8 relative,
    weights 2.8e-7 absolute after 6 steps); the tolerance allows 30x that."""
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    codes, outputs = launch_nodes(str(two), 2, 2, flags(small_data, two, "--max-steps", "6", "--fsdp"))
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "FSDP2 mesh: HSDP, replicated over 2 nodes x sharded over 2 ranks each" in outputs[0] + outputs[1]
    codes, outputs = launch_nodes(str(one), 1, 4, flags(small_data, one, "--max-steps", "6", "--fsdp"))
    assert codes == [0] and "HSDP" not in outputs[0], outputs[0][-3000:]
    assert "--micro-batch-size 2: 8 samples per step over 4 ranks" in outputs[0]
    assert_close_runs(two, one, loss_rel=1e-6, weight_tol=1e-5)


def test_dist_timeout_reaches_the_process_group(small_data, tmp_path):
    """--dist-timeout is the process group's timeout: with rank 1 stuck before its first collective,
    rank 0 gives up at the first barrier after 0.05 minutes (3 s) and names the timeout, instead of
    waiting gloo's default 30 minutes (NCCL: 10) as before."""
    import time
    start = time.time()
    codes, outputs = launch_nodes(str(tmp_path), 1, 2, flags(small_data, tmp_path, "--max-steps", "6",
                                                             "--dist-timeout", "0.05"),
                                  env=dict(CARPE_STALL_RANK="1", CARPE_STALL_S="600"), timeout=300,
                                  script="tests/killed_train.py")
    assert codes == [1] and time.time() - start < 200, outputs[0][-3000:]
    assert re.search(r"[Tt]imed out|[Tt]imeout", outputs[0]) and "3000ms" in outputs[0], outputs[0][-3000:]
