"""Tests for moe.py (CARPE-MoE): CuMo CLIP-MoE upcycling and loading, routing, the balance loss,
per-expert preprocessing, and CARPE training with the tiny VisionMoE."""
import copy
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import carpe  # noqa: E402
import moe  # noqa: E402
import common  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls: a second intra-op thread only adds contention on a busy 2-core machine (10x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_clip_config(**kw):
    from transformers import CLIPVisionConfig
    o = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=24,
             patch_size=4, hidden_act="quick_gelu")
    o.update(kw)
    return CLIPVisionConfig(**o)


def fresh_moe(seed=0):
    """A tiny LLaVA, its processor and a tiny VisionMoE (fresh, so tests may change weights)."""
    llava, processor = tiny.tiny_llava(seed=seed)
    return llava, processor, moe.build_vision_moe(llava, tiny.tiny_moe_config())


def solid_images(n, size=(40, 30)):
    colours = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0), (128, 0, 128), (0, 200, 200)]
    return [Image.new("RGB", size, colours[i % len(colours)]) for i in range(n)]


def forced_h_ctx(vision_moe, routes):
    """Set the router to read the first n_experts dims of h_ctx and return an h_ctx that sends
    sample i to expert routes[i]."""
    E, d = vision_moe.router.weight.shape
    with torch.no_grad():
        vision_moe.router.weight.zero_()
        vision_moe.router.weight[:, :E] = torch.eye(E)
        vision_moe.router.bias.zero_()
    h = torch.randn(len(routes), d) * 0.1
    h[torch.arange(len(routes)), torch.tensor(routes)] += 3.0
    return h


# -----------------------------------------------------------------------------
# CuMo CLIP-MoE

def test_upcycled_clip_moe_equals_dense_clip():
    from transformers import CLIPVisionModel
    torch.manual_seed(0)
    config = tiny_clip_config()
    dense = CLIPVisionModel(config).eval()
    sparse = moe.upcycle_dense_mlps(moe.build_clip_moe(config, n_experts=4, top_k=2), dense).eval()
    with torch.no_grad():  # a gate that really spreads tokens over the experts
        for layer in sparse.encoder.layers:
            layer.mlp.gate.weight.normal_(std=1.0)
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        a = dense(x, output_hidden_states=True)
        b = sparse(x, output_hidden_states=True)
        # the gate does pick different experts for different tokens
        h = b.hidden_states[0].reshape(-1, config.hidden_size)
        chosen = torch.softmax(sparse.encoder.layers[0].mlp.gate(h).float(), -1).topk(2, -1).indices
        assert chosen.unique().numel() == 4
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)
    # and the identity is not trivial: changing one expert changes the output
    with torch.no_grad():
        sparse.encoder.layers[1].mlp.experts[2].fc2.bias.add_(1.0)
        c = sparse(x, output_hidden_states=True)
    assert (c.hidden_states[-1] - a.hidden_states[-1]).abs().max() > 1e-2


def cumo_style_state(clip_moe):
    """What CuMo's checkpoint would hold for this tower, plus unrelated LLM / projector keys."""
    layers = clip_moe.encoder.layers
    key_map = moe.cumo_key_map(len(layers), len(layers[0].mlp.experts))
    ours = clip_moe.state_dict()
    state = {src: ours[dst].clone() for src, dst in key_map.items()}
    state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    state["model.mm_projector.experts.0.0.weight"] = torch.zeros(2, 2)
    return state


