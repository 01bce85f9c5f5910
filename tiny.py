"""
tiny.py: the offline tiny world behind `--preset tiny`. Nothing here is needed for the paper's
runs; everything here exists so that the whole pipeline (pre-stage, training, every benchmark's
reader and scorer) runs in minutes on a laptop CPU with no download, and so that the tests run
real code paths.

The world has five parts, one section each:

  1. A tiny LLaVA-1.5 and its tokenizer, built from configs: a 3-layer CLIP tower and a 6-layer
     Llama (d=64), with a byte-level BPE tokenizer trained in memory on a built-in corpus. It is
     saved as an ordinary Hugging Face folder, so `carpe.load_base` reads it like llava-1.5-7b-hf.
  2. Synthetic data drawn with Pillow: coloured shapes on 64x48 canvases (not square, so LLaVA's
     pad-to-square runs). An ImageFolder whose class is the shape stands in for ImageNet, and
     LLaVA-format conversations ask about the colour, count and position of the same shapes.
  3. The pre-stage, standing in for LLaVA-1.5's own training: the tower learns the shapes (as CLIP
     comes pre-trained), then the LM learns the conversations (vanilla LLaVA). The result is the
     base that `train.py --preset tiny` wraps: it answers conversations but has never seen a
     classification prompt, which is the situation the paper starts from.
  4. Tiny benchmarks: a few synthetic items in each benchmark's release layout (ImageFolders,
     LLaVA's question files, the MME folders, the MMBench TSV with base64 images, ...), so every
     reader and scorer of benchmarks.py runs on files shaped like the real ones.
  5. A tiny CARPE-MoE expert set: four small random towers of the four expert families.

Everything is drawn from fixed seeds and cached under a folder whose name is a digest of the
settings, so `python train.py --preset tiny` gives the same numbers on every machine. Folders are
built in a temporary sibling and renamed into place: a killed build leaves no half folder behind.
"""
import base64
import csv
import glob
import hashlib
import io
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import carpe
import data
from benchmarks import MME_COGNITION, MME_PERCEPTION, POPE_SPLITS, SHORT_ANSWER
from common import cosine_schedule, print0
from data import IMAGE_TAG, SYSTEM_PROMPT, DataConfig
from moe import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, ExpertConfig, MoEConfig


def build_folder_atomically(path, build):
    """Run build(tmp) on a temporary sibling of `path`, then rename it to `path`: the folder either
    does not exist or is complete, whenever the process is killed. Temporary siblings left by
    killed processes are removed first. If another process renamed its copy first, ours goes."""
    for stale in glob.glob(f"{path}.tmp*"):
        pid = stale.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        os.rename(tmp, path)  # atomic; also replaces an empty folder at `path`
    except OSError:  # another process finished the same folder first (or `path` is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(path):
            raise
    return path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# -----------------------------------------------------------------------------
# 1. the tiny LLaVA and its tokenizer

def save_tiny_base(llava, processor, path):
    """A tiny base as an ordinary Hugging Face folder (model and processor through
    save_pretrained), so carpe.load_base reads it like any other base."""
    llava.save_pretrained(path)
    processor.save_pretrained(path)


_TOKENIZER_CORPUS = """USER: ASSISTANT: What is the colour of the shape? What color is it? How many shapes are there?
Where is the shape? left right top bottom center middle upper lower corner one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 red green blue yellow purple orange white black gray pink brown cyan magenta
circle square triangle star cross ring diamond hexagon ellipse rectangle
Identify the object in this image: What object can you spot in the picture? What type of object is in this photo?
Choose one from the following. Answer with the option's letter from the given choices directly. The answer is
Answer the question using a single word or phrase. Is there a in the image? Please answer yes or no. yes no
Context: Options: Hint: Question: Reference OCR token: A. B. C. D. E. a an the of in on at is are this that picture photo
image object class name label which what how many where there here it its and or not with from for to be""" + " " + SYSTEM_PROMPT


