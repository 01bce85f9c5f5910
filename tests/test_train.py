"""train.py on the tiny preset: exact resume, the epoch-1 freeze of the context prompt and
encoder, 2-process torchrun under DDP and FSDP2 (same losses as one process, identical
weights on both ranks), and the refusals (another config, a non-finite loss).

A small LLaVA json (28 synthetic entries -> 32 samples per epoch with the paper's 1:7 ImageNet
share, set by hand as the tiny preset's default is 1:1) and a global batch of 8 give 4 steps per
epoch, so 6 steps cross into epoch 2."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import carpe
import train
import common  # noqa: E402
import pretrained  # noqa: E402
import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The tiny preset's synthetic data (and pre-trained base, built on first use in the repo's
    cache) plus a 28-entry LLaVA json with text-only and multi-turn entries."""
    args = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused"]))
    tiny.ensure_tiny_world(args.cache_dir)
    train.use_tiny_world(args)
    entries = json.load(open(args.data))
    small = entries[:28]
    assert any("image" not in e for e in small) and any(len(e["conversations"]) > 2 for e in small)
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(small))
    return str(path)


def flags(small_data, out, *extra):
    # the earlier tiny learning rates: the cross-attention key bias has no true gradient (softmax
    # ignores a shift shared by all keys), so AdamW turns its rounding noise into full-size
    # steps; 6e-3 makes that noise exceed the DDP/FSDP-vs-one-process tolerance below.
    # A warmup of 3 of the 6 steps (the field's warmups are long): a resume inside or after it
    # must restart the schedule from the flags' rates, not from the warmup-scaled ones
    return ["--preset", "tiny", "--data", small_data, "--mix", "1:7", "--lr", "2e-3", "--lr-adapter", "2e-4",
            "--batch-size", "8", "--micro-batch-size", "4", "--warmup-ratio", "0.5",
            "--num-workers", "0", "--out", str(out), *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_a(small_data, tmp_path_factory):
    """6 uninterrupted steps (epoch 1 = steps 1-4), a checkpoint every 2 steps, all kept."""
    out = tmp_path_factory.mktemp("run_a")
    train.main(flags(small_data, out, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "0"))
    return str(out)


def context_names(state):
    return [n for n in state if carpe.is_context_name(n)]


def lrs(log):
    return [{k: v for k, v in r.items() if k.startswith("lr_")} for r in log]


def test_resume_is_exact(run_a, small_data, tmp_path):
    # resume from step 2, inside the 3-step warmup, in a fresh process state: steps 3-6, across the
    # epoch boundary, at the learning rates of the uninterrupted run (not at lr x the first warmup factor)
    full = read_log(run_a)
    assert [r["lr_rest"] for r in full[:3]] == pytest.approx([2e-3 / 3, 2e-3 * 2 / 3, 2e-3], rel=1e-12)
    train.main(flags(small_data, tmp_path, "--max-steps", "6", "--resume", os.path.join(run_a, "ckpt", "step_0000002")))
    resumed = read_log(tmp_path)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert lrs(resumed) == lrs(full[2:])
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    a, b = load_file(os.path.join(run_a, "model.safetensors")), load_file(os.path.join(tmp_path, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the loss moved and the run folder loads for evaluation
    model, processor, transform = pretrained.load_run(str(tmp_path))  # the recorded "preset:tiny" resolved
    assert all(torch.equal(t, b[k]) for k, t in model.trainable_state_dict().items())


def test_context_frozen_in_epoch_one_only(run_a, small_data):
    args = train.resolve_args(train.parse_args(flags(small_data, "unused")))
    tiny.ensure_tiny_world(args.cache_dir)
    train.use_tiny_world(args)
    llava, processor = carpe.load_base(args.base)
    init = train.create_model(args, llava, processor, torch.device("cpu"))[0].trainable_state_dict()
    end_epoch1 = load_file(os.path.join(run_a, "ckpt", f"step_{STEPS_PER_EPOCH:07d}", "model.safetensors"))
    later = load_file(os.path.join(run_a, "ckpt", "step_0000006", "model.safetensors"))
    names = context_names(init)
    assert sorted(names) == ["context_encoder.bias", "context_encoder.weight", "context_prompt"]
    for n in names:
        assert torch.equal(init[n], end_epoch1[n]), f"{n} changed during epoch 1"
        assert not torch.equal(end_epoch1[n], later[n]), f"{n} did not change in epoch 2"
    others = [n for n in init if n not in names]
    assert all(not torch.equal(init[n], end_epoch1[n]) for n in others if "integrator" in n or "lm_head" in n)
    # the zero-initialised encoder gives alpha = 0.5 exactly while frozen; it moves after
    log = read_log(run_a)
    assert [r["context_trainable"] for r in log] == [False] * 4 + [True] * 2
    assert all(r["vision_weight"] == 0.5 for r in log[:5]) and log[5]["vision_weight"] != 0.5


def start_group(cmd, env=None):
    """A launcher (torchrun) in a process group of its own, merged output: end_group ends it all."""
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def end_group(proc, timeout=400):
    """Wait for a start_group launcher (a hang fails after `timeout` s), then kill whatever is left of
    its group: a hung rank must not outlive the test. -> its output."""
    import signal
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def torchrun(small_data, out, *extra, script="train.py", env=None, ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, script), *flags(small_data, out, "--max-steps", "6", *extra)]
    proc = start_group(cmd, env)
    output = end_group(proc)
    result = subprocess.CompletedProcess(cmd, proc.returncode, output, "")
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-5000:]
    return read_log(out) if ok else result


@pytest.fixture(scope="module")
def fsdp_run(small_data, tmp_path_factory):
    """6 uninterrupted FSDP2 steps on 2 ranks, every checkpoint kept (the resumes start from them)."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(small_data, out, "--fsdp", "--save-every", "1", "--keep-checkpoints", "0")
    return str(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks(mode, run_a, small_data, tmp_path, request):
    if mode == "fsdp":
        out = request.getfixturevalue("fsdp_run")
    else:
        out = str(tmp_path)
        torchrun(small_data, out)
    log = read_log(out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world"] == 2 and summary["steps"] == 6
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]  # identical weights on both ranks
    # each rank reads half of every global batch: the same samples and losses as one process
    single = read_log(run_a)
    for r, s in zip(log, single):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-5), (mode, r["step"])
    # the context prompt trained in epoch 2 under both wrappers, the same way as in one process
    a, b = weights_of(run_a), weights_of(out)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-5), (mode, n)
    assert os.path.isdir(os.path.join(out, "ckpt", "step_0000006"))


@pytest.mark.parametrize("step", [4, 5])  # written in epoch 1 (resumed at the boundary), in epoch 2
def test_fsdp_resume_equals_the_uninterrupted_run(step, fsdp_run, small_data, tmp_path):
    """FSDP2 on 2 ranks resumed from a checkpoint of the uninterrupted run (as after a kill
    there): the epoch-1 checkpoints' optimizer holds no state for the frozen context tensors,
    and the resume still loads it strictly and continues exactly."""
    log = torchrun(small_data, tmp_path, "--fsdp", "--resume", os.path.join(fsdp_run, "ckpt", f"step_{step:07d}"))
    full = read_log(fsdp_run)
    assert [r["step"] for r in log] == list(range(step + 1, 7))
    assert [r["loss"] for r in log] == [r["loss"] for r in full[step:]]
    assert [r["context_trainable"] for r in log] == [s > 4 for s in range(step + 1, 7)]
    a, b = weights_of(fsdp_run), weights_of(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_run_killed_by_sigkill_during_a_save_resumes_exactly(fsdp_run, small_data, tmp_path):
    """A real `kill -9` under torchrun: rank 0 dies halfway through writing step 4's weights (the
    epoch boundary), torchrun takes rank 1 down. The dead run leaves a torn step_0000004.tmp, a
    log running to step 4 and its lock file; `--resume` (newest intact checkpoint: step 3) takes
    the folder, and ends with the uninterrupted run's losses and weights, bit for bit."""
    killed = torchrun(small_data, tmp_path, "--fsdp", "--save-every", "1", "--keep-checkpoints", "0",
                      script="tests/killed_train.py", env=dict(CARPE_KILL_AT="step_0000004"), ok=False)
    assert "SIGKILL" in killed.stdout + killed.stderr  # torchrun names the signal that ended rank 0
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["step_0000001", "step_0000002", "step_0000003"]
    assert os.path.isdir(tmp_path / "ckpt" / "step_0000004.tmp")  # the torn save, never renamed into place
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    log = torchrun(small_data, tmp_path, "--fsdp", "--save-every", "1", "--keep-checkpoints", "0", "--resume")
    full = read_log(fsdp_run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # step 4 once: the dead run's line was cut
    assert [r["loss"] for r in log] == [r["loss"] for r in full]
    a, b = weights_of(fsdp_run), weights_of(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "ckpt"))  # the torn folder was cleared