def test_cumo_state_dict_round_trip_and_key_errors():
    torch.manual_seed(1)
    config = tiny_clip_config()
    source = moe.build_clip_moe(config).eval()
    state = cumo_style_state(source)
    assert "model.vision_tower.vision_model.encoder.layers.2.experts.3.fc1.weight" in state
    assert "model.vision_tower.vision_model.encoder.layers.0.gate.weight" in state
    torch.manual_seed(2)
    target = moe.load_cumo_state(moe.build_clip_moe(config), state).eval()
    src_state, tgt_state = source.state_dict(), target.state_dict()
    for k in src_state:
        if not k.startswith("post_layernorm"):
            assert torch.equal(src_state[k], tgt_state[k]), k
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(source(x, output_hidden_states=True).hidden_states[-2],
                           target(x, output_hidden_states=True).hidden_states[-2])

    missing_key = "model.vision_tower.vision_model.encoder.layers.1.experts.2.fc2.bias"
    broken = dict(state)
    del broken[missing_key]
    with pytest.raises(ValueError, match=re.escape(missing_key)):
        moe.load_cumo_state(moe.build_clip_moe(config), broken)

    extra_key = "model.vision_tower.vision_model.encoder.layers.0.experts.4.fc1.weight"
    broken = dict(state, **{extra_key: torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=re.escape(extra_key)):
        moe.load_cumo_state(moe.build_clip_moe(config), broken)

    bad_shape = dict(state)
    bad_shape["model.vision_tower.vision_model.encoder.layers.0.gate.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="layers.0.gate.weight"):
        moe.load_cumo_state(moe.build_clip_moe(config), bad_shape)


def test_read_checkpoint_tensors_from_sharded_safetensors(tmp_path):
    """The real loader path (index + shards) on a local folder: only vision keys come back."""
    from safetensors.torch import save_file
    torch.manual_seed(3)
    config = tiny_clip_config()
    source = moe.build_clip_moe(config)
    state = cumo_style_state(source)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for file, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / file))
        weight_map.update({k: file for k in ks})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    tensors = moe.read_checkpoint_tensors(str(tmp_path), moe.CUMO_PREFIX)
    assert set(tensors) == {k for k in state if k.startswith(moe.CUMO_PREFIX)}
    target = moe.load_cumo_state(moe.build_clip_moe(config), tensors)
    for src, dst in moe.cumo_key_map(3, 4).items():
        assert torch.equal(target.state_dict()[dst], state[src])


# -----------------------------------------------------------------------------
# routing

