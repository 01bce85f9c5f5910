"""Tests for moe.py (CARPE-MoE): CuMo CLIP-MoE upcycling and loading, routing, the balance loss,
per-expert preprocessing, and CARPE training with the tiny VisionMoE."""
import itertools
import json
import os
import re
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import carpe  # noqa: E402
import kernels  # noqa: E402
import moe  # noqa: E402
import common  # noqa: E402
import pretrained  # noqa: E402
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
    # compiled (the dense top-2 formulation that fullgraph can trace): the same function. A fresh
    # copy: HF's output-capturing hooks, installed by output_hidden_states, cannot be traced
    compiled = moe.build_clip_moe(config, n_experts=4, top_k=2).eval()
    compiled.load_state_dict(sparse.state_dict())
    torch._dynamo.reset()
    kernels.compile_blocks(carpe.encoder_layers(compiled), backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).last_hidden_state, b.last_hidden_state, rtol=1e-6, atol=1e-6)
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


def save_cumo_folder(path, clip_moe, checkpoint_config, n_shards=2):
    """A CuMo-style checkpoint folder: the tower's tensors under model.vision_tower.vision_model.
    among unrelated LLM keys, in safetensors shards with a model.safetensors.index.json, and an
    LLaVA-Mistral-like config.json. -> the state written."""
    os.makedirs(path, exist_ok=True)
    state = cumo_style_state(clip_moe)
    keys = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys[i::n_shards]}, os.path.join(path, file))
        weight_map.update({k: file for k in keys[i::n_shards]})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(model_type="llava_mistral", clip_smoe=True, mm_vision_tower="openai/clip-vit-large-patch14-336",
                       mm_vision_select_layer=-2, scales=[1, 3], **checkpoint_config), f)
    return state