def test_resume_refuses_another_config(run_a, small_data, tmp_path, capsys):
    # a changed model setting or a FIXED_ON_RESUME flag: one line naming it and both values
    ckpt = os.path.join(run_a, "ckpt", "step_0000002")
    with pytest.raises(SystemExit, match=r"step_0000002: that checkpoint was made for another run.*"
                                         r"carpe\.integrator_self_attn: checkpoint True, now False"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--no-integrator-self-attn", "--resume", ckpt))
    with pytest.raises(SystemExit, match=r"--batch-size: checkpoint 8, now 16") as e:
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--resume", ckpt, "--batch-size", "16"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "log.jsonl")  # refused before anything was written


def test_every_flag_is_applied_or_refused_on_resume():
    """A new flag must say what a resume does with it: no setting is recorded and then ignored."""
    dests = set(vars(train.parse_args(["--out", "x"])))
    groups = [train.FIXED_ON_RESUME, train.APPLIED_ON_RESUME, train.MODEL_FLAGS, train.RUN_FLAGS]
    assert sorted(k for g in groups for k in g) == sorted(dests)


def test_tiny_prestage_learned(small_data):
    base = tiny.prestage_dir(train.parse_args(["--out", "x"]).cache_dir)
    with open(os.path.join(base, "prestage.json")) as f:
        stats = json.load(f)
    assert stats["final_loss"] < 0.5 * stats["first_loss"]
    # the pre-trained tower tells the six shapes apart on held-out scenes (chance 1/6) ...
    assert stats["vision_shape_accuracy"] > 0.6
    # ... and stayed frozen in the LLaVA stage, so the saved tower is the pre-trained one: its
    # features differ between a circle and a square far more than a random tower's do
    llava, processor = carpe.load_base(base)
    random_llava, _ = tiny.tiny_llava(seed=0, **tiny.TINY_OVERRIDES)
    images, labels = tiny.draw_vision_pretraining_set(120, seed=7)
    pixels = carpe.make_image_transform(processor)(images)

    def shape_separation(model):
        with torch.no_grad():
            f = carpe.raw_vision_features(model, pixels).mean(1)  # (n, Dv)
        means = torch.stack([f[labels[:, 0] == s].mean(0) for s in range(len(tiny.SHAPES))])  # (6, Dv)
        within = torch.stack([f[labels[:, 0] == s].std(0).mean() for s in range(len(tiny.SHAPES))]).mean()
        return (means - means.mean(0)).norm(dim=-1).mean() / within

    assert shape_separation(llava) > 2 * shape_separation(random_llava)


def test_fsdp_optimizer_groups_keep_plain_context_tensors_apart():
    """Under FSDP2 the context prompt/encoder stay plain tensors among DTensors; AdamW's CUDA
    multi-tensor path refuses a group that mixes them, so they get a group of their own."""
    model = carpe.CARPE(tiny.tiny_llava()[0], carpe.CarpeConfig(integrator_heads=4))
    context = {id(p) for n, p in model.named_parameters() if carpe.is_context_name(n)}
    for fsdp in (False, True):
        args = train.parse_args(["--preset", "tiny", "--out", "unused", "--lr", "1e-3", "--lr-adapter", "1e-4"]
                                + (["--fsdp"] if fsdp else []))
        groups = train.optimizer_groups(args, model)
        mixed = [g["name"] for g in groups if 0 < sum(id(p) in context for p in g["params"]) < len(g["params"])]
        assert bool(mixed) != fsdp, (fsdp, mixed)  # the model's own groups mix them; FSDP's must not
        assert sum(len(g["params"]) for g in groups) == len(model.trainable_state_dict())
        for g in groups:
            assert g["lr"] == (1e-4 if g["name"] == "adapter" else 1e-3)


def test_load_run_refuses_damaged_or_non_finite_weights(tmp_path):
    """common.load_run checks the digests a run folder records and refuses NaN weights, naming
    the file (and the tensor) before it spends time building the base."""
    from safetensors.torch import save_file
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(method="carpe", base="unused")))
    save_file({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, str(run / "model.safetensors"))
    with pytest.raises(common.DamagedFileError, match=r"model\.safetensors: tensor b holds 1 non-finite"):
        common.load_run(str(run))
    save_file({"a": torch.ones(3)}, str(run / "model.safetensors"))
    common.write_manifest(str(run), ["model.safetensors", "config.json"])
    assert common.run_digest(str(run)) == common.sha256_file(str(run / "model.safetensors"))
    digest = common.run_digest(str(run))
    raw = bytearray((run / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the tensor data
    (run / "model.safetensors").write_bytes(bytes(raw))
    assert common.run_digest(str(run)) != digest
    with pytest.raises(common.DamagedFileError, match=r"model\.safetensors is damaged: its sha256 differs"):
        common.load_run(str(run))


# -----------------------------------------------------------------------------
# faults injected on purpose: nothing lost, the message names the cause

def weights_of(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_nan_gradient_is_skipped_and_repeated_ones_stop_the_run(small_data, tmp_path, monkeypatch):
    """A NaN gradient with a finite loss never reaches the weights: the step is skipped and
    counted; two in a row stop the run, naming the newest checkpoint whose weights were checked."""
    poisoned = {3, 5, 6}
    average = train.average_context_grads

    def poison(run):  # after the backward of step state.step + 1
        average(run)
        if run.state.step + 1 in poisoned:
            next(p for p in run.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    monkeypatch.setattr(train, "average_context_grads", poison)
    with pytest.raises(SystemExit, match=r"stopping at step 6: 2 step\(s\) in a row skipped .*non-finite gradient norm"
                                         r".*last good checkpoint is \S*step_0000003"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--save-every", "1", "--keep-checkpoints", "0",
                         "--max-skipped-steps", "2"))
    log = read_log(tmp_path)
    assert [r["skipped_step"] is not None for r in log] == [False, False, True, False, True, True]
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)  # the loss was finite: only the gradient was bad
    ckpt = tmp_path / "ckpt"
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == [
        "step_0000001", "step_0000002", "step_0000003"]
    # step 4's update made the weights that then failed twice: its checkpoints are kept, renamed
    assert sorted(n for n in os.listdir(ckpt) if n.endswith(".rejected")) == [
        "step_0000004.rejected", "step_0000005.rejected"]
    w2, w3 = weights_of(ckpt / "step_0000002"), weights_of(ckpt / "step_0000003")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step 3 left the weights alone
    assert all(torch.isfinite(t).all() for path in os.listdir(ckpt) for t in weights_of(ckpt / path).values())


def test_lr_applied_on_resume_and_a_blow_up_names_a_truly_good_checkpoint(run_a, small_data, tmp_path):
    """--lr given on resume is used (and recorded); at 1e36 the first update gives finite but
    huge weights whose loss is not finite: the run stops, rejects that update's checkpoints and
    names the checkpoint it resumed from, the newest whose weights trained on finitely."""
    resumed = os.path.join(run_a, "ckpt", "step_0000002")
    with pytest.raises(SystemExit, match=r"last good checkpoint is \S*run_a\S*step_0000002") as e:
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--save-every", "1", "--max-skipped-steps", "2",
                         "--resume", resumed, "--lr", "1e36", "--lr-adapter", "1e36"))
    print(e.value)
    log, full = read_log(tmp_path), read_log(run_a)
    assert log[0]["lr_rest"] == pytest.approx(full[2]["lr_rest"] / 2e-3 * 1e36, rel=1e-12)  # the new lr, same schedule
    assert log[0]["skipped_step"] is None and all(r["skipped_step"] for r in log[1:])
    assert common.list_checkpoints(str(tmp_path)) == []  # all hold the blown-up weights
    config = json.load(open(tmp_path / "ckpt" / "step_0000003.rejected" / "config.json"))
    assert config["train"]["lr"] == 1e36 and config["resumed"][0]["changed"]["--lr"] == [2e-3, 1e36]


def test_killed_save_and_damaged_checkpoint_resume_exactly(run_a, small_data, tmp_path, monkeypatch, capsys):
    """A run dies while writing step 6's checkpoint and step 4's optimizer.pt is truncated later:
    --resume falls back to step 2 (saying which file is damaged), cuts log.jsonl back to step 2,
    and ends with the losses and weights of the uninterrupted run."""
    save_file = common.save_file

    def dies_at_step_6(state, path, *a, **k):
        if "step_0000006" in path:
            save_file({k: v[:1] for k, v in state.items()}, path)  # half a file, then the process is gone
            raise KeyboardInterrupt("killed during the save of step 6")
        return save_file(state, path, *a, **k)

    monkeypatch.setattr(common, "save_file", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "0"))
    monkeypatch.setattr(common, "save_file", save_file)
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == ["step_0000002", "step_0000004"]
    optimizer_pt = tmp_path / "ckpt" / "step_0000004" / "optimizer.pt"
    optimizer_pt.write_bytes(optimizer_pt.read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit, match=r"step_0000004/optimizer\.pt is damaged: its sha256 differs"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--resume", str(tmp_path / "ckpt" / "step_0000004")))
    capsys.readouterr()
    train.main(flags(small_data, tmp_path, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "0",
                     "--resume"))
    assert re.search(r"step_0000004 is damaged .*optimizer\.pt.*falling back", capsys.readouterr().out)
    full, log = read_log(run_a), read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # steps 3-5 of the dead run were cut
    assert [r["loss"] for r in log] == [r["loss"] for r in full]
    a, b = weights_of(run_a), weights_of(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path / "superseded")) == ["log.jsonl", "step_0000004"]  # set aside, not deleted
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "ckpt"))


