"""carpe.py: behaviour of the CARPE wrapper on a tiny offline LLaVA."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (CLIPVisionConfig, GemmaConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaProcessor, MistralConfig, PhiConfig,
                          Qwen2Config, SiglipVisionConfig)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import carpe
import moe
from baselines import LEVI, LlavaBaseline, build_model
from carpe import (CARPE, CarpeConfig, IntegratorBlock, count_parameters, encoder_layers, load_base,
                   make_image_transform, meta_llava, positions_from_mask, repeated_blocks, run_language_model)
from data import SYSTEM_PROMPT
from kernels import IGNORE_INDEX
from tiny import save_tiny_base, tiny_llava, tiny_moe_config, tiny_tokenizer

QUESTIONS = ["What color is the shape?", "How many shapes are there?", "Where is the circle?"]


def image(seed, w=60, h=44):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def prompt(question, with_image=True):
    return SYSTEM_PROMPT + " USER: " + ("<image>\n" if with_image else "") + question + " ASSISTANT:"


@pytest.fixture(scope="module")
def tiny():
    llava, processor = tiny_llava(seed=0)
    return llava, processor


def batch(processor, questions, images, with_image):
    """Left-padded prompts; images only for the samples that have one (HF LLaVA's layout)."""
    texts = [prompt(q, w) for q, w in zip(questions, with_image)]
    # the processor expands <image> to the image tokens
    enc = processor(text=texts, images=[im for im, w in zip(images, with_image) if w] or None,
                    return_tensors="pt", padding=True)
    pixel_values = make_image_transform(processor)([im for im, w in zip(images, with_image) if w])
    return enc.input_ids, enc.attention_mask, pixel_values


def randomise(module, seed=1, std=0.05):
    """Give zero-initialised parts (integrator outputs, context encoder) random values, so the
    tests see a non-trivial integrator and context encoder."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def make_carpe(llava, **cfg):
    model = CARPE(llava, CarpeConfig(integrator_heads=4, **cfg))
    randomise(model.vision_integrator)
    randomise(model.context_encoder, seed=2, std=0.5)
    return model.eval()


def test_vision_weight_zero_reproduces_vanilla_llava(tiny):
    llava, processor = tiny
    ids, mask, pix = batch(processor, QUESTIONS, [image(0), image(1), image(2)], [True, False, True])
    assert (mask == 0).any(), "the batch should be left-padded"
    model = make_carpe(llava, fixed_weights=(0.0, 1.0))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        ref = llava(input_ids=ids, attention_mask=mask, pixel_values=pix, position_ids=positions_from_mask(mask)).logits
    assert torch.equal(ours, ref)
    ours = model.generate(ids, mask, pix, max_new_tokens=8, eos_token_id=2)
    ref = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref)
    # the baseline wrapper too
    ours = LlavaBaseline(llava).generate(ids, mask, pix, max_new_tokens=8, eos_token_id=2)
    assert torch.equal(ours, ref)


def test_mixed_weights_change_the_output(tiny):
    llava, processor = tiny
    ids, mask, pix = batch(processor, QUESTIONS[:2], [image(0), image(1)], [True, True])
    with torch.no_grad():
        vanilla = make_carpe(llava, fixed_weights=(0.0, 1.0))(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        mixed = make_carpe(llava, fixed_weights=(0.5, 0.5))(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    assert (vanilla - mixed).abs().max() > 1e-3


def test_integrator_starts_as_identity(tiny):
    llava, processor = tiny
    model = CARPE(llava, CarpeConfig(integrator_heads=4)).eval()
    ids, mask, pix = batch(processor, QUESTIONS[:1], [image(0)], [True])
    prep = model.prepare(ids, mask, pix)
    with torch.no_grad():
        _, (h_query,) = run_language_model(llava.model.language_model, prep.inputs_embeds, mask,
                                           positions_from_mask(mask), [model.config.query_layer])
        h_vision = model.integrate(h_query, model.memory_kv(prep.memory), prep.has_image)
    torch.testing.assert_close(h_vision, llava.model.language_model.norm(h_query))
    assert torch.allclose(prep.weights, torch.full_like(prep.weights, 0.5))  # zero-init context encoder


@pytest.mark.parametrize("method", ["carpe", "levi"])
def test_causal(tiny, method):
    """Changing token t+1 leaves every logit at positions <= t unchanged (fixed weights: with
    labels=None the context pass reads the whole input by design)."""
    llava, processor = tiny
    if method == "carpe":
        model = make_carpe(llava, fixed_weights=(0.5, 0.5))
    else:
        model = LEVI(llava, CarpeConfig(integrator_heads=4)).eval()
        randomise(model.blocks)
    ids, mask, pix = batch(processor, QUESTIONS[:2], [image(0), image(1)], [True, True])
    t = ids.size(1) - 4
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 7) % 400 + 5
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        b = model(input_ids=changed, attention_mask=mask, pixel_values=pix).logits
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-4  # and the future does change


def test_context_weights_ignore_image_and_answer_but_follow_instruction(tiny):
    llava, processor = tiny
    model = make_carpe(llava)
    ids, mask, pix = batch(processor, QUESTIONS, [image(0), image(1), image(2)], [True, True, True])
    with torch.no_grad():
        w = model(input_ids=ids, attention_mask=mask, pixel_values=pix).context_weights
        w_other_images = model(input_ids=ids, attention_mask=mask, pixel_values=pix.flip(0) * 0.5 + 1).context_weights
    assert torch.equal(w, w_other_images)
    assert (w[0] - w[1]).abs().max() > 1e-4 and (w[1] - w[2]).abs().max() > 1e-4  # instructions differ
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    # with labels, the answer tokens never reach the context pass (no target leak)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    answer_changed = ids.clone()
    answer_changed[:, -3:] = 77
    with torch.no_grad():
        w1 = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).context_weights
        w2 = model(input_ids=answer_changed, attention_mask=mask, pixel_values=pix, labels=labels).context_weights
    assert torch.equal(w1, w2)


def trainable_names():
    return ("llava.model.multi_modal_projector.", "llava.lm_head.", "vision_integrator.", "context_prompt",
            "context_encoder.")


def train_batch(processor, n=4):
    """Prompt + answer with labels on the answer (right padding, like training)."""
    answers = ["red</s>", "two</s>", "left</s>", "blue square</s>"][:n]
    tok = processor.tokenizer
    rows, label_rows = [], []
    for q, a in zip(QUESTIONS * 2, answers):
        p_ids = processor(text=prompt(q), images=[image(len(rows))], return_tensors="pt").input_ids[0].tolist()
        a_ids = tok(" " + a, add_special_tokens=False).input_ids
        rows.append(p_ids + a_ids)
        label_rows.append([IGNORE_INDEX] * len(p_ids) + a_ids)
    T = max(map(len, rows))
    ids = torch.full((n, T), tok.pad_token_id)
    labels = torch.full((n, T), IGNORE_INDEX)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, label_rows)):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(l)] = torch.tensor(l)
        mask[i, :len(r)] = 1
    pix = make_image_transform(processor)([image(i) for i in range(n)])
    return ids, mask, pix, labels


def test_one_step_changes_only_the_trainable_set():
    llava, processor = tiny_llava(seed=3)
    model = CARPE(llava, CarpeConfig(integrator_heads=4))
    # zero-initialised output projections and context encoder would give their upstream tensors
    # an exactly-zero first gradient; randomise them so every trainable tensor must move
    randomise(model.vision_integrator)
    randomise(model.context_encoder, std=0.5)
    model.train()
    ids, mask, pix, labels = train_batch(processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for context_trainable in (False, True):
        model.set_context_trainable(context_trainable)
        opt = torch.optim.AdamW(model.param_groups(lr_adapter=1e-3, lr=1e-3), weight_decay=0.0)
        model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss.backward()
        assert model.llava.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # through the frozen LM
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            moved = not torch.equal(before[name], p.detach())
            is_context = name.startswith(("context_prompt", "context_encoder."))
            should_move = name.startswith(trainable_names()) and (context_trainable or not is_context)
            assert moved == should_move, f"{name}: moved={moved}, expected {should_move}"
    lrs = {g["name"]: g["lr"] for g in CARPE(tiny_llava()[0], CarpeConfig(integrator_heads=4)).param_groups()}
    assert lrs == {"adapter": 2e-5, "rest": 2e-4}


@pytest.mark.parametrize("method", ["carpe", "levi"])
def test_cached_generation_equals_full_recompute(tiny, method):
    llava, processor = tiny
    if method == "carpe":
        model = make_carpe(llava)
    else:
        model = LEVI(llava, CarpeConfig(integrator_heads=4)).eval()
        randomise(model.blocks)
    ids, mask, pix = batch(processor, QUESTIONS, [image(0), image(1), image(2)], [True, False, True])
    out = model.generate(ids, mask, pix, max_new_tokens=10, return_dict=True)
    seq = ids
    full_mask = mask
    with torch.no_grad():
        for _ in range(10):
            kw = dict(context_mask=torch.cat([mask, torch.zeros_like(full_mask[:, mask.size(1):])], 1)) \
                if method == "carpe" else {}
            logits = model(input_ids=seq, attention_mask=full_mask, pixel_values=pix, **kw).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
    assert torch.equal(out.sequences, seq)
    assert out.context_weights.shape == (3, 2)


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    llava, processor = tiny_llava(seed=4)
    model = CARPE(llava, CarpeConfig(integrator_heads=4))
    model.set_context_trainable(True)
    model.train()
    ids, mask, pix, labels = train_batch(processor)
    opt = torch.optim.AdamW(model.param_groups(lr_adapter=1e-2, lr=1e-2), weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_trainable_state_dict_round_trip_and_mismatch():
    llava, _ = tiny_llava(seed=5)
    model = make_carpe(llava)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    assert set(state) and all(k.startswith(trainable_names()) for k in state)
    other = CARPE(tiny_llava(seed=6)[0], CarpeConfig(integrator_heads=4))
    other.load_trainable_state_dict(state)
    for k, v in other.trainable_state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="missing.*context_prompt"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "context_prompt"})
    bigger = CARPE(tiny_llava(seed=6, hidden=128)[0], CarpeConfig(integrator_heads=4))
    with pytest.raises(ValueError, match="shape"):
        bigger.load_trainable_state_dict(state)
    with pytest.raises(ValueError, match="unknown method"):
        build_model("clip", llava)


class CountOp(TorchDispatchMode):
    def __init__(self, op):
        super().__init__()
        self.op, self.count = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is self.op
        return func(*args, **(kwargs or {}))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, mask, pix, labels = train_batch(tiny_llava(seed=7)[1])
    grads = []
    for checkpointing in (False, True):
        model = CARPE(tiny_llava(seed=7)[0], CarpeConfig(integrator_heads=4, gradient_checkpointing=checkpointing))
        torch.manual_seed(0)
        randomise(model.vision_integrator)
        randomise(model.context_encoder, std=0.5)
        model.set_context_trainable(True)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        with CountOp(torch.ops.aten.silu.default) as silu:  # the LM's MLP activation
            loss.backward()
        assert (silu.count > 0) == checkpointing  # the backward recomputes the checkpointed layers
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "context_prompt" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_text_only_batch_still_gives_every_trainable_tensor_a_gradient():
    """FSDP2 / DDP need the same set of gradients on every rank, whatever a rank's batch holds."""
    llava, processor = tiny_llava(seed=8)
    model = CARPE(llava, CarpeConfig(integrator_heads=4))
    model.set_context_trainable(True)
    model.train()
    tok = processor.tokenizer
    ids = tok([prompt("Name a colour.", with_image=False) + " red</s>"], return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :-3] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert torch.equal(out.loss, out.lm_loss + 0.0)  # the zero term changes nothing
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("method", ["carpe", "levi"])
def test_bf16_base_runs_without_autocast(tiny, method):
    """The new modules follow the base's dtype, so a bf16 base works without autocast."""
    llava, processor = tiny_llava(seed=9)
    llava.to(torch.bfloat16)
    model = build_model(method, llava, CarpeConfig(integrator_heads=4)).eval()
    ids, mask, pix = batch(processor, QUESTIONS[:2], [image(0), image(1)], [True, False])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix.to(torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    gen = model.generate(ids, mask, pix.to(torch.bfloat16), max_new_tokens=3)
    assert gen.shape == (2, ids.size(1) + 3)


def test_generate_refuses_right_padding(tiny):
    llava, processor = tiny
    ids, mask, pix = batch(processor, QUESTIONS[:2], [image(0), image(1)], [True, True])
    right_ids = torch.stack([torch.cat([i[m.bool()], i[~m.bool()]]) for i, m in zip(ids, mask)])
    right_mask = mask.sort(dim=1, descending=True).values
    with pytest.raises(ValueError, match="left-padded"):
        LlavaBaseline(llava).generate(right_ids, right_mask, pix, max_new_tokens=2)


# -----------------------------------------------------------------------------
# other LLaVA-1.5-style bases: tiny mirrors built from configs (random weights, offline)

def tiny_mirror(text="llama", vision="clip", feature_layer=-2, strategy="default", seed=0):
    """A tiny LlavaForConditionalGeneration with the given text model and vision tower, and its
    processor (the tiny byte-level tokenizer)."""
    tok = tiny_tokenizer()
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text_config = {
        "llama": lambda: LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "phi": lambda: PhiConfig(num_key_value_heads=4, tie_word_embeddings=False, **common),
        "mistral": lambda: MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=256,
                                         tie_word_embeddings=False, **common),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common),
        "gemma": lambda: GemmaConfig(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, **common),
    }[text]()
    vision_kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     image_size=48, patch_size=8)
    if vision == "clip":
        vision_config, extra_tokens = CLIPVisionConfig(projection_dim=32, **vision_kw), 1
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    else:  # SigLIP: no CLS token
        vision_config, extra_tokens = SiglipVisionConfig(**vision_kw), 0
        image_processor = SiglipImageProcessorPil(size={"height": 48, "width": 48})
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                         tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.generation_config.pad_token_id = tok.pad_token_id
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens)
    return llava, processor