def cumo_reference_features(tensors, heads, top_k, pixel_values, eps=1e-5):
    """CuMo's CLIPSMoEVisionTransformer (cumo/model/multimodal_encoder/clip_smoe.py) re-derived in
    plain torch from the checkpoint tensors: the input of the last encoder layer, CLS dropped. Each
    token mixes its top-k experts with renormalised fp32 gate weights (here every expert is run
    densely and weighted by 0 where not chosen)."""
    t = {k[len(moe.CUMO_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(moe.CUMO_PREFIX)}
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], eps)
    lin = lambda x, name: F.linear(x, t[name + ".weight"], t.get(name + ".bias"))
    patch = t["embeddings.patch_embedding.weight"].shape[-1]
    x = F.conv2d(pixel_values, t["embeddings.patch_embedding.weight"], stride=patch).flatten(2).transpose(1, 2)
    B, N, D = x.shape
    x = torch.cat([t["embeddings.class_embedding"].expand(B, 1, D), x], 1) + t["embeddings.position_embedding.weight"]
    x = ln(x, "pre_layrnorm")
    n_layers = 1 + max(int(k.split(".")[2]) for k in t if k.startswith("encoder.layers."))
    for i in range(n_layers - 1):  # CuMo returns the input of its last layer
        L = f"encoder.layers.{i}."
        h = ln(x, L + "layer_norm1")
        q, k, v = (lin(h, L + f"self_attn.{p}_proj").view(B, N + 1, heads, -1).transpose(1, 2) for p in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v  # (B, H, N+1, hd)
        x = x + lin(att.transpose(1, 2).reshape(B, N + 1, D), L + "self_attn.out_proj")
        h = ln(x, L + "layer_norm2")
        probs = torch.softmax(lin(h, L + "gate").float(), -1)
        weights, chosen = probs.topk(top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        mlp = torch.zeros_like(h)
        for j in range(probs.shape[-1]):
            w_j = (weights * (chosen == j)).sum(-1, keepdim=True)  # 0 where expert j was not chosen
            f = lin(h, L + f"experts.{j}.fc1")
            mlp = mlp + w_j * lin(f * torch.sigmoid(1.702 * f), L + f"experts.{j}.fc2")  # quick_gelu
        x = x + mlp
    return x[:, 1:]


# two CuMo variants that are not ViT-L/14-336 x 4 experts: (tower config, experts, config.json extras, top-k used)
CUMO_VARIANTS = {
    # no vision settings in config.json: everything from the tensors' shapes (heads = width / 64)
    "shapes": (dict(hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8), 2, dict(num_experts=2), 2),
    # an HF-style vision_config (16-wide heads, which shapes cannot tell) and num_selected = 1
    "config": (dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=24,
                    patch_size=6), 3, dict(num_experts=3, num_selected=1), 1),
}


@pytest.mark.parametrize("variant", sorted(CUMO_VARIANTS))
def test_cumo_variant_loads_exactly_from_its_sharded_checkpoint(tmp_path, variant):
    tower, n_experts, extras, top_k = CUMO_VARIANTS[variant]
    if variant == "config":
        extras = dict(extras, vision_config=dict(tower, hidden_act="quick_gelu"))
    torch.manual_seed(3)
    config = tiny_clip_config(**tower)
    source = moe.build_clip_moe(config, n_experts, top_k).eval()
    with torch.no_grad():  # a gate that spreads tokens, so top-k and the renormalisation matter
        for layer in source.encoder.layers:
            layer.mlp.gate.weight.normal_(std=2.0)
    state = save_cumo_folder(str(tmp_path / "cumo"), source, extras)
    loaded = moe.load_cumo(moe.ExpertConfig("cumo", "clip_moe", str(tmp_path / "cumo"))).eval()
    built = loaded.config
    assert (built.hidden_size, built.intermediate_size, built.num_hidden_layers, built.num_attention_heads,
            built.image_size, built.patch_size) == tuple(tower[k] for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"))
    assert len(loaded.encoder.layers[0].mlp.experts) == n_experts and loaded.encoder.layers[0].mlp.top_k == top_k
    x = torch.randn(2, 3, tower["image_size"], tower["image_size"])
    with torch.no_grad():
        got = moe.hidden_state_at(loaded, x, -2)
        assert torch.equal(got, moe.hidden_state_at(source, x, -2))
        want = cumo_reference_features(state, tower["num_attention_heads"], top_k, x)
    torch.testing.assert_close(got[:, 1:], want, rtol=1e-4, atol=1e-4)


def test_wrong_or_partial_cumo_checkpoint_fails_naming_the_cause(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(4)
    tower, n_experts, extras, _ = CUMO_VARIANTS["shapes"]
    source = moe.build_clip_moe(tiny_clip_config(**tower), n_experts)
    expert = lambda path: moe.ExpertConfig("cumo", "clip_moe", str(path))
    # a key missing from its shard (the index still lists the shard)
    folder = tmp_path / "partial"
    save_cumo_folder(str(folder), source, extras)
    dropped = "model.vision_tower.vision_model.encoder.layers.1.experts.1.fc2.bias"
    with open(folder / "model.safetensors.index.json") as f:
        shard = json.load(f)["weight_map"][dropped]
    tensors = load_file(str(folder / shard))
    del tensors[dropped]
    save_file(tensors, str(folder / shard))
    with pytest.raises(ValueError, match=re.escape(dropped)):
        moe.load_cumo(expert(folder))
    # a shard file missing
    os.remove(folder / shard)
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        moe.load_cumo(expert(folder))
    # config.json says 4 experts, the tensors hold 2
    folder = tmp_path / "wrong_count"
    save_cumo_folder(str(folder), source, dict(num_experts=4))
    with pytest.raises(ValueError, match=r"missing vision-tower key.*layers\.0\.experts\.2\.fc1"):
        moe.load_cumo(expert(folder))
    # not a CuMo checkpoint at all
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8)).save_pretrained(tmp_path / "sig")
    with pytest.raises(ValueError, match="no tensor under 'model.vision_tower.vision_model.'"):
        moe.load_cumo(expert(tmp_path / "sig"))


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
# experts named on the command line or in a JSON file, from local folders

def test_parse_experts_comma_list_json_and_errors(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    assert moe.parse_experts(None) == moe.parse_experts("") == moe.paper_experts()
    experts = moe.parse_experts("clip, siglip=/models/siglip,dinov2=facebook/dinov2-large@-3,mine:cumo=/ckpt/c@-4")
    assert [(e.name, e.family, e.source, e.feature_layer, e.has_cls) for e in experts] == [
        ("clip", "base_clip", "", -2, True), ("siglip", "siglip", "/models/siglip", -2, False),
        ("dinov2", "dinov2", "facebook/dinov2-large", -3, True), ("mine", "clip_moe", "/ckpt/c", -4, True)]
    assert moe.parse_experts("eyes=base")[0] == moe.ExpertConfig("eyes", "base_clip")
    # the family of a folder comes from its config.json
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=16, patch_size=8)).save_pretrained(tmp_path / "sig")
    assert moe.parse_experts(f"vis={tmp_path / 'sig'}") == [moe.ExpertConfig("vis", "siglip", str(tmp_path / "sig"),
                                                                             has_cls=False)]
    spec = tmp_path / "experts.json"
    spec.write_text(json.dumps([{"name": "clip"}, {"name": "dino", "family": "dinov2", "source": "facebook/dinov2-base",
                                                   "feature_layer": -1, "image_size": 336}]))
    assert moe.parse_experts(str(spec)) == [moe.paper_experts()[0], moe.ExpertConfig(
        "dino", "dinov2", "facebook/dinov2-base", 336, feature_layer=-1)]
    # every error names the bad entry
    for bad, message in [("siglip=/a,x=/nowhere", "'x=/nowhere'.*family"), ("siglip=/a@top", "'siglip=/a@top'.*integer"),
                         ("clip=/m/clip", "'clip=/m/clip'.*base"), ("a.b:siglip=/s", "'a.b:siglip=/s'.*name"),
                         ("s:resnet=/s", "'s:resnet=/s'.*resnet"), ("vit", "'vit'.*not a paper expert"),
                         ("siglip=/a,siglip=/b", "unique")]:
        with pytest.raises(ValueError, match=message):
            moe.parse_experts(bad)
    for entry, message in [({"name": "d", "family": "dinov2", "src": "x"}, "entry 0.*unknown key.*'src'"),
                           ({"name": "d", "family": "dinov2", "source": "x", "image_size": 8, "image_mean": [0.5] * 3,
                             "image_std": [0.5] * 3}, "entry 0.*from its image processor")]:
        spec.write_text(json.dumps([entry]))
        with pytest.raises(ValueError, match=message):
            moe.parse_experts(str(spec))