def test_checkpoint_files_that_could_run_code_are_refused(run_a, tmp_path):
    import shutil
    ckpt = tmp_path / "step_0000002"
    shutil.copytree(os.path.join(run_a, "ckpt", "step_0000002"), ckpt)
    torch.save({"python": object()}, ckpt / "rng_rank0.pt")  # a pickled object, not data
    common.write_manifest(str(ckpt), [n for n in os.listdir(ckpt) if n != common.MANIFEST])  # even when recorded
    with pytest.raises(common.DamagedFileError, match=r"rng_rank0\.pt holds more than tensors and plain values"):
        common.load_checkpoint(str(ckpt), rank=0)


def test_retention_keeps_the_resumed_checkpoint_and_sets_newer_ones_aside(run_a, small_data, tmp_path):
    """Resume from step 2 of a folder holding steps 2, 4, 6 with --keep-checkpoints 1 and a new
    --lr: steps 4 and 6 (the abandoned continuation) move to superseded/, retention keeps step 2
    and the newest, log.jsonl holds each step once, the new lr is used and recorded."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(run_a, out)
    train.main(flags(small_data, out, "--max-steps", "6", "--save-every", "1", "--keep-checkpoints", "1",
                     "--lr", "1e-3", "--resume", str(out / "ckpt" / "step_0000002")))
    assert [os.path.basename(p) for p in common.list_checkpoints(str(out))] == ["step_0000002", "step_0000006"]
    assert sorted(os.listdir(out / "superseded")) == ["log.jsonl", "step_0000004", "step_0000006"]
    log, full = read_log(out), read_log(run_a)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_log(out / "superseded")] == [3, 4, 5, 6]
    assert log[2]["lr_rest"] == pytest.approx(full[2]["lr_rest"] / 2, rel=1e-12)
    config = common.read_run_config(str(out))
    assert config["train"]["lr"] == 1e-3 and config["resumed"][0]["changed"] == {
        "--lr": [2e-3, 1e-3], "--save-every": [2, 1], "--keep-checkpoints": [0, 1]}
    assert config["resumed"][0]["step"] == 2
    pretrained.load_run(str(out))  # the final folder verifies against its manifest


def test_run_folder_is_locked_and_not_silently_reused(small_data, tmp_path):
    out = str(tmp_path)
    lock = common.lock_run_folder(out)  # another run holds the folder
    with pytest.raises(SystemExit, match=rf"--out {out} is in use by another run \(pid {os.getpid()} holds"):
        train.main(flags(small_data, out, "--max-steps", "1"))
    lock.close()
    (tmp_path / "log.jsonl").write_text("{}\n")
    (tmp_path / "ckpt" / "step_0000009").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"already holds a run \(ckpt, log\.jsonl\): continue it with --resume "
                                         r"or start afresh with --overwrite"):
        train.main(flags(small_data, out, "--max-steps", "1"))
    train.main(flags(small_data, out, "--max-steps", "1", "--overwrite"))
    assert [r["step"] for r in read_log(out)] == [1] and common.list_checkpoints(out)[-1].endswith("step_0000001")


@pytest.mark.parametrize("flag, value, message", [
    ("--micro-batch-size", "0", "--micro-batch-size must be positive (got 0)"),
    ("--max-steps", "-3", "--max-steps must be positive (got -3)"),
    ("--epochs", "0", "--epochs must be positive (got 0)"),
    ("--batch-size", "-8", "--batch-size must be positive (got -8)"),
    ("--save-every", "-1", "--save-every must be >= 0 (got -1)"),
    ("--keep-checkpoints", "-2", "--keep-checkpoints must be >= 0 (got -2)"),
    ("--lr", "nan", "--lr must be positive (got nan)"),
    ("--closed-k", "0", "--closed-k must be positive (got 0)"),
    ("--max-skipped-steps", "0", "--max-skipped-steps must be positive (got 0)"),
    ("--max-loss-ratio", "0.5", "--max-loss-ratio must be 0 (off) or above 1 (got 0.5)"),
    ("--warmup-ratio", "1", "--warmup-ratio must be in [0, 1) (got 1.0)"),
    ("--mix", "1:x", "--mix '1:x': expected IMAGENET:LLAVA"),
])
def test_arguments_out_of_range_are_refused_naming_the_flag(flag, value, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused", flag, value]))


def test_model_max_length_fits_the_base(small_data, tmp_path, capsys):
    # the tiny base has 1024 positions: the default follows it, a larger value is refused
    with pytest.raises(SystemExit, match=r"--model-max-length 2048 exceeds the base's max_position_embeddings 1024"):
        train.main(flags(small_data, tmp_path, "--max-steps", "1", "--model-max-length", "2048"))
    train.main(flags(small_data, tmp_path, "--max-steps", "1", "--overwrite"))
    assert "--model-max-length 1024: the base has 1024 positions" in capsys.readouterr().out
    assert common.read_run_config(str(tmp_path))["train"]["model_max_length"] == 1024


def test_bad_samples_are_dropped_or_replaced_and_named(small_data, tmp_path):
    """--skip-bad-samples reaches data.py: an entry whose image is missing is dropped up front
    (its id in skipped_entries.json), one whose image is truncated is replaced in the loader (its
    id in the step's log line); without the flag the run stops naming the entry."""
    entries = json.load(open(small_data))
    with_image = [e for e in entries if "image" in e]
    image_root = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "x"]))
    train.use_tiny_world(image_root)
    broken = []
    for e in with_image[:4]:  # truncated copies: the header passes the up-front check, decoding fails
        src = os.path.join(image_root.image_root, e["image"])
        dst = tmp_path / f"cut-{os.path.basename(src)}"
        dst.write_bytes(open(src, "rb").read()[:200])
        e["image"] = str(dst)
        broken.append(e["id"])
    with_image[4]["image"] = "missing.png"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(SystemExit, match=rf"{with_image[4]['id']}.*missing\.png"):
        train.main(flags(str(path), tmp_path / "strict", "--epochs", "1"))
    out = tmp_path / "skip"
    train.main(flags(str(path), out, "--epochs", "1", "--skip-bad-samples"))
    dropped = json.load(open(out / "skipped_entries.json"))
    assert [item[0] for item in dropped] == [with_image[4]["id"]]
    log = read_log(out)
    replaced = [item for r in log for item in r.get("skipped_ids", [])]
    assert replaced and {i for i, _ in replaced} <= set(broken), replaced
    assert all("cut-" in reason for _, reason in replaced)
    assert log[-1]["skipped"] == 1 + len(replaced)  # the running count: dropped up front + replaced


