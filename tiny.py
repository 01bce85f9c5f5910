"""
tiny.py: the offline tiny world of `--preset tiny`, used by train.py, eval.py, bench.py and the tests.
"""
import base64
import csv
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
from benchmarks import CLS_BENCHES, MME_COGNITION, MME_PERCEPTION, POPE_SPLITS, SHORT_ANSWER
from common import cosine_schedule, print0
from data import IMAGE_TAG, SYSTEM_PROMPT, DataConfig
from moe import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, ExpertConfig, MoEConfig



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
    if os.path.isfile(os.path.join(root, "conversations.json")):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{root}.tmp{os.getpid()}"
    build_synthetic(tmp, config)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def synthetic_data_config(root, **overrides):
    """DataConfig for the synthetic data set in root."""
    return DataConfig(llava_json=os.path.join(root, "conversations.json"), image_root=root, imagenet=root,
                      imagenet_classes=os.path.join(root, "classnames.txt"), **overrides)


# the tiny pre-stage (vanilla LLaVA on the synthetic data); changing these changes the cache key
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


def train_tiny_base(synthetic_root, out_dir):
    """The pre-stage: (1) pre-train the tiny vision tower on labelled synthetic scenes, as CLIP
    comes pre-trained; (2) freeze it and its (centred) projector and train the LM on the
    synthetic conversations (vanilla LLaVA), so the base the method wraps already answers them.
    Single process; saved atomically."""
    t0 = time.time()
    torch.manual_seed(PRESTAGE["seed"])
    llava, processor = tiny_llava(seed=PRESTAGE["seed"], **TINY_OVERRIDES)
    vision_accuracy = pretrain_tiny_vision(llava, processor)
    print0(f"tiny base pre-stage: vision tower pre-trained in {time.time() - t0:.0f}s, "
           f"held-out shape accuracy of its linear head {vision_accuracy:.2f}")
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
    steps_per_epoch = len(dataset) // batch
    bar = tqdm(range(PRESTAGE["steps"]), desc="tiny base pre-stage", disable=int(os.environ.get("RANK", "0")) != 0)
    batches, epoch, losses = iter(()), -1, []
    for step in bar:
        b = next(batches, None)
        if b is None:
            epoch += 1
            batches = iter(data.make_loader(dataset, collator, batch, batch, 0, 1, epoch))
            b = next(batches)
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
    for p in llava.parameters():
        p.requires_grad_(True)
    tmp = f"{out_dir}.tmp{os.getpid()}"
    save_tiny_base(llava, processor, tmp)
    with open(os.path.join(tmp, "prestage.json"), "w") as f:
        json.dump(dict(PRESTAGE, vision_shape_accuracy=vision_accuracy, first_loss=losses[0],
                       final_loss=sum(losses[-10:]) / 10, steps_per_epoch=steps_per_epoch,
                       seconds=time.time() - t0), f, indent=2)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process (e.g. a concurrent run) finished the same pre-stage first
        shutil.rmtree(tmp, ignore_errors=True)
    print0(f"tiny base pre-stage: loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} in {PRESTAGE['steps']} steps "
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


def build_tiny_benchmarks(root, seed=0, per_class=4, n_vl=6):
    """Write every benchmark's layout under root with a few synthetic items each."""
    rng = random.Random(seed)
    shapes, colours = sorted(SHAPES), list(COLOURS)
    positions = ["left", "center", "right"]

    def scene(shape=None, colour=None, count=None):
        shape, colour = shape or rng.choice(shapes), colour or rng.choice(colours)
        count = count or rng.choice([1, 1, 2, 3])
        image = draw_scene(rng, shape, colour, count, rng.choice(positions), 64, 48)
        return image, shape, colour, count

    def save(image, *parts):
        path = os.path.join(root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
        return path

    def write(lines_or_obj, *parts, jsonl=False):
        path = os.path.join(root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            if jsonl:
                f.writelines(json.dumps(x) + "\n" for x in lines_or_obj)
            else:
                json.dump(lines_or_obj, f)

    # classification: ImageFolder split + classnames.txt (imagenet uses val/, the others test/)
    for bench in CLS_BENCHES:
        split = "val" if bench == "imagenet" else "test"
        for shape in shapes:
            for i in range(per_class):
                save(scene(shape)[0], bench, split, shape, f"{i:03d}.png")
        with open(os.path.join(root, bench, "classnames.txt"), "w") as f:
            f.write("\n".join(shapes) + "\n")
    # ScienceQA: LLaVA's CQM-A json (one text-only item, which SQA-IMG skips) + problems.json
    sqa, problems = [], {}
    for i in range(n_vl):
        image, shape, colour, _ = scene()
        options = [colour] + rng.sample([c for c in colours if c != colour], 2)
        rng.shuffle(options)
        qid = str(1000 + i)
        save(image, "scienceqa", "images", "test", qid, "image.png")
        text = "Context: The picture shows a shape.\nWhat is the colour of the shape?\n" + \
            "\n".join(f"{L}. {o}" for L, o in zip("ABC", options))
        gt = "ABC"[options.index(colour)]
        sqa.append(dict(id=qid, image=f"{qid}/image.png", conversations=[
            {"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": gt}]))
        problems[qid] = dict(answer=options.index(colour), choices=options)
    sqa.append(dict(id="9999", conversations=[{"from": "human", "value": "Which is a shape?\nA. circle\nB. red"},
                                              {"from": "gpt", "value": "A"}]))
    write(sqa, "scienceqa", "llava_test_CQM-A.json")
    write(problems, "scienceqa", "problems.json")
    # TextVQA: LLaVA's jsonl (question, OCR tokens, instruction) + the official annotation json
    lines, annotations = [], []
    for i in range(n_vl):
        image, shape, colour, _ = scene()
        image_id = f"{i:016x}"
        save(image, "textvqa", "train_images", f"{image_id}.jpg")
        question = "what is the colour of the shape?"
        lines.append(dict(question_id=image_id, image=f"{image_id}.jpg", category="default",
                          text=f"{question}\nReference OCR token: {colour}, {shape}\n{SHORT_ANSWER}"))
        annotations.append(dict(question_id=100 + i, image_id=image_id, question=question, answers=[colour] * 8 + [shape] * 2))
    write(lines, "textvqa", "llava_textvqa_val_v051_ocr.jsonl", jsonl=True)
    write(dict(dataset_name="textvqa", data=annotations), "textvqa", "TextVQA_0.5.1_val.json")
    # POPE: three splits of yes/no object questions over "COCO" images
    for split in POPE_SPLITS:
        rows = []
        for i in range(n_vl // 2):
            image, shape, _, _ = scene()
            name = f"COCO_val2014_{split[:3]}{i:09d}.jpg"
            save(image, "pope", "val2014", name)
            other = rng.choice([s for s in shapes if s != shape])
            rows.append(dict(question_id=2 * i + 1, image=name, text=f"Is there a {shape} in the image?", label="yes"))
            rows.append(dict(question_id=2 * i + 2, image=name, text=f"Is there a {other} in the image?", label="no"))
        write(rows, "pope", "coco", f"coco_pope_{split}.json", jsonl=True)
    # MME: every subtask, one image with a yes and a no question (two layouts, as released)
    for subtask in MME_PERCEPTION + MME_COGNITION:
        image, shape, _, _ = scene()
        other = rng.choice([s for s in shapes if s != shape])
        split_layout = subtask in ("artwork", "celebrity", "landmark", "posters", "scene")
        image_dir = os.path.join("MME", "MME_Benchmark_release_version", subtask, *(["images"] if split_layout else []))
        txt_dir = os.path.join("MME", "MME_Benchmark_release_version", subtask, *(["questions_answers_YN"] if split_layout else []))
        save(image, image_dir, "0001.png")
        os.makedirs(os.path.join(root, txt_dir), exist_ok=True)
        with open(os.path.join(root, txt_dir, "0001.txt"), "w") as f:
            f.write(f"Is there a {shape} in the image? Please answer yes or no.\tYes\n"
                    f"Is there a {other} in the image? Please answer yes or no.\tNo\n")
    # MMBench: the dev TSV with base64 images and circular copies (index + k * 1e6)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    rows = []
    for i in range(n_vl // 2):
        image, shape, _, _ = scene()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        options = [shape] + rng.sample([s for s in shapes if s != shape], 2)
        for k in range(3):  # rotations, as the circular copies in the dev TSV
            rot = options[k:] + options[:k]
            rows.append([str(i + k * 1_000_000), "Which shape is in the image?", "" if i % 2 else "A synthetic picture.",
                         *rot, "", "ABC"[rot.index(shape)], "shape", b64 if k == 0 else str(i), "synthetic", "shape",
                         "", "dev"])
    os.makedirs(os.path.join(root, "mmbench"), exist_ok=True)
    with open(os.path.join(root, "mmbench", "mmbench_dev_20230712.tsv"), "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    # CV-Bench: test_2d.jsonl (ADE20K, COCO) + test_3d.jsonl (Omni3D) + img/
    for kind, sources in (("2D", ("ADE20K", "COCO")), ("3D", ("Omni3D",))):
        rows = []
        for i in range(n_vl // 2):
            image, _, _, count = scene()
            choices = ["1", "2", "3", "4"]
            filename = f"img/{kind}/count/{i:03d}.png"
            save(image, "cvbench", filename)
            prompt = "How many shapes are in the image? Select from the following choices.\n" + \
                "\n".join(f"({L}) {c}" for L, c in zip("ABCD", choices))
            rows.append(dict(idx=i, type=kind, task="Count", question="How many shapes are in the image?",
                             choices=choices, answer=f"({'ABCD'[count - 1]})", prompt=prompt, filename=filename,
                             source=sources[i % len(sources)]))
        write(rows, "cvbench", f"test_{kind.lower()}.jsonl", jsonl=True)
    # MMVP: Questions.csv (first column spelled "lndex" as released) + "MMVP Images/<index>.jpg", in pairs
    os.makedirs(os.path.join(root, "MMVP", "MMVP Images"), exist_ok=True)
    with open(os.path.join(root, "MMVP", "Questions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lndex", "Question", "Options", "Correct Answer"])
        for i in range(1, 5):
            image, _, colour, _ = scene()
            other = rng.choice([c for c in colours if c != colour])
            options = [colour, other] if i % 2 else [other, colour]
            save(image, "MMVP", "MMVP Images", f"{i}.jpg")
            w.writerow([i, "What is the colour of the shape?", f"(a) {options[0]} (b) {options[1]}",
                        "(a)" if options[0] == colour else "(b)"])
    return root


def ensure_random_base(cache_dir):
    """The untrained tiny LLaVA (tiny_llava() as it comes, seed 0) saved as a base folder."""
    path = os.path.join(cache_dir, "tiny-random-base")
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = f"{path}.tmp{os.getpid()}"
        save_tiny_base(*tiny_llava(), tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_default_base(cache_dir):
    """eval.py --preset tiny without --base: the cached pre-stage base when train.py has built it
    (a tiny LLaVA trained on the synthetic data, so 'vanilla LLaVA' rows are meaningful), else the
    untrained tiny LLaVA."""
    path = prestage_dir(cache_dir)
    return path if os.path.isfile(os.path.join(path, "config.json")) else ensure_random_base(cache_dir)


def tiny_moe_config():
    """Four tiny random experts of different families and different patch grids (the base
    carpe.tiny_llava grid is 6x6): clip = the base tower (6x6), siglip 7x7, dinov2 10x10, cumo 9x9."""
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