def save_expert_folders(root):
    """Local expert folders as save_pretrained writes them, each with its preprocessor_config.json:
    a tiny SigLIP, a tiny DINOv2 (its processor resizes and centre-crops) and a tiny CuMo checkpoint.
    -> {folder name: source module}."""
    from transformers import Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    torch.manual_seed(5)
    # a whole SigLIP (vision and text towers), as google/siglip-so400m-patch14-384 is
    siglip = SiglipModel(SiglipConfig(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100))).eval()
    siglip.save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(root / "siglip")
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=40, patch_size=4)).eval()
    dinov2.save_pretrained(root / "dinov2")
    BitImageProcessorPil(size={"shortest_edge": 46}, crop_size={"height": 40, "width": 40}, image_mean=moe.IMAGENET_MEAN,
                         image_std=moe.IMAGENET_STD).save_pretrained(root / "dinov2")
    tower, n_experts, extras, _ = CUMO_VARIANTS["shapes"]
    cumo = moe.build_clip_moe(tiny_clip_config(**tower), n_experts).eval()
    save_cumo_folder(str(root / "cumo"), cumo, extras)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "cumo")
    return dict(siglip=siglip.vision_model, dinov2=dinov2, cumo=cumo)


def test_moe_from_local_folders_round_trips_through_its_config(tmp_path):
    """An MoE whose experts are local folders: built from a --experts spec, saved (config dict +
    trainable state), rebuilt from the dict alone: same encoders, same preprocessing, same outputs."""
    sources = save_expert_folders(tmp_path)
    spec = f"clip,siglip={tmp_path / 'siglip'},dino={tmp_path / 'dinov2'}@-1,cumo={tmp_path / 'cumo'}"
    config = moe.MoEConfig(experts=moe.parse_experts(spec), seed=7)
    assert [e.family for e in config.experts] == ["base_clip", "siglip", "dinov2", "clip_moe"]
    llava, processor = tiny.tiny_llava()
    vm = moe.build_vision_moe(llava, config, image_processor=processor.image_processor)
    for name, folder in (("siglip", "siglip"), ("dino", "dinov2")):
        want = sources[folder].state_dict()
        assert all(torch.equal(v, want[k]) for k, v in vm.encoders[name].state_dict().items()), name
    # each expert's own processor after the pad to square with its mean: DINOv2's resize + crop included
    images = [Image.new("RGB", (60, 30), (200, 30, 30)), Image.effect_noise((44, 50), 50).convert("RGB")]
    pixel_values = vm.preprocess(images)
    dino_processor = moe.AutoImageProcessor.from_pretrained(tmp_path / "dinov2", backend="pil")
    background = tuple(int(255 * m) for m in moe.IMAGENET_MEAN)
    want = dino_processor([carpe.expand_to_square(im, background) for im in images], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values["dino"], want) and want.shape[-1] == 40
    assert {name: pv.shape[-1] for name, pv in pixel_values.items()} == dict(clip=48, siglip=56, dino=40, cumo=32)
    assert vm.expert_grids == dict(clip=6, siglip=7, dino=10, cumo=4)

    model = carpe.CARPE(llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=64), vision_moe=vm)
    torch.manual_seed(8)
    with torch.no_grad():  # trained-looking weights, so that a rebuild without loading would differ
        for name, p in model.named_parameters():
            if model.is_trainable_name(name):
                p.add_(torch.randn_like(p) * 0.05)
    saved_config = json.loads(json.dumps(config.to_dict()))
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}

    config2 = moe.MoEConfig.from_dict(saved_config)
    assert config2 == config
    llava2, processor2 = tiny.tiny_llava()
    vm2 = moe.build_vision_moe(llava2, config2, image_processor=processor2.image_processor)
    model2 = carpe.CARPE(llava2, carpe.CarpeConfig(integrator_heads=4, chunk_size=64), vision_moe=vm2)
    model2.load_trainable_state_dict(state)
    a_state, b_state = vm.state_dict(), vm2.state_dict()
    assert a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    pixel_values2 = vm2.preprocess(images)
    assert all(torch.equal(pixel_values[k], pixel_values2[k]) for k in pixel_values)
    model.eval(), model2.eval()
    input_ids, attention_mask, _ = make_batch(processor, images)
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        b = model2(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values2)
        assert torch.equal(a.route, b.route) and torch.equal(a.logits, b.logits)
        # every expert's path, forced by the router: identical after the rebuild
        routes = [0, 1, 2, 3]
        pv = vm.preprocess(solid_images(4))
        h = forced_h_ctx(vm, routes)
        forced_h_ctx(vm2, routes)
        emb_a, mem_a, _, route_a = vm(pv, h)
        emb_b, mem_b, _, route_b = vm2(pv, h)
    assert route_a.tolist() == routes and torch.equal(emb_a, emb_b) and torch.equal(mem_a, mem_b)

    # a folder missing a tower weight is refused, naming it (from_pretrained alone would draw it at random)
    weights = load_file(str(tmp_path / "dinov2" / "model.safetensors"))
    del weights["encoder.layer.1.mlp.fc2.bias"]
    save_file(weights, str(tmp_path / "dinov2" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("missing Dinov2Model weight(s) ['encoder.layer.1.mlp.fc2.bias']")):
        moe.build_vision_moe(llava2, config2, image_processor=processor2.image_processor)


def test_clip_expert_reads_the_processor_of_the_folder_the_base_came_from(tmp_path):
    llava, processor = tiny.tiny_llava()
    tiny.save_tiny_base(llava, processor, str(tmp_path / "base"))
    llava, processor = carpe.load_base(str(tmp_path / "base"))
    config = tiny.tiny_moe_config()
    config.experts[0] = moe.ExpertConfig("clip", "base_clip")
    vm = moe.build_vision_moe(llava, config)  # no image_processor: read from llava's folder
    images = [Image.new("RGB", (30, 50), (0, 90, 250))]
    assert torch.equal(vm.preprocess(images)["clip"], carpe.make_image_transform(processor)(images))
    with pytest.raises(ValueError, match="image_processor="):
        moe.build_vision_moe(tiny.tiny_llava()[0], config)  # built in memory: nothing to read it from


def test_routing_histogram_is_keyed_by_expert_name():
    names = ["clip", "siglip", "dinov2", "cumo"]
    assert moe.route_histogram(torch.tensor([2, 0, -1, 2, 3]), names) == dict(clip=1, siglip=0, dinov2=2, cumo=1)
    assert moe.route_histogram([1, None, 1], names) == dict(clip=0, siglip=2, dinov2=0, cumo=0)  # prediction records
    assert list(moe.route_histogram([], names)) == names  # every expert, router order
    with pytest.raises(ValueError, match="route 4 names no expert"):
        moe.route_histogram([4], names)


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

def logged_routing(record, names):
    """A log.jsonl step's routing histogram keyed by expert name: the dict under "route" (a log
    holding only the router-order list "route_hist" is read in router order)."""
    if isinstance(record.get("route"), dict):
        return record["route"]
    return dict(zip(names, record["route_hist"]))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_train_moe_tiny(tmp_path, parallel):
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
    run = common.read_run_config(str(out))
    expected = tiny.tiny_moe_config()
    expected.balance_weight = 1.0
    assert moe.MoEConfig.from_dict(run["moe"]) == expected
    # the routing histogram logged by train.py shows more than one expert in use
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(records) == 8 and all(r["balance_loss"] >= 1.0 - 1e-6 for r in records)  # 1 = perfectly uniform
    names = [e.name for e in expected.experts]
    hists = [logged_routing(r, names) for r in records]
    assert all(list(h) == names for h in hists), hists[0]
    total = torch.tensor([list(h.values()) for h in hists]).sum(0)
    assert (total > 0).sum() > 1, total
    balance = [r["balance_loss"] for r in records]
    assert sum(balance[-2:]) < sum(balance[:2]), balance  # the balance loss spreads the routing
    if parallel == "fsdp":
        return
    # the run folder loads back as a CARPE-MoE (what eval.py does) and routes by the text
    model, processor, image_transform = pretrained.load_run(str(out))
    assert isinstance(model.vision_moe, moe.VisionMoE) and image_transform == model.vision_moe.preprocess
    images = solid_images(4, size=(48, 40))
    input_ids, attention_mask, _ = make_batch(processor, images)
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=image_transform(images))
    assert a.route.min() >= 0 and torch.isfinite(a.logits).all()