def test_experts_and_template_reach_the_run(small_data, tmp_path):
    with pytest.raises(SystemExit, match=r"--experts only applies with --moe"):
        train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "x", "--experts", "clip"]))
    with pytest.raises(SystemExit, match=r"--experts: expert entry 'clip=base@x'"):
        train.moe_config_from_args(train.parse_args(["--out", "x", "--moe", "--experts", "clip=base@x"]))
    config = train.moe_config_from_args(train.parse_args(["--out", "x", "--moe", "--experts", "clip=base@-1"]))
    assert [(e.name, e.feature_layer) for e in config.experts] == [("clip", -1)]
    with pytest.raises(SystemExit, match=r"template 'chat' needs a tokenizer with a chat_template"):
        train.main(flags(small_data, tmp_path, "--max-steps", "1", "--template", "chat"))


def test_compile_trains_like_eager(run_a, small_data, tmp_path):
    """--compile really compiles carpe.repeated_blocks in place (aot_eager: dynamo's traced forward
    and backward graphs, eager kernels) and trains the losses and weights of the eager run: through
    the epoch-1 freeze into epoch 2 (steps 5-6 run the context pass backward), text-only samples
    included; one graph per kind of block, no graph break."""
    import kernels
    torch._dynamo.reset()
    kernels.reset_compile_counts()
    model = train.main(flags(small_data, tmp_path, "--max-steps", "6", "--compile", "--compile-backend", "aot_eager"))
    counts = kernels.compile_counts()
    assert counts.graph_breaks == 0 and 0 < counts.unique_graphs <= 8
    assert all("forward" in vars(b) for b in carpe.repeated_blocks(model))  # each block's forward compiled in place
    assert common.read_run_config(str(tmp_path))["train"]["compile"] is True
    eager, compiled = read_log(run_a), read_log(tmp_path)
    assert [r["step"] for r in compiled] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
    a, b = weights_of(run_a), weights_of(tmp_path)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_loss_spike_guard_skips_the_step(small_data, tmp_path, monkeypatch):
    """--max-loss-ratio: a finite loss 1000x the recent mean is skipped like a non-finite one."""
    reduce_stats = train.reduce_stats
    steps = iter(range(1, 100))

    def spike_at_step_6(stats):
        total = reduce_stats(stats)
        if next(steps) == 6:
            total.loss *= 1000
        return total

    monkeypatch.setattr(train, "reduce_stats", spike_at_step_6)
    train.main(flags(small_data, tmp_path, "--max-steps", "7", "--max-loss-ratio", "10"))
    log = read_log(tmp_path)
    assert [r["step"] for r in log if r["skipped_step"]] == [6]
    assert log[5]["skipped_step"].startswith("loss spike") and log[-1]["skipped_steps"] == 1


