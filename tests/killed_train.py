"""train.py that dies by SIGKILL halfway through writing one checkpoint: rank 0 writes half of
the weights file of the checkpoint whose folder name contains $CARPE_KILL_AT, then kills its own
process (no finally block, no atexit, no flush: what `kill -9` or the OOM killer leaves behind).
Used by tests/test_train.py under torchrun; run as `torchrun tests/killed_train.py <train.py flags>`."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train  # noqa: E402

KILL_AT = os.environ["CARPE_KILL_AT"]
save_file = common.save_file


def dies_midway(state, path, *args, **kwargs):
    if KILL_AT in path:
        save_file({k: v[: max(len(v) // 2, 1)] for k, v in state.items()}, path)  # a torn weights file
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(state, path, *args, **kwargs)


if __name__ == "__main__":
    common.save_file = dies_midway  # common.save_checkpoint looks the name up at call time
    train.main(sys.argv[1:])