MIRRORS = {
    "phi": dict(text="phi"),
    "mistral": dict(text="mistral"),
    "qwen2-siglip-full": dict(text="qwen2", vision="siglip", feature_layer=-1, strategy="full"),
    "gemma": dict(text="gemma"),
    "llama-feature-layers": dict(text="llama", feature_layer=[-3, -1]),
    "llama-clip-full": dict(text="llama", strategy="full"),
}


@pytest.mark.parametrize("name", list(MIRRORS))
def test_other_bases_match_hf_and_decode_like_a_full_recompute(name):
    llava, processor = tiny_mirror(**MIRRORS[name])
    tied = llava.lm_head.weight is llava.model.language_model.get_input_embeddings().weight
    assert tied == (name == "gemma")  # Gemma's head is tied to its (sqrt(d)-scaled) embeddings
    ids, mask, pix = batch(processor, QUESTIONS, [image(0), image(1), image(2)], [True, False, True])
    with torch.no_grad():
        ref = llava(input_ids=ids, attention_mask=mask, pixel_values=pix, position_ids=positions_from_mask(mask)).logits
    model = make_carpe(llava, fixed_weights=(0.0, 1.0))
    assert llava.lm_head.weight is not llava.model.language_model.get_input_embeddings().weight  # untied
    layers = llava.config.vision_feature_layer
    n_layers = 1 if isinstance(layers, int) else len(layers)
    assert model.vision_integrator.raw_adapter.fc.in_features == 32 * n_layers
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # a mixing CARPE: cached greedy decoding equals recomputing the whole sequence each step
    model = make_carpe(llava)
    out = model.generate(ids, mask, pix, max_new_tokens=6, return_dict=True)
    seq, full_mask = ids, mask
    with torch.no_grad():
        for _ in range(6):
            context_mask = torch.cat([mask, torch.zeros_like(full_mask[:, mask.size(1):])], 1)
            logits = model(input_ids=seq, attention_mask=full_mask, pixel_values=pix, context_mask=context_mask).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
    assert torch.equal(out.sequences, seq)
    assert (out.context_weights[:, 0] - 0.5).abs().max() > 1e-3  # the mix is really used