def test_non_finite_weights_are_never_saved(small_data, tmp_path, monkeypatch):
    """An update that leaves a NaN in the weights (finite loss and gradient before it) is caught
    by the check before the save: the run stops, that step is not written, step 2 is named."""
    make_optimizer = train.make_optimizer

    def nan_after_step_3(args, model, total_steps):
        optimizer, scheduler = make_optimizer(args, model, total_steps)
        calls = []

        def poison(optimizer, *_):
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    model.context_encoder.bias.fill_(float("nan"))
        optimizer.register_step_post_hook(poison)
        return optimizer, scheduler

    monkeypatch.setattr(train, "make_optimizer", nan_after_step_3)
    with pytest.raises(SystemExit, match=r"the trainable weights at step 3: tensor context_encoder\.bias holds 2 "
                                         r"non-finite.*last good checkpoint is \S*step_0000002"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--save-every", "1", "--keep-checkpoints", "0"))
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == ["step_0000001", "step_0000002"]
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_fsdp_ranks_with_different_modalities_in_one_step(small_data, tmp_path):
    """LEVI under FSDP2 with one sample per rank: a step where one rank's sample is text-only and the
    other's has an image leaves LEVI's cross-attention without a gradient on one rank only. FSDP2 must
    still run the same reduce-scatters on both (without it the ranks desynchronise and gloo fails)."""
    entries = json.load(open(small_data))
    assert any("image" not in e for e in entries) and any("image" in e for e in entries)
    log = torchrun(small_data, str(tmp_path), "--method", "levi", "--fsdp", "--micro-batch-size", "1",
                   "--batch-size", "2")
    assert len(log) == 6 and all(math.isfinite(r["loss"]) for r in log)
    summary = json.load(open(os.path.join(tmp_path, "summary.json")))
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]


