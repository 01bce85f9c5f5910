"""train.py on the tiny preset: exact resume, the epoch-1 freeze of the context prompt and
encoder, 2-process torchrun under DDP and FSDP2 (same losses as one process, identical
weights on both ranks), and the refusals (another config, a non-finite loss).

A small LLaVA json (28 synthetic entries -> 32 samples per epoch with the paper's 1:7 ImageNet
share, set by hand as the tiny preset's default is 1:1) and a global batch of 8 give 4 steps per
epoch, so 6 steps cross into epoch 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import carpe
import data
import train
import common  # noqa: E402
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
    # steps; 6e-3 makes that noise exceed the DDP/FSDP-vs-one-process tolerance below
    return ["--preset", "tiny", "--data", small_data, "--mix", "1:7", "--lr", "2e-3", "--lr-adapter", "2e-4",
            "--batch-size", "8", "--micro-batch-size", "4",
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
    return [n for n in state if n == "context_prompt" or n.startswith("context_encoder.")]


def test_resume_is_exact(run_a, small_data, tmp_path):
    # resume from step 2 in a fresh process state: steps 3-6, across the epoch boundary
    train.main(flags(small_data, tmp_path, "--max-steps", "6", "--resume", os.path.join(run_a, "ckpt", "step_0000002")))
    full, resumed = read_log(run_a), read_log(tmp_path)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]
    assert [r["lr_rest"] for r in resumed] == [r["lr_rest"] for r in full[2:]]
    a, b = load_file(os.path.join(run_a, "model.safetensors")), load_file(os.path.join(tmp_path, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the loss moved and the run folder loads for evaluation
    model, processor, transform = common.load_run(str(tmp_path))
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


def torchrun(small_data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "train.py"), *flags(small_data, out, "--max-steps", "6", *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return read_log(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks(mode, run_a, small_data, tmp_path):
    log = torchrun(small_data, tmp_path, *(["--fsdp"] if mode == "fsdp" else []))
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["world"] == 2 and summary["steps"] == 6
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]  # identical weights on both ranks
    # each rank reads half of every global batch: the same samples and losses as one process
    single = read_log(run_a)
    for r, s in zip(log, single):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-5), (mode, r["step"])
    # the context prompt trained in epoch 2 under both wrappers, the same way as in one process
    a, b = load_file(os.path.join(run_a, "model.safetensors")), load_file(tmp_path / "model.safetensors")
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-5), (mode, n)
    assert os.path.isdir(tmp_path / "ckpt" / "step_0000006")


def test_resume_refuses_another_config(run_a, small_data, tmp_path):
    ckpt = os.path.join(run_a, "ckpt", "step_0000002")
    with pytest.raises(ValueError, match=r"(?s)step_0000002 was made for another run.*carpe:.*integrator_self_attn"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--no-integrator-self-attn", "--resume", ckpt))
    with pytest.raises(ValueError, match=r"--batch-size: checkpoint 8 vs now 16"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--resume", ckpt, "--batch-size", "16"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(small_data, tmp_path):
    with pytest.raises(RuntimeError, match=r"non-finite loss .* at step \d+ .*last good checkpoint .*step_"):
        train.main(flags(small_data, tmp_path, "--max-steps", "6", "--save-every", "1", "--lr", "1e30",
                         "--lr-adapter", "1e30", "--grad-clip", "0"))
    ckpts = train.list_checkpoints(str(tmp_path))
    assert ckpts, "the good steps before the blow-up were checkpointed"
    last = load_file(os.path.join(ckpts[-1], "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "ckpt"))


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
    context = {id(p) for n, p in model.named_parameters() if train.is_context_name(n)}
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