def test_llava_next_is_refused_by_name(tmp_path):
    llava, _ = tiny_mirror()
    config = LlavaNextConfig(vision_config=llava.config.vision_config, text_config=llava.config.text_config,
                             image_token_id=llava.config.image_token_id, image_grid_pinpoints=[[48, 48]])
    next_model = LlavaNextForConditionalGeneration(config)
    for build in (lambda: CARPE(next_model, CarpeConfig(integrator_heads=4)), lambda: LlavaBaseline(next_model),
                  lambda: LEVI(next_model, CarpeConfig(integrator_heads=4))):
        with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration is not a LLaVA-1.5-style base"):
            build()
    next_model.save_pretrained(tmp_path / "next")
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration, not a LLaVA-1.5-style base"):
        load_base(str(tmp_path / "next"))


def test_load_base_gives_a_pil_processor_and_checks_the_image_token(tmp_path):
    llava, processor = tiny_mirror("qwen2", "siglip", -1, "full")
    save_tiny_base(llava, processor, tmp_path / "ok")
    loaded, loaded_processor = load_base(str(tmp_path / "ok"))
    assert loaded_processor.image_processor.backend == "pil"
    assert torch.equal(loaded.lm_head.weight, llava.lm_head.weight)
    llava.config.image_token_id = 5  # a config whose <image> id disagrees with the tokenizer's
    save_tiny_base(llava, processor, tmp_path / "bad")
    with pytest.raises(ValueError, match=r"encodes '<image>' as \[4\], but config.image_token_id is 5"):
        load_base(str(tmp_path / "bad"))