# -----------------------------------------------------------------------------
# preemption: SIGTERM / SIGINT (what SLURM, Kubernetes and Ctrl-C send) stop after a step, with a checkpoint

def wait_for_log(out, lines, proc, timeout=300):
    """Poll log.jsonl until it holds `lines` steps (the run is mid-way), failing if the run ended first."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(os.path.join(out, "log.jsonl")) and len(read_log(out)) >= lines:
            return
        assert proc.poll() is None, f"the run ended before step {lines}: " + proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no step {lines} after {timeout} s")


def test_sigterm_stops_after_a_step_with_a_checkpoint_and_resume_is_exact(run_a, small_data, tmp_path):
    """A real `train.py` process sent SIGTERM (no checkpoints asked for): it finishes the step in
    progress, writes that step's checkpoint, releases the folder's lock and exits 75; `--resume`
    then ends with the uninterrupted run's learning rates, losses and weights, bit for bit."""
    import signal
    out = str(tmp_path)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *flags(small_data, out, "--max-steps", "6")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_log(out, 1, proc)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == train.PREEMPTED_EXIT_CODE, output[-3000:]
    stopped = len(read_log(out))
    assert 1 <= stopped < 6 and f"stopping after step {stopped} of 6: 1 of 1 rank(s) received SIGTERM" in output
    assert [common.checkpoint_step(p) for p in common.list_checkpoints(out)] == [stopped]
    common.lock_run_folder(out).close()  # the lock was released
    train.main(flags(small_data, out, "--max-steps", "6", "--resume"))
    full, log = read_log(run_a), read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert lrs(log) == lrs(full) and [r["loss"] for r in log] == [r["loss"] for r in full]
    a, b = weights_of(run_a), weights_of(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_every_process_of_the_job_with_loader_workers(small_data, tmp_path):
    """What SLURM's --signal does to a job step: SIGTERM to every process of it, the DataLoader
    workers included (--num-workers 2). The run must still stop after a step, with a checkpoint."""
    import signal
    out = str(tmp_path)
    proc = start_group([sys.executable, os.path.join(REPO, "train.py"),
                        *flags(small_data, out, "--max-steps", "6", "--num-workers", "2")])
    wait_for_log(out, 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = end_group(proc)
    assert proc.returncode == train.PREEMPTED_EXIT_CODE, output[-3000:]


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(fsdp_run, small_data, tmp_path):
    """FSDP2 on 2 ranks: only rank 1 gets SIGINT, during step 5 (epoch 2). Both ranks stop after
    step 5 and write its checkpoint together, equal to the uninterrupted run's step 5; each rank
    exits 75 (torchrun reports it, and exits 1 as for any failed worker); the checkpoint's weights
    and optimizer state equal the uninterrupted run's step 5, whose resume is exact
    (test_fsdp_resume_equals_the_uninterrupted_run; resumes after a SIGTERM: tests/test_cluster.py)."""
    result = torchrun(small_data, tmp_path, "--fsdp", script="tests/killed_train.py", ok=False,
                      env=dict(CARPE_SIGNAL="SIGINT", CARPE_SIGNAL_AT_STEP="4", CARPE_SIGNAL_RANK="1"))
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "exitcode  : 75" in output, output[-3000:]
    assert "stopping after step 5 of 6: 1 of 2 rank(s) received SIGTERM or SIGINT" in output
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]
    assert [common.checkpoint_step(p) for p in common.list_checkpoints(str(tmp_path))] == [5]
    full, cut = os.path.join(fsdp_run, "ckpt", "step_0000005"), tmp_path / "ckpt" / "step_0000005"
    a, b = weights_of(full), weights_of(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = [common.torch_load_data(os.path.join(c, "optimizer.pt"))["optimizer"]["state"] for c in (full, cut)]
    assert a.keys() == b.keys() and all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p])