def test_train_with_local_folder_experts_then_eval_reloads_exactly_them(tmp_path):
    """train.py --moe --experts <local save_pretrained folders>, then eval.py --ckpt on the run: the run's
    config names the folders, eval rebuilds exactly those encoders, and its routing is keyed by name."""
    import eval as E
    import train
    sources = save_expert_folders(tmp_path)
    spec = f"clip,siglip={tmp_path / 'siglip'},dino={tmp_path / 'dinov2'}@-1,cumo={tmp_path / 'cumo'}"
    run = str(tmp_path / "run")
    train.main(["--preset", "tiny", "--moe", "--experts", spec, "--out", run, "--max-steps", "2",
                "--batch-size", "8", "--balance-weight", "1.0"])
    saved = moe.MoEConfig.from_dict(common.read_run_config(run)["moe"])
    assert [(e.name, e.source) for e in saved.experts] == [
        ("clip", ""), ("siglip", str(tmp_path / "siglip")), ("dino", str(tmp_path / "dinov2")),
        ("cumo", str(tmp_path / "cumo"))]
    # what eval.py loads: the encoders are the folders' own weights, not fresh ones
    model, _, _ = pretrained.load_run(run)
    for name, folder in (("siglip", "siglip"), ("dino", "dinov2")):
        want = sources[folder].state_dict()
        got = model.vision_moe.encoders[name].state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    data_root = tiny.build_tiny_benchmarks(str(tmp_path / "bench"), per_class=1, n_vl=1)
    E.main(["--bench", "imagenet", "--preset", "tiny", "--ckpt", run, "--data-root", data_root, "--limit", "6"])
    metrics = json.load(open(os.path.join(run, "eval", "imagenet", "metrics.json")))
    assert metrics["n"] == 6 and set(metrics["routing"]) <= {"clip", "siglip", "dino", "cumo"}
    assert sum(metrics["routing"].values()) == 6


def test_input_size_check_follows_each_towers_position_embeddings():
    """SigLIP so400m/14-384 takes its own 384 px although 14 does not divide it (a 27x27 grid);
    CLIP and SigLIP refuse any other size; DINOv2 takes any multiple of its patch."""
    tower = lambda size: SimpleNamespace(config=SimpleNamespace(patch_size=14, image_size=size))
    siglip = moe.ExpertConfig("siglip", "siglip", "s", has_cls=False)
    dinov2 = moe.ExpertConfig("dinov2", "dinov2", "d")
    moe.check_input_size(siglip, tower(384), 384)
    moe.check_input_size(dinov2, tower(518), 336)
    with pytest.raises(ValueError, match="'siglip'.*378px images.*takes 384px"):
        moe.check_input_size(siglip, tower(384), 378)
    with pytest.raises(ValueError, match="'dinov2'.*340px.*multiple of 14"):
        moe.check_input_size(dinov2, tower(518), 340)