def test_repeated_blocks_lists_every_repeated_module_once(tiny):
    llava, _ = tiny
    lm = list(llava.model.language_model.layers)  # 6
    tower = list(llava.model.vision_tower.encoder.layers)  # 3
    assert repeated_blocks(llava) == lm + tower
    model = make_carpe(llava)
    assert repeated_blocks(model) == lm + tower + [model.vision_integrator.block]
    levi = LEVI(llava, CarpeConfig(integrator_heads=4))
    assert repeated_blocks(levi) == lm + tower + list(levi.blocks) and len(levi.blocks) == 5
    assert repeated_blocks(LlavaBaseline(llava)) == lm + tower
    # CARPE-MoE: the other experts' towers too; the clip expert is the base tower, listed once
    vision_moe = moe.build_vision_moe(llava, tiny_moe_config())
    moe_model = CARPE(llava, CarpeConfig(integrator_heads=4), vision_moe=vision_moe)
    experts = [layer for name in ("siglip", "dinov2", "cumo") for layer in encoder_layers(vision_moe.encoders[name])]
    assert len(experts) == 2 + 2 + 3
    blocks = repeated_blocks(moe_model)
    assert blocks == lm + tower + [moe_model.vision_integrator.block] + experts
    assert len({id(b) for b in blocks}) == len(blocks)