# -----------------------------------------------------------------------------
# several nodes: the global batch and the mesh

@pytest.mark.parametrize("world, layout", [(1, (8, 8)), (2, (8, 4)), (8, (8, 1)), (16, (4, 1)), (64, (1, 1))])
def test_the_global_batch_stays_at_any_world_size_that_divides_it(world, layout):
    """The paper's --batch-size 64 --micro-batch-size 8 at 1 to 64 ranks: the micro-batch follows
    when 8 x world exceeds 64 (16 ranks: 4 each), the global batch never changes."""
    micro, accum = train.batch_layout(64, 8, world)
    assert (micro, accum) == layout and micro * accum * world == 64


def test_a_world_that_does_not_divide_the_batch_is_refused_naming_both():
    with pytest.raises(SystemExit, match=r"--batch-size 64 cannot be split evenly over 48 ranks"):
        train.batch_layout(64, 8, 48)
    with pytest.raises(SystemExit, match=r"--batch-size 64 over 2 ranks gives 32 samples per rank, not a multiple "
                                         r"of --micro-batch-size 12"):
        train.batch_layout(64, 12, 2)


# -----------------------------------------------------------------------------
# a preset fills only what the user left unset

def test_a_users_imagenet_folder_brings_its_own_class_names(small_data, tmp_path, monkeypatch):
    """--preset tiny (or small) --imagenet DIR trains under DIR/classnames.txt, not under the
    preset's own names; the preset's folder keeps its names, and --imagenet-classes still wins."""
    import shutil
    import data
    import small
    synthetic = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "x"]))
    train.use_tiny_world(synthetic)
    mine = tmp_path / "my_imagenet"
    shutil.copytree(os.path.join(synthetic.imagenet, "train"), mine / "train")
    names = [f"my {d}" for d in sorted(os.listdir(mine / "train"))]
    (mine / "classnames.txt").write_text("\n".join(names) + "\n")

    def class_names(argv):
        args = train.resolve_args(train.parse_args(argv + ["--out", "x"]))
        train.use_tiny_world(args) if args.preset == "tiny" else train.use_small_world(args)
        return data.ImageNetIndex(args.imagenet, args.imagenet_classes).class_names

    assert class_names(["--preset", "tiny", "--imagenet", str(mine)]) == names
    preset_names = class_names(["--preset", "tiny"])
    assert preset_names == [n[3:] for n in names]  # the synthetic folder's own names
    (tmp_path / "other.txt").write_text("\n".join(n.upper() for n in names) + "\n")
    assert class_names(["--preset", "tiny", "--imagenet", str(mine), "--imagenet-classes",
                        str(tmp_path / "other.txt")]) == [n.upper() for n in names]
    # --preset small: the same rule, on a stand-in of small.py's world (its real build needs SmolLM2)
    world = small.SmallWorld(base="b", data="d", image_root="r", imagenet=synthetic.imagenet,
                             imagenet_classes=os.path.join(synthetic.imagenet, "classnames.txt"), eval_root="e",
                             vision="v", lm="l")
    monkeypatch.setattr(small, "ensure_small_world", lambda cache_dir: world)
    assert class_names(["--preset", "small", "--imagenet", str(mine)]) == names
    assert class_names(["--preset", "small"]) == preset_names


def test_fsdp_without_torchrun_says_to_launch_with_torchrun(small_data, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match=r"^--fsdp shards the model over the processes torchrun starts: launch with "
                                         r"torchrun --nproc_per_node N train\.py") as e:
        train.main(flags(small_data, tmp_path / "run", "--max-steps", "1", "--fsdp"))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run")  # refused before anything was made


def test_run_config_records_the_base_as_given_or_as_the_preset(run_a):
    """The tiny preset's base is recorded as "preset:tiny" (in the run folder and every checkpoint),
    never as its cache folder; a resume compares like with like: the recorded form, or, for a
    checkpoint of an older run that recorded the folder, the folder loaded now."""
    folder = tiny.tiny_world(train.parse_args(["--out", "x"]).cache_dir).base
    ckpt = common.load_checkpoint(os.path.join(run_a, "ckpt", "step_0000002"), rank=0)
    for config in (common.read_run_config(run_a), ckpt.config):
        assert config["base"] == config["train"]["base"] == "preset:tiny"
    now = json.loads(json.dumps(ckpt.config))
    assert train.check_resume_settings(ckpt, now, folder) == {}
    ckpt.config = dict(ckpt.config, base=folder)  # written before the base was recorded by name
    assert train.check_resume_settings(ckpt, now, folder) == {}
    with pytest.raises(SystemExit, match=r"a resume cannot change base: checkpoint '/\S+', now '/elsewhere/llava'"):
        train.check_resume_settings(ckpt, dict(now, base="/elsewhere/llava"), "/elsewhere/llava")


