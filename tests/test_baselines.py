"""The paper's baselines and CARPE's ablations, each trained by train.py and evaluated by
eval.py on the tiny preset, in the same harness as CARPE: ImageNet fine-tune, LEVI, and CARPE with
fixed weights / no integrator self-attention / last-layer queries. (Vanilla LLaVA and WiSE-FT are
covered in test_eval.py; LEVI's causality and cached decoding in test_carpe.py.)"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import baselines
import bench
import carpe
import eval as E
import train
import benchmarks as B  # noqa: E402
import common  # noqa: E402
import pretrained  # noqa: E402
import tiny  # noqa: E402

STEPS = 8
RUNS = {
    "imagenet-ft": ["--method", "imagenet-ft"],
    "levi": ["--method", "levi"],
    "ablation": ["--fixed-weights", "0.5", "0.5", "--no-integrator-self-attn", "--query-layer", "-1"],
}


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    dirs = {}
    for name, extra in RUNS.items():
        out = str(root / name)
        steps = 2 * STEPS if name == "levi" else STEPS  # LEVI's five zero-initialised blocks start slower
        train.main(["--preset", "tiny", "--out", out, "--max-steps", str(steps), "--batch-size", "8",
                    "--micro-batch-size", "8", "--num-workers", "0", *extra])
        dirs[name] = out
    return dirs


@pytest.fixture(scope="module")
def evals(runs, tmp_path_factory):
    data_root = str(tmp_path_factory.mktemp("bench"))
    tiny.build_tiny_benchmarks(data_root)
    dirs = {}
    for name, run in runs.items():
        dirs[name] = os.path.join(run, "eval")
        E.main(["--bench", "imagenet", "--preset", "tiny", "--ckpt", run, "--data-root", data_root,
                "--limit", "12", "--out", dirs[name]])
    return dirs


def test_each_method_trains_its_own_tensors(runs):
    expected_prefixes = {
        "imagenet-ft": ("llava.model.multi_modal_projector.",),
        "levi": ("blocks.", "llava.lm_head."),
        "ablation": ("llava.model.multi_modal_projector.", "llava.lm_head.", "vision_integrator.", "context_prompt",
                     "context_encoder."),
    }
    base_config = None
    for name, run in runs.items():
        config = common.read_run_config(run)
        assert config["method"] == ("carpe" if name == "ablation" else name)
        state = load_file(os.path.join(run, "model.safetensors"))
        prefixes = {p for p in expected_prefixes[name] if any(k.startswith(p) for k in state)}
        assert prefixes == set(expected_prefixes[name]), (name, sorted(state)[:5])
        assert all(k.startswith(expected_prefixes[name]) for k in state), name
        base_config = base_config or config["base"]
        assert config["base"] == base_config  # the same tiny base for every method


def run_base(run):
    """The base folder a run was trained on (its config names it portably, e.g. "preset:tiny")."""
    config = common.read_run_config(run)
    return pretrained.resolve_base(config["base"], pretrained.trained_cache_dir(config))


def test_imagenet_ft_moves_the_projector_only(runs):
    run = runs["imagenet-ft"]
    state = load_file(os.path.join(run, "model.safetensors"))
    base, _ = carpe.load_base(run_base(run))
    base_projector = {f"llava.model.multi_modal_projector.{k}": v
                      for k, v in base.model.multi_modal_projector.state_dict().items()}
    assert set(state) == set(base_projector)
    assert any(not torch.equal(state[k], base_projector[k]) for k in state)  # the projector moved


def fixed_batch(processor, n=24):
    """The same n synthetic training samples, collated once (per-step losses are too noisy)."""
    import data
    args = train.resolve_args(train.parse_args(["--preset", "tiny", "--out", "unused"]))
    dataset, _ = data.TrainDataset.from_config(tiny.synthetic_data_config(tiny.ensure_synthetic(args.cache_dir)),
                                               processor)
    collator = data.Collator(processor.tokenizer.pad_token_id, carpe.make_image_transform(processor))
    return next(iter(data.make_loader(dataset, collator, n, n, 0, 1, 0)))


def test_levi_loss_falls(runs):
    trained, processor, _ = pretrained.load_run(runs["levi"])
    untrained = baselines.build_model("levi", carpe.load_base(run_base(runs["levi"]))[0], trained.config).eval()
    batch = fixed_batch(processor)
    with torch.no_grad():
        losses = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.item() for m in (untrained, trained)]
    assert losses[1] < 0.85 * losses[0], losses


def test_ablation_flags_reach_the_model(runs):
    model, _, _ = pretrained.load_run(runs["ablation"])
    assert model.config.fixed_weights == (0.5, 0.5)
    assert model.vision_integrator.block.self_attn is None
    assert model.config.query_layer == -1


def test_every_method_evaluates_and_tabulates(evals, capsys):
    for name, out in evals.items():
        with open(os.path.join(out, "imagenet", "metrics.json")) as f:
            metrics = json.load(f)
        with open(os.path.join(out, "imagenet", "predictions.jsonl")) as f:
            assert len(f.readlines()) == 12
        assert 0.0 <= metrics["headline"] <= 100.0
        weights = metrics["context_weights"]
        expected_vision = {"imagenet-ft": 0.0, "levi": 1.0, "ablation": 0.5}[name]  # the fixed mixes
        assert abs(weights["vision"] - expected_vision) < 1e-6, (name, weights)
    capsys.readouterr()
    E.main(["--table", *evals.values()])
    table = capsys.readouterr().out
    for out in evals.values():
        assert B.table_name(out) in table


def calls_during_backward(model, module, batch):
    """How many times `module`'s forward starts inside one training step's backward (a
    checkpointed module recomputes its forward there; a pre-hook, since the recompute stops early,
    once the saved tensors it needs are back), and the step's gradients."""
    calls = []
    handle = module.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        loss = model(**batch).loss
        in_forward = len(calls)
        loss.backward()
    finally:
        handle.remove()
    return len(calls) - in_forward, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["carpe", "imagenet-ft", "levi"])
