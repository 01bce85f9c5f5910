"""common.py under the field's conditions: a really full file system (a 1 MiB tmpfs, mounted for
the test; skipped where mounting is not allowed), files of other ranks found by name, run
folders in the new and the old layout."""
import json
import os
import subprocess
import threading
import time

import pytest
import torch

import common


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system at tmp_path/disk (tmpfs; root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (the full-disk tests write to a really full file system)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def checkpoint_args(n_floats, step):
    weights = {"w": torch.arange(n_floats, dtype=torch.float32)}
    return dict(weights=weights, optimizer_state=dict(optimizer={}, scheduler={}), trainer_state=dict(step=step),
                config=dict(method="carpe"), rank=0, device=torch.device("cpu"))


def test_full_disk_during_a_checkpoint_save_names_the_path_and_keeps_the_last_checkpoint(small_disk):
    out = str(small_disk)
    first = common.save_checkpoint(common.checkpoint_path(out, 1), **checkpoint_args(1000, 1))  # 4 KB: fits
    with pytest.raises(common.DiskFullError) as e:
        common.save_checkpoint(common.checkpoint_path(out, 2), **checkpoint_args(400_000, 2))  # 1.6 MB: does not
    message = str(e.value)
    assert "no space left on the device holding" in message and "step_0000002" in message
    assert "needs about 1.5 MiB" in message and "removed" in message
    assert sorted(os.listdir(small_disk / "ckpt")) == ["step_0000001"]  # no step_0000002.tmp holding the space
    common.verify_manifest(first, required=True)  # the earlier checkpoint is whole
    assert common.load_checkpoint(first, 0).trainer_state == dict(step=1)
    # with space freed, the same save goes through (what --resume then does)
    common.retire(first)
    common.save_checkpoint(common.checkpoint_path(out, 2), **checkpoint_args(100_000, 2))
    assert common.load_checkpoint(common.checkpoint_path(out, 2), 0).trainer_state == dict(step=2)


def test_full_disk_during_an_atomic_write_leaves_no_temp_file(small_disk):
    big = "x" * 2_000_000
    with pytest.raises(common.DiskFullError, match=r"summary\.md: writing it needs about 1\.9 MiB"):
        common.write_text_atomic(str(small_disk / "summary.md"), big)
    with pytest.raises(common.DiskFullError, match=r"model\.safetensors"):
        common.save_safetensors_atomic({"w": torch.zeros(500_000)}, str(small_disk / "model.safetensors"))
    assert os.listdir(small_disk) == []
    common.write_json_atomic(str(small_disk / "metrics.json"), {"ok": 1})  # a write that fits still works
    assert json.load(open(small_disk / "metrics.json")) == {"ok": 1}


def test_other_ranks_files_are_waited_for_by_name(tmp_path):
    late = tmp_path / "rng_rank1.pt"
    threading.Timer(0.3, late.write_bytes, args=(b"x",)).start()  # another rank, a little later
    t0 = time.monotonic()
    common.wait_for_files([str(late)], timeout_s=10)
    assert time.monotonic() - t0 >= 0.25
    with pytest.raises(TimeoutError, match=r"rng_rank2\.pt did not appear within 0\.2 s"):
        common.wait_for_files([str(tmp_path / "rng_rank2.pt")], timeout_s=0.2)


def test_run_config_is_not_named_like_a_transformers_config_and_old_folders_still_read(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    config = dict(method="carpe", base="preset:tiny", carpe={}, train={})
    common.save_run(str(new), {"w": torch.zeros(2)}, config)
    assert sorted(os.listdir(new)) == ["manifest.json", "model.safetensors", "run_config.json"]
    assert common.read_run_config(str(new)) == config and common.is_run_dir(str(new))
    (old / "config.json").write_text(json.dumps(config))  # a run folder written before the rename
    (old / "model.safetensors").write_bytes((new / "model.safetensors").read_bytes())
    assert common.read_run_config(str(old)) == config and common.is_run_dir(str(old))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(model_type="llava")))  # a transformers folder is no run
    assert not common.is_run_dir(str(hf))
    with pytest.raises(FileNotFoundError, match="is not a train.py run directory"):
        common.read_run_config(str(hf))