def test_resume_compares_settings_as_the_checkpoint_holds_them(run_a):
    """A CARPE-MoE run's expert settings hold tuples (image_mean), its checkpoint's json lists: the
    same setting, not "another run" (every --moe --resume was refused; seen in tests/test_cluster.py)."""
    ckpt = common.load_checkpoint(os.path.join(run_a, "ckpt", "step_0000002"), rank=0)
    experts = [dict(name="siglip", image_mean=(0.5, 0.5, 0.5), tiny=dict(hidden_size=48))]
    now = dict(ckpt.config, moe=dict(experts=experts))
    ckpt.config = json.loads(json.dumps(now))
    assert train.check_resume_settings(ckpt, now, None) == {}
    now = dict(now, moe=dict(experts=[dict(experts[0], image_mean=(0.4, 0.5, 0.5))]))
    with pytest.raises(SystemExit, match=r"moe\.experts: checkpoint"):
        train.check_resume_settings(ckpt, now, None)


def test_tensorboard_and_wandb_mirror_every_step_of_log_jsonl(small_data, tmp_path, monkeypatch):
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("needs the logging packages: pip install -r requirements-logging.txt")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written for a later `wandb sync`
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(flags(small_data, out, "--max-steps", "3", "--tensorboard", "--wandb", "carpe-test"))
    log = read_log(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [r["step"] for r in log] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in log], rel=1e-6)  # stored as float32
    assert len(events.Scalars("grad_norm")) == 3 and len(events.Scalars("vision_weight")) == 3
    run_id = (out / "wandb_id").read_text().strip()
    files = list((out / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(files) == 1, sorted(str(p) for p in (out / "wandb").rglob("*"))
    data = files[0].read_bytes()
    assert all(name in data for name in (b"loss", b"grad_norm", b"vision_weight", b"lr_rest"))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes (root only); remount(size) resizes it, keeping its files."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size, options=""):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size={size}", "tmpfs", str(disk)],
                          capture_output=True).returncode:
            pytest.skip("mounting a small tmpfs needs root (the full-disk tests write to a really full file system)")
        return disk

    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def du(path):
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_a_full_disk_during_a_checkpoint_save_stops_in_one_line_and_resume_finishes(small_data, tmp_path, tmpfs):
    measured = tmp_path / "measured"  # a tiny checkpoint's size, to size the disk: the first fits, the second not
    train.main(flags(small_data, measured, "--max-steps", "1"))
    size = du(measured / "ckpt" / "step_0000001")
    disk = tmpfs(size + size // 2)
    out = disk / "run"
    with pytest.raises(SystemExit) as e:
        train.main(flags(small_data, out, "--max-steps", "3", "--save-every", "1"))
    message = str(e.value)
    first = str(out / "ckpt" / "step_0000001")
    assert "\n" not in message and "stopping at step 2: no space left on the device holding" in message
    assert "step_0000002" in message and f"the previous checkpoint {first} is intact" in message
    assert "--resume" in message
    assert os.listdir(out / "ckpt") == ["step_0000001"]  # no step_0000002.tmp holding the space
    common.verify_manifest(first, required=True)
    assert [r["step"] for r in read_log(out)] == [1, 2]
    common.lock_run_folder(str(out)).close()  # the lock was released
    tmpfs(10 * size, "remount,")  # space freed: the same command with --resume finishes the run
    train.main(flags(small_data, out, "--max-steps", "3", "--save-every", "1", "--resume"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    common.verify_manifest(str(out), required=True)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_full_disk_during_the_final_save_stops_in_one_line_and_resume_finishes(small_data, tmp_path, tmpfs):
    measured = tmp_path / "measured"  # the final checkpoint fits, the final weights beside it not
    train.main(flags(small_data, measured, "--max-steps", "1"))
    ckpt, final = du(measured / "ckpt" / "step_0000001"), du(measured / "model.safetensors")
    disk = tmpfs(ckpt + final // 3)
    out = disk / "run"
    with pytest.raises(SystemExit) as e:
        train.main(flags(small_data, out, "--max-steps", "1"))
    message = str(e.value)
    last = str(out / "ckpt" / "step_0000001")
    assert "\n" not in message and "no space left on the device holding" in message and "model.safetensors" in message
    assert f"the previous checkpoint {last} is intact" in message and "--resume" in message
    assert not os.path.exists(out / "summary.json") and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    common.verify_manifest(last, required=True)
    common.lock_run_folder(str(out)).close()
    tmpfs(10 * ckpt, "remount,")
    train.main(flags(small_data, out, "--max-steps", "1", "--resume"))
    common.verify_manifest(str(out), required=True)
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_a_full_disk_during_the_final_save_on_two_ranks_stops_both(small_data, tmp_path, tmpfs):
    # rank 0 alone writes the final weights: rank 1 must learn of its full disk, not wait at the
    # collective after it until --dist-timeout (kept short here so a wait fails the test quickly)
    measured = tmp_path / "measured"
    train.main(flags(small_data, measured, "--max-steps", "1"))
    ckpt, final = du(measured / "ckpt" / "step_0000001"), du(measured / "model.safetensors")
    disk = tmpfs(ckpt + 64 * 1024 + final // 3)  # + rank 1's RNG file
    out = disk / "run"
    proc = start_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(REPO, "train.py"), *flags(small_data, out, "--max-steps", "1", "--dist-timeout", "2")])
    output = end_group(proc, timeout=100)
    assert proc.returncode != 0, output[-3000:]
    assert f"the previous checkpoint {out / 'ckpt' / 'step_0000001'} is intact" in output, output[-3000:]
    assert "stopping at step 1: rank 0 found the disk full writing the final weights" in output, output[-3000:]
    assert "Timeout" not in output and "timed out" not in output, output[-3000:]
    common.verify_manifest(str(out / "ckpt" / "step_0000001"), required=True)