def test_gradient_checkpointing_recomputes_in_the_backward_for_every_method(method):
    """CarpeConfig.gradient_checkpointing reaches every method through build_model: CARPE's and
    the ImageNet fine-tune's LM decoder layers (the projector's gradient crosses the LM) run again
    in the backward, LEVI's five blocks do (its LM has no backward at all: nothing upstream of it
    trains, so checkpointing it would only add work). The gradients stay the same."""
    results = {}
    for checkpointing in (False, True):
        llava, _ = tiny.tiny_llava(seed=3)
        torch.manual_seed(0)
        model = baselines.build_model(method, llava, carpe.CarpeConfig(integrator_heads=4,
                                                                       gradient_checkpointing=checkpointing))
        model.train()
        batch = bench.make_batch(llava, 2, 9, 5, torch.device("cpu"), text_vocab=100)
        # an MLP inside the checkpointed module (HF checkpoints a layer's forward, its own hooks stay outside)
        lm_mlp = carpe.decoder_layers(model.language_model)[0].mlp
        mlp = model.blocks[0].mlp if method == "levi" else lm_mlp
        recomputed, grads = calls_during_backward(model, mlp, batch)
        results[checkpointing] = grads
        passes = 2 if method == "carpe" else 1  # CARPE's context pass has a backward too (context trainable)
        assert recomputed == (passes if checkpointing else 0), (method, checkpointing)
        if method == "levi":  # and its LM never recomputes
            assert calls_during_backward(model, lm_mlp, batch)[0] == 0
    assert results[False].keys() == results[True].keys()
    for name, g in results[False].items():
        torch.testing.assert_close(results[True][name], g, rtol=1e-5, atol=1e-7, msg=name)
