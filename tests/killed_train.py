"""train.py with a fault injected from inside, for the torchrun tests (tests/test_train.py,
tests/test_cluster.py); run as `torchrun tests/killed_train.py <train.py flags>`.

CARPE_KILL_AT=<name>: rank 0 writes half of the weights file of the checkpoint whose folder name
contains <name>, then kills its own process by SIGKILL (no finally block, no atexit, no flush: what
`kill -9` or the OOM killer leaves behind).

CARPE_SIGNAL=SIGTERM|SIGINT with CARPE_SIGNAL_AT_STEP=N and CARPE_SIGNAL_RANK=r: rank r sends itself
that real signal (through the kernel, as `kill` would) right after writing step N's numbers, so it
lands during step N + 1 on that rank alone: what a scheduler that signals one node first does.

CARPE_STALL_RANK=r: rank r sleeps CARPE_STALL_S seconds (default 600) before its first collective,
as a rank stuck on a slow file system or a dead node would; the others wait for it at a barrier."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train  # noqa: E402

KILL_AT = os.environ.get("CARPE_KILL_AT")
SIGNAL = os.environ.get("CARPE_SIGNAL")
save_file = common.save_file
log_step = train.log_step
setup = train.setup


def dies_midway(state, path, *args, **kwargs):
    if KILL_AT in path:
        save_file({k: v[: max(len(v) // 2, 1)] for k, v in state.items()}, path)  # a torn weights file
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(state, path, *args, **kwargs)


def signals_itself(run, *args, **kwargs):
    record = log_step(run, *args, **kwargs)
    if run.state.step == int(os.environ["CARPE_SIGNAL_AT_STEP"]) and run.rank == int(os.environ["CARPE_SIGNAL_RANK"]):
        os.kill(os.getpid(), getattr(signal, SIGNAL))
    return record


def stalls(args, rank, *rest):
    if rank == int(os.environ["CARPE_STALL_RANK"]):
        time.sleep(float(os.environ.get("CARPE_STALL_S", "600")))
    return setup(args, rank, *rest)


if __name__ == "__main__":
    if KILL_AT:
        common.save_file = dies_midway  # common.save_checkpoint looks the name up at call time
    if SIGNAL:
        train.log_step = signals_itself  # train.train looks the name up at call time
    if os.environ.get("CARPE_STALL_RANK"):
        train.setup = stalls  # train.main looks the name up at call time
    train.main(sys.argv[1:])
