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
import sys
from dataclasses import asdict, dataclass, field

import pytest
import torch

import train
from test_train import (REPO, end_group, flags, lrs, read_log, small_data,  # noqa: F401 (small_data: a fixture)
                        start_group, weights_of)

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
    procs = [start_group([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank", str(i),
                          "--nproc_per_node", str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                          "--rdzv-id", os.path.basename(out), os.path.join(REPO, script), *train_flags], env)
             for i in range(nodes)]
    outputs = [end_group(p, timeout) for p in procs]
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


# -----------------------------------------------------------------------------
# the cluster rehearsal: the paper's recipe in its proportions, preempted and resumed

@dataclass
class Rehearsal:
    """A rehearsal's data and proportions: `llava` entries of the tiny world (`text_only` of them
    without an image) + the ImageNet prompts of the 1:7 mix, in global batches of 2 (a micro-batch
    of 1 on each of 2 ranks), 2 epochs, the warmup a fraction of the steps."""
    llava: int
    text_only: int
    steps_per_epoch: int
    warmup_ratio: float
    signal_at: int  # SIGTERM once the log holds this step (in epoch 2)
    data: str = ""
    one_rank_text_only: list = field(default_factory=list)  # steps where one rank's micro-batch has no image

    def flags(self, out, *extra):
        return ["--preset", "tiny", "--data", self.data, "--mix", "1:7", "--batch-size", "2", "--micro-batch-size",
                "1", "--epochs", "2", "--warmup-ratio", str(self.warmup_ratio), "--lr", "2e-3", "--lr-adapter", "2e-4",
                "--num-workers", "0", "--save-every", "5", "--out", str(out), *extra]


# CI's: 20 steps, a 3-step warmup; the paper's proportions (CARPE_SLOW_TESTS): 3% of 100 steps
SMALL = Rehearsal(llava=18, text_only=4, steps_per_epoch=10, warmup_ratio=0.14, signal_at=13)
PAPER = Rehearsal(llava=88, text_only=10, steps_per_epoch=50, warmup_ratio=0.03, signal_at=60)


def prepare(rehearsal, folder):
    """Write the rehearsal's json and find the steps at which exactly one rank's micro-batch is text-only."""
    import carpe
    args = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused"]))
    train.use_tiny_world(args)
    entries = json.load(open(args.data))
    text = [e for e in entries if "image" not in e][:rehearsal.text_only]
    chosen = text + [e for e in entries if "image" in e][:rehearsal.llava - len(text)]
    path = folder / f"llava-{rehearsal.llava}.json"
    path.write_text(json.dumps(chosen))
    args = train.resolve_args(train.parse_args(Rehearsal(**dict(asdict(rehearsal), data=str(path))).flags("unused")))
    train.use_tiny_world(args)
    args.model_max_length = 1024
    dataset, _ = train.build_dataset(args, carpe.load_base(args.base)[1], 0, 0)
    n = rehearsal.steps_per_epoch
    assert len(dataset) // 2 == n  # the ImageNet prompts of the 1:7 mix added; an odd tail is dropped
    text_only = lambda epoch, p: dataset.describe(epoch, p).image is None
    return Rehearsal(**dict(asdict(rehearsal), data=str(path), one_rank_text_only=[
        epoch * n + s + 1 for epoch in (0, 1) for s in range(n) if text_only(epoch, 2 * s) != text_only(epoch, 2 * s + 1)]))


def torchrun_launch(train_flags):
    return start_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train.py"), *train_flags])


def finish(proc):
    return end_group(proc, LAUNCH_TIMEOUT)


def rehearse(rehearsal, tmp_path, before=(), after=()):
    """The uninterrupted run, and the same run sent SIGTERM (as SLURM sends it: to torchrun, which
    forwards it to both ranks) in epoch 2 and continued with --resume: equal bit for bit in every
    step's learning rates and loss, and in the final weights. `before`: flags of both runs' first
    launch; `after`: of the resume."""
    import signal
    from test_train import wait_for_log
    r = prepare(rehearsal, tmp_path)
    total, epoch = 2 * r.steps_per_epoch, r.steps_per_epoch
    assert any(s <= epoch for s in r.one_rank_text_only) and any(s > r.signal_at for s in r.one_rank_text_only)
    full, cut = tmp_path / "full", tmp_path / "preempted"
    output = finish(torchrun_launch(r.flags(full, *before)))
    log = read_log(full) if os.path.isfile(full / "log.jsonl") else []
    assert len(log) == total, output[-5000:]
    assert [x["context_trainable"] for x in log] == [False] * epoch + [True] * epoch
    warmup = [x["lr_rest"] for x in log[:4]]
    assert warmup == pytest.approx([2e-3 / 3, 2e-3 * 2 / 3, 2e-3, 2e-3], rel=1e-12)  # 3 warmup steps

    proc = torchrun_launch(r.flags(cut, *before))
    wait_for_log(str(cut), r.signal_at, proc, timeout=LAUNCH_TIMEOUT)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc)
    # torchrun forwards the signal, waits for its ranks (they exit 75 after the checkpoint) and exits 1
    assert proc.returncode == 1 and "SignalException" in output, output[-5000:]
    stopped = len(read_log(cut))
    assert r.signal_at <= stopped < total, output[-5000:]
    assert f"stopping after step {stopped} of {total}: 2 of 2 rank(s) received SIGTERM" in output, output[-5000:]
    assert os.path.isdir(cut / "ckpt" / f"step_{stopped:07d}")
    output = finish(torchrun_launch(r.flags(cut, *after, "--resume")))
    resumed = read_log(cut)
    assert [x["step"] for x in resumed] == list(range(1, total + 1)), output[-5000:]
    assert lrs(resumed) == lrs(log)
    assert [x["loss"] for x in resumed] == [x["loss"] for x in log]
    a, b = weights_of(full), weights_of(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


COMPILED = ["--compile", "--compile-backend", "aot_eager"]  # traced and compiled for real, run by eager kernels


def test_rehearsal_fsdp(tmp_path):
    """CI's rehearsal: FSDP2, gradient checkpointing off until the SIGTERM (a text-only micro-batch
    on one rank must not hang the ranks) and on after the resume (it does not change the numbers);
    eager (each compiled launch costs ~40 s here: the compiled variants are the slow ones below)."""
    rehearse(SMALL, tmp_path, ["--fsdp", "--no-gradient-checkpointing"], ["--fsdp", "--gradient-checkpointing"])


@SLOW
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.parametrize("checkpointing", ["off-then-on", "on-then-off"])
def test_rehearsal_in_the_papers_proportions(mode, checkpointing, tmp_path):
    """100 steps (3% warmup = 3 steps), compiled, under FSDP2 and DDP, checkpointing switched at the resume."""
    flag = ["--fsdp"] if mode == "fsdp" else []
    ckpt = ["--no-gradient-checkpointing", "--gradient-checkpointing"]
    before, after = ckpt if checkpointing == "off-then-on" else ckpt[::-1]
    rehearse(PAPER, tmp_path, [*flag, *COMPILED, before], [*flag, *COMPILED, after])


@SLOW
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_rehearsal_moe(mode, tmp_path):
    """CARPE-MoE compiled (CuMo's sparse MoE layers included), checkpointing off then on."""
    flag = ["--fsdp"] if mode == "fsdp" else []
    rehearse(SMALL, tmp_path, [*flag, *COMPILED, "--moe", "--no-gradient-checkpointing"],
             [*flag, *COMPILED, "--moe", "--gradient-checkpointing"])