def tiny_tokenizer(vocab_size=512):
    """A byte-level BPE tokenizer trained in memory on a small built-in corpus (no network),
    with LLaMA's special tokens and LLaVA's <image> token."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")
    return fast


def tiny_llava(seed=0, **overrides):
    """A randomly initialised tiny LLaVA-1.5 and its processor, built from configs, offline.
    overrides: image_size, patch_size, vision_hidden, vision_layers, hidden, layers, heads,
    kv_heads, intermediate, vocab_size, max_positions."""
    o = dict(image_size=48, patch_size=8, vision_hidden=64, vision_layers=3, vision_heads=4,
             hidden=64, layers=6, heads=4, kv_heads=2, intermediate=172, vocab_size=512, max_positions=1024)
    unknown = set(overrides) - set(o)
    if unknown:
        raise TypeError(f"tiny_llava got unknown overrides {sorted(unknown)}; known: {sorted(o)}")
    o.update(overrides)
    tokenizer = tiny_tokenizer(o["vocab_size"])
    vision_config = CLIPVisionConfig(hidden_size=o["vision_hidden"], intermediate_size=4 * o["vision_hidden"],
                                     num_hidden_layers=o["vision_layers"], num_attention_heads=o["vision_heads"],
                                     image_size=o["image_size"], patch_size=o["patch_size"], projection_dim=o["vision_hidden"])
    text_config = LlamaConfig(hidden_size=o["hidden"], intermediate_size=o["intermediate"],
                              num_hidden_layers=o["layers"], num_attention_heads=o["heads"],
                              num_key_value_heads=o["kv_heads"], vocab_size=len(tokenizer),
                              max_position_embeddings=o["max_positions"], tie_word_embeddings=False,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": o["image_size"]},
                                            crop_size={"height": o["image_size"], "width": o["image_size"]},
                                            do_center_crop=True, do_resize=True, do_normalize=True,
                                            image_mean=[0.48145466, 0.4578275, 0.40821073],
                                            image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=o["patch_size"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def ensure_random_base(cache_dir):
    """The untrained tiny LLaVA (tiny_llava() as it comes, seed 0) saved as a base folder."""
    path = os.path.join(cache_dir, "tiny-random-base")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_folder_atomically(path, lambda tmp: save_tiny_base(*tiny_llava(), tmp))
    return path


# -----------------------------------------------------------------------------
# 2. synthetic data: coloured shapes, an ImageFolder of them and conversations about them

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20)}


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


SYNTHETIC_VERSION = 1


@dataclass
class SyntheticConfig:
    images_per_class: int = 60
    width: int = 64  # not square: exercises LLaVA's pad-to-square
    height: int = 48
    text_only: int = 40  # text-only conversations
    seed: int = 0

    def key(self):
        return f"synthetic-v{SYNTHETIC_VERSION}-{self.images_per_class}x{len(SHAPES)}-{self.width}x{self.height}-t{self.text_only}-s{self.seed}"


def shape_polygon(shape, cx, cy, r):
    """Points (or a box) of a shape centred at (cx, cy) with radius r."""
    if shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                 cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    return None


def draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "cross":
        w = max(2, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=fill)


def draw_scene(rng, shape, colour, count, position, width, height):
    """An image with `count` copies of a shape; for one copy, `position` is left/center/right."""
    background = tuple(rng.randrange(200, 245) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    r = rng.randrange(6, 9) if count > 1 else rng.randrange(8, 12)
    if count == 1:
        cx = {"left": width // 5, "center": width // 2, "right": width - width // 5}[position]
        xs = [cx + rng.randrange(-2, 3)]
    else:
        slot = width // count
        xs = [slot * i + slot // 2 + rng.randrange(-2, 3) for i in range(count)]
    for cx in xs:
        cy = height // 2 + rng.randrange(-height // 6, height // 6 + 1)
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    return image


def synthetic_conversation(rng, colour, count, position):
    """1-3 turns about colour, count and (for one shape) position, in random order."""
    qa = [("What is the colour of the shape?", colour),
          ("How many shapes are there?", NUMBERS[count])]
    if count == 1:
        qa.append(("Where is the shape?", position))
    rng.shuffle(qa)
    n_turns = rng.choice([1, 1, 2, 3])
    turns = []
    for q, a in qa[:n_turns]:
        turns += [q, a]
    turns[0] = IMAGE_TAG + "\n" + turns[0] if rng.random() < 0.5 else turns[0] + "\n" + IMAGE_TAG
    return turns


def text_only_conversation(rng):
    kind = rng.randrange(3)
    if kind == 0:
        word = rng.choice(SHAPES + list(COLOURS))
        return [f"Is {word} a colour or a shape?", "colour" if word in COLOURS else "shape"]
    if kind == 1:
        n = rng.randrange(0, 10)
        return [f"What number comes after {NUMBERS[n]}?", NUMBERS[n + 1]]
    a, b = rng.randrange(0, 5), rng.randrange(0, 5)
    return [f"How many are {NUMBERS[a]} and {NUMBERS[b]}?", NUMBERS[a + b]]


def to_llava_entry(sid, turns, image=None):
    entry = dict(id=sid, conversations=[dict(**{"from": "human" if i % 2 == 0 else "gpt"}, value=v)
                                        for i, v in enumerate(turns)])
    if image is not None:
        entry["image"] = image
    return entry


def build_synthetic(root, config: SyntheticConfig):
    """Draw the data set into root: train/<shape>/*.png (the ImageFolder), classnames.txt and
    conversations.json (LLaVA format, image paths relative to root)."""
    rng = random.Random(config.seed)
    entries = []
    for shape in SHAPES:
        os.makedirs(os.path.join(root, "train", shape), exist_ok=True)
        for i in range(config.images_per_class):
            colour = rng.choice(list(COLOURS))
            count = rng.choice([1, 1, 2, 3])
            position = rng.choice(["left", "center", "right"])
            image = draw_scene(rng, shape, colour, count, position, config.width, config.height)
            rel = f"train/{shape}/{i:04d}.png"
            image.save(os.path.join(root, rel))
            entries.append(to_llava_entry(f"{shape}-{i:04d}", synthetic_conversation(rng, colour, count, position), rel))
    for i in range(config.text_only):
        entries.append(to_llava_entry(f"text-{i:04d}", text_only_conversation(rng)))
    rng.shuffle(entries)
    with open(os.path.join(root, "classnames.txt"), "w") as f:  # one name per line, sorted class-dir order
        f.write("\n".join(sorted(SHAPES)) + "\n")
    with open(os.path.join(root, "conversations.json"), "w") as f:
        json.dump(entries, f, indent=1)


def ensure_synthetic(cache_dir, config: SyntheticConfig = None):
    """The synthetic data set's folder, drawn on first use (atomically: temp folder + rename)."""
    config = config or SyntheticConfig()
    root = os.path.join(cache_dir, config.key())
    if not os.path.isfile(os.path.join(root, "conversations.json")):
        os.makedirs(cache_dir, exist_ok=True)
        build_folder_atomically(root, lambda tmp: build_synthetic(tmp, config))
    return root


def synthetic_data_config(root, **overrides):
    """DataConfig for the synthetic data set in root; its packed json cache goes beside root (the
    tiny world's cache folder), not into the user's ~/.cache."""
    overrides = dict(dict(cache_dir=os.path.dirname(root)), **overrides)
    return DataConfig(llava_json=os.path.join(root, "conversations.json"), image_root=root, imagenet=root,
                      imagenet_classes=os.path.join(root, "classnames.txt"), **overrides)


# -----------------------------------------------------------------------------
# 3. the pre-stage: the tiny base LLaVA that --preset tiny starts from

# the pre-stage's settings; changing any of them changes the cache key, so a new base is trained
PRESTAGE = dict(vision_steps=1500, vision_batch=64, vision_lr=2e-3, vision_images=4000, steps=150, batch_size=16,
                lr=3e-3, warmup=15, projector_std=0.15, seed=0, version=5)


# the tiny base's architecture: patch 16 on 48 px = 9 image tokens (fast on CPU)
TINY_OVERRIDES = dict(patch_size=16)


def prestage_dir(cache_dir):
    settings = json.dumps(dict(PRESTAGE, overrides=TINY_OVERRIDES), sort_keys=True)
    key = f"v{PRESTAGE['version']}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"
    return os.path.join(cache_dir, f"tiny-base-{SyntheticConfig().key()}-{key}")


def draw_vision_pretraining_set(n, seed):
    """n synthetic scenes drawn in memory (not the training images) with their labels:
    -> (images, shape ids, colour ids, count ids)."""
    rng = random.Random(f"vision-{seed}")
    config = SyntheticConfig()
    images, labels = [], []
    for _ in range(n):
        shape, colour = rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS))
        count, position = rng.choice([1, 1, 2, 3]), rng.choice(["left", "center", "right"])
        images.append(draw_scene(rng, SHAPES[shape], list(COLOURS)[colour], count, position,
                                      config.width, config.height))
        labels.append((shape, colour, count - 1))
    return images, torch.tensor(labels)  # (n, 3)


def pretrain_tiny_vision(llava, processor):
    """Stands in for CLIP's pre-training: the tiny tower learns to tell the synthetic shapes,
    colours and counts apart (linear heads on the mean of the features the projector and CARPE's
    integrator read), on scenes drawn for it. Vision only, so it costs seconds.
    -> held-out shape accuracy of the linear head."""
    images, labels = draw_vision_pretraining_set(PRESTAGE["vision_images"], PRESTAGE["seed"])
    pixels = carpe.make_image_transform(processor)(images)  # (n, 3, H, W)
    n_eval = len(images) // 6
    tower = llava.model.vision_tower
    dim = llava.config.vision_config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in (len(SHAPES), len(COLOURS), 3))
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=PRESTAGE["vision_lr"], weight_decay=0.0)
    steps = PRESTAGE["vision_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps, steps // 10))
    generator = torch.Generator().manual_seed(PRESTAGE["seed"])
    tower.train()

    def logits(x):
        pooled = carpe.raw_vision_features(llava, x).mean(1)  # (n, Dv)
        return [head(pooled) for head in heads]

    for step in range(steps):
        idx = n_eval + torch.randint(len(images) - n_eval, (PRESTAGE["vision_batch"],), generator=generator)
        loss = sum(torch.nn.functional.cross_entropy(out, labels[idx, k]) for k, out in enumerate(logits(pixels[idx])))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    tower.eval()
    with torch.no_grad():
        shape_logits = logits(pixels[:n_eval])[0]
    return (shape_logits.argmax(-1) == labels[:n_eval, 0]).float().mean().item()


def centre_projector(llava, pixel_values):
    """Re-initialise the projector small and subtract its mean output over some images from
    linear_2's bias: a random projector on top of the tower otherwise emits one large vector
    shared by all images, whose image-specific part the LM's RMSNorm then erases."""
    projector = llava.model.multi_modal_projector
    with torch.no_grad():
        for linear in (projector.linear_1, projector.linear_2):
            torch.nn.init.normal_(linear.weight, std=PRESTAGE["projector_std"])
            torch.nn.init.zeros_(linear.bias)
        out = projector(carpe.raw_vision_features(llava, pixel_values))  # (n, P, d)
        projector.linear_2.bias -= out.mean((0, 1))


def train_tiny_lm(llava, processor, synthetic_root):
    """Stands in for LLaVA-1.5's instruction tuning: the tower and the (centred) projector frozen,
    the LM trained on the synthetic conversations. -> (losses, steps per epoch)."""
    # the conversations only, as LLaVA-1.5 itself never saw ImageNet prompts: the classification
    # share of the mix is what the method's training then adds (paper section 4.1)
    config = synthetic_data_config(synthetic_root, seed=PRESTAGE["seed"])
    config.imagenet = None
    dataset, _ = data.TrainDataset.from_config(config, processor)
    collator = data.Collator(processor.tokenizer.pad_token_id, carpe.make_image_transform(processor))
    centre_projector(llava, next(iter(data.make_loader(dataset, collator, 64, 64, 0, 1, 0)))["pixel_values"])
    frozen = ("model.vision_tower.", "model.multi_modal_projector.")
    lm_params = [p for n, p in llava.named_parameters() if not n.startswith(frozen)]
    for n, p in llava.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    llava.train()
    optimizer = torch.optim.AdamW(lm_params, lr=PRESTAGE["lr"], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(PRESTAGE["steps"], PRESTAGE["warmup"]))
    batch = PRESTAGE["batch_size"]
    bar = tqdm(range(PRESTAGE["steps"]), desc="tiny base pre-stage", disable=int(os.environ.get("RANK", "0")) != 0)
    batches, epoch, losses = iter(()), -1, []
    for step in bar:
        # a fixed number of steps over as many epochs as it takes, each epoch in a new seeded order
        b = next(batches, None)
        if b is None:
            epoch += 1
            batches = iter(data.make_loader(dataset, collator, batch, batch, 0, 1, epoch))
            b = next(batches)
        # plain HF LLaVA loss: this is vanilla LLaVA training, no CARPE module exists yet
        out = llava(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(lm_params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    llava.eval()
    for p in llava.parameters():  # a base comes with every parameter trainable, as from_pretrained gives it
        p.requires_grad_(True)
    return losses, len(dataset) // batch


def train_tiny_base(synthetic_root, out_dir):
    """The pre-stage: (1) pre-train the tiny vision tower on labelled synthetic scenes, as CLIP
    comes pre-trained; (2) freeze it and its (centred) projector and train the LM on the
    synthetic conversations (vanilla LLaVA), so the base the method wraps already answers them.
    Single process; saved atomically with prestage.json (its settings and losses)."""
    t0 = time.time()
    torch.manual_seed(PRESTAGE["seed"])
    llava, processor = tiny_llava(seed=PRESTAGE["seed"], **TINY_OVERRIDES)
    vision_accuracy = pretrain_tiny_vision(llava, processor)
    print0(f"tiny base pre-stage: vision tower pre-trained in {time.time() - t0:.0f}s, "
           f"held-out shape accuracy of its linear head {vision_accuracy:.2f}")
    losses, steps_per_epoch = train_tiny_lm(llava, processor, synthetic_root)
    final_loss = sum(losses[-10:]) / 10

    def save(tmp):
        save_tiny_base(llava, processor, tmp)
        with open(os.path.join(tmp, "prestage.json"), "w") as f:
            json.dump(dict(PRESTAGE, vision_shape_accuracy=vision_accuracy, first_loss=losses[0], final_loss=final_loss,
                           steps_per_epoch=steps_per_epoch, seconds=time.time() - t0), f, indent=2)
    build_folder_atomically(out_dir, save)
    print0(f"tiny base pre-stage: loss {losses[0]:.3f} -> {final_loss:.3f} in {PRESTAGE['steps']} steps "
           f"({time.time() - t0:.0f}s in all); saved to {out_dir}")


@dataclass
class TinyWorld:
    base: str  # the pre-trained tiny base LLaVA (a Hugging Face folder)
    synthetic: str  # the synthetic data set: train/<shape>/*.png, classnames.txt, conversations.json


def tiny_world(cache_dir):
    """Where the tiny world lives under cache_dir (whether or not it is built yet)."""
    return TinyWorld(base=prestage_dir(cache_dir), synthetic=os.path.join(cache_dir, SyntheticConfig().key()))


def ensure_tiny_world(cache_dir):
    """Draw the synthetic data and train the tiny base on first use. Single process: under
    torchrun, rank 0 calls this while the others wait."""
    world = tiny_world(cache_dir)
    ensure_synthetic(cache_dir)
    if not os.path.isfile(os.path.join(world.base, "config.json")):
        train_tiny_base(world.synthetic, world.base)
    return world


def tiny_default_base(cache_dir):
    """eval.py --preset tiny without --base: the cached pre-stage base when train.py has built it
    (a tiny LLaVA trained on the synthetic data, so 'vanilla LLaVA' rows are meaningful), else the
    untrained tiny LLaVA."""
    path = prestage_dir(cache_dir)
    return path if os.path.isfile(os.path.join(path, "config.json")) else ensure_random_base(cache_dir)


# -----------------------------------------------------------------------------
# 4. tiny benchmarks: a few synthetic items in each benchmark's release layout

TINY_CLASSIFICATION = (("imagenet", "val"), ("caltech101", "test"), ("flowers102", "test"), ("food101", "test"))


class SceneWriter:
    """One seeded stream of synthetic scenes and the files they go into under `root`. Every
    benchmark below draws from the same stream in a fixed order, so a seed fixes all files."""

    def __init__(self, root, seed):
        self.root, self.rng = root, random.Random(seed)
        self.shapes, self.colours = sorted(SHAPES), list(COLOURS)

    def scene(self, shape=None, colour=None, count=None):
        """-> (image, shape, colour, count); what is not given is drawn."""
        rng = self.rng
        shape, colour = shape or rng.choice(self.shapes), colour or rng.choice(self.colours)
        count = count or rng.choice([1, 1, 2, 3])
        image = draw_scene(rng, shape, colour, count, rng.choice(["left", "center", "right"]), 64, 48)
        return image, shape, colour, count

    def path(self, *parts):
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def save_image(self, image, *parts):
        image.save(self.path(*parts))

    def write_json(self, obj, *parts):
        with open(self.path(*parts), "w") as f:
            json.dump(obj, f)

    def write_jsonl(self, rows, *parts):
        with open(self.path(*parts), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def other(self, choices, than):
        """A random choice that differs from `than` (a distractor)."""
        return self.rng.choice([c for c in choices if c != than])


def draw_tiny_classification(w, bench, split, per_class):
    """An ImageFolder split (<bench>/<split>/<shape>/NNN.png) + classnames.txt."""
    for shape in w.shapes:
        for i in range(per_class):
            w.save_image(w.scene(shape)[0], bench, split, shape, f"{i:03d}.png")
    with open(w.path(bench, "classnames.txt"), "w") as f:
        f.write("\n".join(w.shapes) + "\n")


def draw_tiny_sqa(w, n):
    """ScienceQA as LLaVA ships it: llava_test_CQM-A.json (one text-only item, which SQA-IMG skips),
    images/test/<id>/image.png, and problems.json with the answer index."""
    questions, problems = [], {}
    for i in range(n):
        image, _, colour, _ = w.scene()
        options = [colour] + w.rng.sample([c for c in w.colours if c != colour], 2)
        w.rng.shuffle(options)
        qid = str(1000 + i)
        w.save_image(image, "scienceqa", "images", "test", qid, "image.png")
        text = "Context: The picture shows a shape.\nWhat is the colour of the shape?\n" + \
            "\n".join(f"{L}. {o}" for L, o in zip("ABC", options))
        questions.append(dict(id=qid, image=f"{qid}/image.png", conversations=[
            {"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": "ABC"[options.index(colour)]}]))
        problems[qid] = dict(answer=options.index(colour), choices=options)
    questions.append(dict(id="9999", conversations=[{"from": "human", "value": "Which is a shape?\nA. circle\nB. red"},
                                                    {"from": "gpt", "value": "A"}]))
    w.write_json(questions, "scienceqa", "llava_test_CQM-A.json")
    w.write_json(problems, "scienceqa", "problems.json")


def draw_tiny_textvqa(w, n):
    """TextVQA: LLaVA's question jsonl (question, OCR tokens, instruction) + the official
    annotation json with 10 human answers per question."""
    lines, annotations = [], []
    for i in range(n):
        image, shape, colour, _ = w.scene()
        image_id = f"{i:016x}"
        w.save_image(image, "textvqa", "train_images", f"{image_id}.jpg")
        question = "what is the colour of the shape?"
        lines.append(dict(question_id=image_id, image=f"{image_id}.jpg", category="default",
                          text=f"{question}\nReference OCR token: {colour}, {shape}\n{SHORT_ANSWER}"))
        annotations.append(dict(question_id=100 + i, image_id=image_id, question=question, answers=[colour] * 8 + [shape] * 2))
    w.write_jsonl(lines, "textvqa", "llava_textvqa_val_v051_ocr.jsonl")
    w.write_json(dict(dataset_name="textvqa", data=annotations), "textvqa", "TextVQA_0.5.1_val.json")


def draw_tiny_pope(w, n):
    """POPE: three splits of yes/no object questions over "COCO val2014" images."""
    for split in POPE_SPLITS:
        rows = []
        for i in range(n // 2):
            image, shape, _, _ = w.scene()
            name = f"COCO_val2014_{split[:3]}{i:09d}.jpg"
            w.save_image(image, "pope", "val2014", name)
            other = w.other(w.shapes, shape)
            rows.append(dict(question_id=2 * i + 1, image=name, text=f"Is there a {shape} in the image?", label="yes"))
            rows.append(dict(question_id=2 * i + 2, image=name, text=f"Is there a {other} in the image?", label="no"))
        w.write_jsonl(rows, "pope", "coco", f"coco_pope_{split}.json")


def draw_tiny_mme(w):
    """MME: every subtask, one image with a yes and a no question, in the release's two layouts
    (images beside their .txt, or images/ + questions_answers_YN/)."""
    release = os.path.join("MME", "MME_Benchmark_release_version")
    for subtask in MME_PERCEPTION + MME_COGNITION:
        image, shape, _, _ = w.scene()
        other = w.other(w.shapes, shape)
        split_layout = subtask in ("artwork", "celebrity", "landmark", "posters", "scene")
        w.save_image(image, release, subtask, *(["images"] if split_layout else []), "0001.png")
        with open(w.path(release, subtask, *(["questions_answers_YN"] if split_layout else []), "0001.txt"), "w") as f:
            f.write(f"Is there a {shape} in the image? Please answer yes or no.\tYes\n"
                    f"Is there a {other} in the image? Please answer yes or no.\tNo\n")


def draw_tiny_mmbench(w, n):
    """MMBench: the dev TSV with base64 images and its circular copies (index + k * 1e6, whose
    image cell names the original row)."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    rows = []
    for i in range(n // 2):
        image, shape, _, _ = w.scene()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        options = [shape] + w.rng.sample([s for s in w.shapes if s != shape], 2)
        for k in range(3):  # the rotations, as the circular copies in the dev TSV
            rot = options[k:] + options[:k]
            rows.append([str(i + k * 1_000_000), "Which shape is in the image?", "" if i % 2 else "A synthetic picture.",
                         *rot, "", "ABC"[rot.index(shape)], "shape", b64 if k == 0 else str(i), "synthetic", "shape",
                         "", "dev"])
    with open(w.path("mmbench", "mmbench_dev_20230712.tsv"), "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def draw_tiny_cvbench(w, n):
    """CV-Bench: test_2d.jsonl (ADE20K, COCO) + test_3d.jsonl (Omni3D) + img/, counting questions."""
    for kind, sources in (("2D", ("ADE20K", "COCO")), ("3D", ("Omni3D",))):
        rows = []
        for i in range(n // 2):
            image, _, _, count = w.scene()
            choices = ["1", "2", "3", "4"]
            filename = f"img/{kind}/count/{i:03d}.png"
            w.save_image(image, "cvbench", filename)
            prompt = "How many shapes are in the image? Select from the following choices.\n" + \
                "\n".join(f"({L}) {c}" for L, c in zip("ABCD", choices))
            rows.append(dict(idx=i, type=kind, task="Count", question="How many shapes are in the image?",
                             choices=choices, answer=f"({'ABCD'[count - 1]})", prompt=prompt, filename=filename,
                             source=sources[i % len(sources)]))
        w.write_jsonl(rows, "cvbench", f"test_{kind.lower()}.jsonl")


def draw_tiny_mmvp(w):
    """MMVP: Questions.csv (its first column spelled "lndex", as released) + "MMVP Images/<index>.jpg",
    two pairs of colour questions."""
    with open(w.path("MMVP", "Questions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lndex", "Question", "Options", "Correct Answer"])
        for i in range(1, 5):
            image, _, colour, _ = w.scene()
            other = w.other(w.colours, colour)
            options = [colour, other] if i % 2 else [other, colour]
            w.save_image(image, "MMVP", "MMVP Images", f"{i}.jpg")
            writer.writerow([i, "What is the colour of the shape?", f"(a) {options[0]} (b) {options[1]}",
                             "(a)" if options[0] == colour else "(b)"])


def build_tiny_benchmarks(root, seed=0, per_class=4, n_vl=6):
    """Write every benchmark's layout under root (which must not exist, or be empty) with a few
    synthetic items each: per_class images per shape for the classifiers, about n_vl items for
    the others. Built in a temporary folder and renamed: root is complete or absent. -> root."""
    def draw(tmp):
        w = SceneWriter(tmp, seed)
        for bench, split in TINY_CLASSIFICATION:
            draw_tiny_classification(w, bench, split, per_class)
        draw_tiny_sqa(w, n_vl)
        draw_tiny_textvqa(w, n_vl)
        draw_tiny_pope(w, n_vl)
        draw_tiny_mme(w)
        draw_tiny_mmbench(w, n_vl)
        draw_tiny_cvbench(w, n_vl)
        draw_tiny_mmvp(w)
    return build_folder_atomically(root, draw)


# -----------------------------------------------------------------------------
# 5. a tiny CARPE-MoE expert set

def tiny_moe_config():
    """Four tiny random experts of different families and different patch grids: clip = the base
    tower (tiny_llava's 6x6; the pre-stage base's 3x3 with TINY_OVERRIDES), siglip 7x7, dinov2 10x10,
    cumo 9x9, each pooled to the base grid."""
    return MoEConfig(experts=[
        ExpertConfig("clip", "base_clip", "", 48, CLIP_MEAN, CLIP_STD, -2, True),
        ExpertConfig("siglip", "siglip", "", 56, SIGLIP_MEAN, SIGLIP_STD, -2, False,
                     tiny=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=56, patch_size=8)),
        ExpertConfig("dinov2", "dinov2", "", 40, IMAGENET_MEAN, IMAGENET_STD, -2, True,
                     tiny=dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                               image_size=40, patch_size=4)),
        ExpertConfig("cumo", "clip_moe", "", 36, CLIP_MEAN, CLIP_STD, -2, True,
                     tiny=dict(hidden_size=40, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                               image_size=36, patch_size=4, hidden_act="quick_gelu")),
    ])