def test_forward_is_exactly_the_chosen_expert_and_router_gets_gradient():
    torch.manual_seed(0)
    llava, processor, vm = fresh_moe()
    routes = [0, 2, 1, 3, 2, 0]
    h_ctx = forced_h_ctx(vm, routes)
    pixel_values = vm.preprocess(solid_images(len(routes)))
    image_embeds, memory, balance_loss, route = vm(pixel_values, h_ctx)
    assert route.tolist() == routes
    P = vm.grid ** 2
    assert image_embeds.shape == (6, P, 64) and memory.shape == (6, P, 64)
    for e, name in enumerate(vm.expert_names):
        idx = torch.nonzero(route == e)[:, 0]
        want_embeds, want_memory = vm.expert_path(name, pixel_values[name][idx])
        assert torch.equal(image_embeds[idx].detach(), want_embeds.detach()), name
        assert torch.equal(memory[idx].detach(), want_memory.detach()), name
    # the clip expert is exactly LLaVA's own path: tower layer -2, CLS dropped, the base projector
    with torch.no_grad():
        feats = llava.model.vision_tower(pixel_values["clip"][:1], output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(image_embeds[0], llava.model.multi_modal_projector(feats)[0])
    # images of experts that were not chosen are never read
    poisoned = {name: pv.clone() for name, pv in pixel_values.items()}
    for e, name in enumerate(vm.expert_names):
        unchosen = torch.tensor([r != e for r in routes])
        poisoned[name][unchosen] = float("nan")
    again, _, _, _ = vm(poisoned, h_ctx)
    assert torch.equal(again, image_embeds)
    # the router gets a gradient through p / p.detach(); the encoders get none
    (image_embeds.square().mean() + memory.square().mean() + 0.0 * balance_loss).backward()
    g = vm.router.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0
    assert all(p.grad is None for p in vm.encoders.parameters())
    # "gate" mode scales by p instead: the forward value changes by exactly p
    vm.config.router_grad = "gate"
    gated, _, _, _ = vm(pixel_values, h_ctx)
    p = vm.route_probs(h_ctx).max(-1).values
    torch.testing.assert_close(gated, image_embeds * p[:, None, None])


def test_only_the_chosen_experts_encoder_runs():
    llava, processor, vm = fresh_moe()
    calls = {name: [] for name in vm.expert_names}
    for name, encoder in vm.encoders.items():
        encoder.register_forward_hook(lambda m, args, kwargs, out, name=name: calls[name].append(
            (args[0] if args else kwargs["pixel_values"]).size(0)), with_kwargs=True)
    routes = [0, 2, 2, 3]
    h_ctx = forced_h_ctx(vm, routes)
    image_embeds, memory, balance_loss, route = vm(vm.preprocess(solid_images(4)), h_ctx)
    assert calls == {"clip": [1], "siglip": [], "dinov2": [2], "cumo": [1]}
    # the unused expert's adapters still get a (zero) gradient, so that every rank of FSDP2 / DDP
    # reduces the same tensors; the used ones get a real one
    (image_embeds.square().mean() + memory.square().mean() + balance_loss).backward()
    for name in vm.expert_names:
        for p in list(vm.llm_adapters[name].parameters()) + list(vm.raw_adapters[name].parameters()):
            assert p.grad is not None, name
            assert (p.grad.abs().max() == 0) == (name == "siglip"), name
    with torch.no_grad():
        probs = vm.route_probs(h_ctx)
        assert balance_loss.item() == pytest.approx(moe.switch_balance_loss(probs, route).item())


def test_features_are_the_hidden_state_the_config_names():
    """hidden_state_at (forward hooks, which survive FSDP2's class swap) == output_hidden_states."""
    llava, processor, vm = fresh_moe()
    pixel_values = vm.preprocess(solid_images(2))
    for name, encoder in vm.encoders.items():
        with torch.no_grad():
            want = encoder(pixel_values[name], output_hidden_states=True).hidden_states
            for index in (-2, 0, 1):
                assert torch.equal(moe.hidden_state_at(encoder, pixel_values[name], index), want[index]), (name, index)
    with pytest.raises(ValueError, match="outside"):
        moe.hidden_state_at(vm.encoders["cumo"], pixel_values["cumo"], -5)


def test_every_expert_is_resampled_to_the_base_grid():
    llava, processor, vm = fresh_moe()
    assert vm.expert_grids == {"clip": 6, "siglip": 7, "dinov2": 10, "cumo": 9} and vm.grid == 6
    # 12x12 -> 6x6 averages 2x2 blocks
    feats = torch.arange(12 * 12, dtype=torch.float32).reshape(1, 144, 1)
    pooled = vm.resample(feats)
    grid = feats.reshape(12, 12)
    want = (grid[0::2, 0::2] + grid[1::2, 0::2] + grid[0::2, 1::2] + grid[1::2, 1::2]) / 4
    assert torch.equal(pooled.reshape(6, 6), want)
    same = torch.randn(2, 36, 5)
    assert vm.resample(same) is same
    for name in vm.expert_names:
        pv = vm.preprocess(solid_images(2))[name]
        assert vm.resample(vm.encode(name, pv)).shape[1] == 36


def test_balance_loss_is_minimal_for_uniform_routing():
    E, n = 4, 8
    # confident routing (P_e = f_e): the loss is E * sum f_e^2, smallest (1) at uniform counts
    losses = {}
    for counts in itertools.product(range(n + 1), repeat=E):
        if sum(counts) != n:
            continue
        route = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
        probs = torch.nn.functional.one_hot(route, E).float()
        losses[counts] = moe.switch_balance_loss(probs, route).item()
    assert losses[(2, 2, 2, 2)] == pytest.approx(1.0)
    assert losses[(8, 0, 0, 0)] == pytest.approx(4.0)
    assert all(v > 1.0 + 1e-6 for c, v in losses.items() if c != (2, 2, 2, 2))
    # uniform probabilities give 1 whatever the assignment
    probs = torch.full((n, E), 1 / E)
    assert moe.switch_balance_loss(probs, torch.zeros(n, dtype=torch.long)).item() == pytest.approx(1.0)
    # its gradient spreads a collapsed router over the experts
    torch.manual_seed(0)
    h = torch.randn(64, 16)
    router = torch.nn.Linear(16, E)
    with torch.no_grad():
        router.bias.copy_(torch.tensor([4.0, 0, 0, 0]))
    assert torch.bincount(router(h).argmax(-1), minlength=E).max() == 64
    opt = torch.optim.SGD(router.parameters(), lr=0.5)
    for _ in range(100):
        probs = torch.softmax(router(h), -1)
        loss = moe.switch_balance_loss(probs, probs.argmax(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = torch.softmax(router(h), -1)
    counts = torch.bincount(probs.argmax(-1), minlength=E)
    assert (counts > 0).sum() >= 3 and counts.max() < 40
    assert moe.switch_balance_loss(probs, probs.argmax(-1)).item() < 1.3


# -----------------------------------------------------------------------------
# preprocessing, config, build

def test_preprocess_pads_with_each_experts_mean_and_normalises():
    experts = tiny.tiny_moe_config().experts
    transform = moe.MoEImageTransform({e.name: moe.hand_image_processor(e) for e in experts})
    wide = Image.new("RGB", (80, 40), (255, 255, 255))  # white, padded above and below
    out = transform([wide])
    for e in experts:
        x = out[e.name][0]  # (3, S, S)
        assert x.shape == (3, e.image_size, e.image_size)
        mean, std = torch.tensor(e.image_mean)[:, None], torch.tensor(e.image_std)[:, None]
        top, middle = x[:, 0].reshape(3, -1), x[:, e.image_size // 2].reshape(3, -1)
        assert ((top * std + mean) - mean).abs().max() < 2.5 / 255  # the mean colour
        assert ((middle * std + mean) - 1.0).abs().max() < 1e-5  # white
    assert transform([])["siglip"].shape == (0, 3, 56, 56)


def test_clip_expert_preprocessing_matches_the_base_transform():
    llava, processor = tiny.tiny_llava()
    images = [Image.new("RGB", (50, 30), (10, 200, 30)), Image.effect_noise((48, 60), 40).convert("RGB")]
    want = carpe.make_image_transform(processor)(images)
    # the hand-written tiny clip expert, and the clip expert that takes the base's own processor
    got = fresh_moe()[2].preprocess(images)["clip"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    config = tiny.tiny_moe_config()
    config.experts[0] = moe.ExpertConfig("clip", "base_clip")
    vm = moe.build_vision_moe(llava, config, image_processor=processor.image_processor)
    assert torch.equal(vm.preprocess(images)["clip"], want)
    assert vm.image_transform.backgrounds["clip"] == (122, 116, 104)  # int(255 * CLIP mean), as LLaVA


def test_config_round_trip_and_rebuild_is_deterministic():
    for cfg in (moe.MoEConfig(), tiny.tiny_moe_config()):
        back = moe.MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg
    assert [e.source for e in moe.MoEConfig().experts] == [
        "", "google/siglip-so400m-patch14-384", "facebook/dinov2-large", "shi-labs/CuMo-mistral-7b"]
    assert [e.has_cls for e in moe.MoEConfig().experts] == [True, False, True, True]
    with pytest.raises(ValueError, match="family"):
        moe.MoEConfig(experts=[moe.ExpertConfig("x", "resnet")])
    # common.load_run rebuilds the frozen tiny encoders from the config: they must come back identical
    a = fresh_moe()[2]
    torch.manual_seed(123)  # the global RNG must not matter
    b = fresh_moe()[2]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -----------------------------------------------------------------------------
# CARPE with the tiny VisionMoE

QUESTIONS = ["What is the colour of the shape?", "How many shapes are there?", "Where is the shape?",
             "Identify the object in this image:", "What object can you spot in the picture?",
             "Is there a circle in the image? Please answer yes or no."]
ANSWERS = ["red", "one", "center", "square", "circle", "no"]
STEPS = 15


def make_batch(processor, images):
    # vicuna_v1 turns without the system text, to keep the sequences (and the test) short
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS[:len(images)]]
    full = [p + " " + a + "</s>" for p, a in zip(prompts, ANSWERS)]
    batch = processor(text=full, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    for i, p in enumerate(prompts):
        n_prompt = len(processor(text=[p], images=images[:1], return_tensors="pt")["input_ids"][0])
        n_pad = int((batch["attention_mask"][i] == 0).sum())
        labels[i, :n_pad + n_prompt] = -100
    return batch["input_ids"], batch["attention_mask"], labels


def test_carpe_moe_trains_uses_several_experts_and_saves_once():
    torch.manual_seed(0)
    llava, processor, vm = fresh_moe()
    model = carpe.CARPE(llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=64), vision_moe=vm)
    images = solid_images(6, size=(48, 40))
    input_ids, attention_mask, labels = make_batch(processor, images)
    pixel_values = vm.preprocess(images)

    # the trainable set: projector once (under llava's name, adapter lr), new adapters + router, no encoder
    names = list(model.trainable_state_dict())
    assert sum("multi_modal_projector" in n for n in names) == 4
    assert not any(n.startswith("vision_moe.encoders.") or "llm_adapters.clip" in n for n in names)
    assert {"vision_moe.router.weight", "vision_moe.llm_adapters.siglip.fc.weight",
            "vision_moe.raw_adapters.clip.fc.weight"} <= set(names)
    groups = {g["name"]: g for g in model.param_groups()}
    adapter_ids = {id(p) for p in groups["adapter"]["params"]}
    assert id(vm.llm_adapters["cumo"].fc.weight) in adapter_ids
    assert id(llava.model.multi_modal_projector.linear_1.weight) in adapter_ids
    assert id(vm.router.weight) in {id(p) for p in groups["rest"]["params"]}

    model.set_context_trainable(True)
    opt = torch.optim.AdamW([dict(params=g["params"], lr=3e-3) for g in model.param_groups()], weight_decay=0.0)
    losses, used = [], set()
    model.train()
    for step in range(STEPS):
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)
        used |= set(out.route.tolist())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert len(used) > 1, f"only expert(s) {used} were used"
    assert losses[-1] < 0.5 * losses[0], losses
    # the router learns (it got gradients and moved)
    assert vm.router.weight.grad is not None and vm.router.weight.grad.abs().max() > 0

    # the context weights and the route depend on the text only, never on the image
    model.eval()
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        other = vm.preprocess([im.transpose(Image.ROTATE_90) for im in reversed(images)])
        b = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=other)
    assert torch.equal(a.context_weights, b.context_weights) and torch.equal(a.route, b.route)
    assert not torch.allclose(a.logits, b.logits)
    assert (a.context_weights[:, 0] != 0.5).any()  # the context encoder trained

    # save / load round trip into a freshly built CARPE-MoE (as common.load_run does)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    llava2, _, vm2 = fresh_moe()
    model2 = carpe.CARPE(llava2, carpe.CarpeConfig(integrator_heads=4, chunk_size=64), vision_moe=vm2)
    model2.load_trainable_state_dict(state)
    model2.eval()
    with torch.no_grad():
        c = model2(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert torch.equal(c.route, a.route)
    torch.testing.assert_close(c.logits, a.logits, rtol=0, atol=1e-6)

    # generation with the route reported
    gen = model.generate(input_ids[:2], attention_mask[:2], {k: v[:2] for k, v in pixel_values.items()},
                         max_new_tokens=3, eos_token_id=2, return_dict=True)
    assert torch.equal(gen.route, a.route[:2])

    hist = vm.routing_histogram(torch.cat([a.route, torch.tensor([-1])]))
    assert sum(hist.values()) == 6 and set(hist) == set(vm.expert_names)


# -----------------------------------------------------------------------------
# train.py --moe under torchrun

def train_supports_moe():
    path = os.path.join(ROOT, "train.py")
    return os.path.isfile(path) and "--moe" in open(path).read()


def train_fsdp_handles_moe():
    """FSDP2 --moe needs train.py to keep the frozen expert encoders out of FSDP (see moe.py)."""
    path = os.path.join(ROOT, "train.py")
    return train_supports_moe() and "vision_moe.encoders" in open(path).read()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_train_moe_tiny(tmp_path, parallel):
    if not train_supports_moe():
        pytest.skip("train.py has no --moe flag yet")
    if parallel == "fsdp" and not train_fsdp_handles_moe():
        pytest.skip("train.py --fsdp still shards the base vision tower on its own, which deadlocks --moe "
                    "(ranks that route no image to clip skip its all-gather)")
    import socket
    with socket.socket() as sock:  # a free port, so parallel torchrun tests do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(ROOT, "train.py"), "--moe", "--preset", "tiny", "--max-steps", "8", "--out", str(out),
           # h_ctx shares a large component across prompts, so an untrained router sends every prompt to
           # one expert; a strong balance loss must spread them within these few steps
           "--balance-weight", "1.0"]
    if parallel == "fsdp":
        cmd.append("--fsdp")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    run = json.load(open(out / "config.json"))
    expected = tiny.tiny_moe_config()
    expected.balance_weight = 1.0
    assert moe.MoEConfig.from_dict(run["moe"]) == expected
    # the routing histogram logged by train.py shows more than one expert in use
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(records) == 8 and all(r["balance_loss"] >= 1.0 - 1e-6 for r in records)  # 1 = perfectly uniform
    total = torch.tensor([r["route_hist"] for r in records]).sum(0)
    assert total.numel() == 4 and (total > 0).sum() > 1, total
    balance = [r["balance_loss"] for r in records]
    assert sum(balance[-2:]) < sum(balance[:2]), balance  # the balance loss spreads the routing
    if parallel == "fsdp":
        return
    # the run folder loads back as a CARPE-MoE (what eval.py does) and routes by the text
    model, processor, image_transform = common.load_run(str(out))
    assert isinstance(model.vision_moe, moe.VisionMoE) and image_transform == model.vision_moe.preprocess
    images = solid_images(4, size=(48, 40))
    input_ids, attention_mask, _ = make_batch(processor, images)
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=image_transform(images))
    assert a.route.min() >= 0 and torch.isfinite(a.logits).all()