def test_paper_scale_parameter_counts_on_the_meta_device():
    """Every method builds on the meta device at llava-1.5-7b's shapes, and count_parameters gives
    the figures worked out by hand from the published shapes (d = 4096, V = 32064, CLIP width 1024):
      projector  Linear(1024, d) + Linear(d, d) with biases     1024d + d + d^2 + d        =    20,979,712
      head       Linear(d, V), no bias                          V d                        =   131,334,144
      integrator raw adapter MLP(1024, d, d)                                               =    20,979,712
                 block: 3 RMSNorms 3d; cross- and self-attention 2 x (4d^2 + 3d) (no key bias);
                 MLP d->4d->d 8d^2 + 5d                          16d^2 + 14d               =   268,492,800
      context    prompt d + Linear(d, 2)                         3d + 2                    =        12,290
      CARPE trainable                                                                       =   441,798,658
      LEVI trainable: head + 5 integrator blocks                                            = 1,473,798,144
      frozen: embeddings V d = 131,334,144; 32 decoder layers x (4d^2 + 3 x 11008 d + 2d) =
              6,476,267,520; final norm d; CLIP ViT-L/14-336 303,507,456 (577 positions,
              24 layers x 12,596,224 + embeddings and pre/post norms)                       = 6,911,113,216
      CARPE-MoE adds: LLM adapters siglip MLP(1152, d, d) 21,504,000 + dinov2 and cumo
              2 x 20,979,712; raw adapters clip, dinov2, cumo 3 x 20,979,712 + siglip 21,504,000;
              router 4d + 4 = 16,388                                                        =   147,922,948
              (so 589,721,606; CARPE's own raw adapter stays in the trainable set, unused)
              frozen towers: SigLIP so400m 428,225,600, DINOv2-L 304,368,640, CuMo CLIP-MoE
              303,507,456 + 24 x (gate 4096 + 3 more CLIP MLPs 3 x 8,393,728) = 907,954,176
    AdamW state = 16 bytes per trainable parameter (fp32 weight, grad, exp_avg, exp_avg_sq)."""
    integrator = 20_979_712 + 268_492_800
    frozen = 131_334_144 + 6_476_267_520 + 4096 + 303_507_456
    expected = {
        "carpe": (dict(context=12_290, projector=20_979_712, head=131_334_144, integrator=integrator), frozen),
        "carpe-moe": (dict(context=12_290, projector=20_979_712, head=131_334_144, integrator=integrator,
                           **{"moe.llm_adapters": 63_463_424, "moe.raw_adapters": 84_443_136, "moe.router": 16_388}),
                      frozen + 428_225_600 + 304_368_640 + 907_954_176),
        "levi": (dict(head=131_334_144, blocks=5 * 268_492_800), frozen + 20_979_712),
        "imagenet-ft": (dict(projector=20_979_712), frozen + 131_334_144),
    }
    for method, (parts, frozen_count) in expected.items():
        llava = meta_llava()
        with torch.device("meta"):
            vision_moe = moe.meta_vision_moe(llava) if method == "carpe-moe" else None
            model = build_model("carpe" if method == "carpe-moe" else method, llava, CarpeConfig(), vision_moe=vision_moe)
        assert all(p.is_meta for p in model.parameters()), method
        count = count_parameters(model)
        assert count.parts == parts, method
        assert count.trainable == sum(parts.values()) and count.frozen == frozen_count, method
        assert count.adamw_gib == count.trainable * 16 / 2 ** 30
    assert sum(expected["carpe"][0].values()) == 441_798_658
    assert sum(expected["carpe-moe"][0].values()) == 589_721_606
    assert round(441_798_658 * 16 / 2 ** 30, 2) == 6.58  # GiB of AdamW training state for CARPE


class RecordRMSNorm(torch.overrides.TorchFunctionMode):
    """Records (input dtype, weight dtype, output dtype) of every rms_norm call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.nn.functional.rms_norm, torch.rms_norm):
            weight = args[2] if len(args) > 2 else (kwargs or {}).get("weight")
            self.calls.append((args[0].dtype, weight.dtype, out.dtype))
        return out


def test_integrator_norms_run_in_the_activation_dtype_under_autocast():
    """Trainable fp32 integrator weights, bf16 activations, bf16 autocast (one GPU or DDP: no FSDP
    casting the weights): each of the block's RMSNorms gets a weight of the activations' dtype (the
    fused kernel's condition), returns bf16, and the block stays close to its fp32 computation."""
    torch.manual_seed(0)
    block = IntegratorBlock(64, 4)  # fp32
    randomise(block)
    x = torch.randn(2, 7, 64)
    memory = torch.randn(2, 5, 64)
    has_image = torch.tensor([True, False])
    reference = block(x, block.memory_kv(memory), has_image)  # fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordRMSNorm() as record:
        out = block(x.bfloat16(), block.memory_kv(memory.bfloat16()), has_image)
    assert len(record.calls) == 3 and set(record.calls) == {(torch.bfloat16,) * 3}
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_load_base_names_a_missing_folder(tmp_path, monkeypatch):
    """A path that is no folder says so (Hugging Face alone says "Repo id must be in the form
    'repo_name' or 'namespace/repo_name'"); Hub ids are still Hub ids; "~" is expanded."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for missing in ["/path/that/does/not/exist", "./nope", "~/nope", "a/b/c", "runs/llava"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_base(missing)
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        load_base(str(tmp_path / "file.txt"))
    assert not carpe.looks_like_path("llava-hf/llava-1.5-7b-hf") and not carpe.looks_like_path("gpt2")
    save_tiny_base(*tiny_llava(seed=0), str(tmp_path / "base"))
    llava, _ = load_base("~/base")  # HOME is tmp_path
    assert isinstance(llava, LlavaForConditionalGeneration)
