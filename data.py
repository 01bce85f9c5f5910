"""
data.py: the training data of CARPE (paper section 4.1; ../shared/DESIGN.md section 4).

 - LLaVA-Instruct (`llava_v1_5_mix665k.json`): entries {id, image?, conversations: [{from, value}]},
   images under an image root, text-only entries allowed. Formatted with LLaVA's vicuna_v1 template
   and label-masked so that only the assistant answers and their </s> are supervised.
 - ImageNet-style classification: an ImageFolder `<root>/train/<class_dir>/*` plus a class-name
   file; one of 20 prompt templates per sample, 50% open world, 50% closed world (k shuffled
   candidates); the answer is the class name.
 - The interleaved mix (ImageNet : LLaVA = 1 : 7), a deterministic shard per rank, resumable from
   a sample position.
 - A collate that right-pads, builds the attention mask and labels, and turns the images into
   pixel_values through an `image_transform` (a tensor, or a dict of tensors for CARPE-MoE).
 - The deterministic synthetic data set of `--preset tiny` (coloured shapes drawn with Pillow).

Choices where the paper and LLaVA leave room (also in the README):
 - Template, exactly as LLaVA's conv_vicuna_v1 renders it:
       "<s>SYSTEM USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
   (a space between the system text and each USER turn and before ASSISTANT; an assistant turn
   ends in </s> with nothing after it, as LLaVA's sep2). The text is tokenized segment by
   segment (prompt parts unsupervised, each " answer" + </s> supervised) and the ids are
   concatenated, so the mask is exact with any tokenizer. A tokenizer that adds its own prefix
   space (SentencePiece "▁") gets the answer without the leading space.
 - `<image>` is moved to the start of its turn followed by "\\n" (LLaVA's preprocess_multimodal)
   and expanded to the P image tokens the processor uses. An entry with an image needs exactly
   one `<image>` tag, an entry without one none (else an error naming the entry).
 - A conversation must alternate human/gpt starting with human and end with a gpt turn.
 - Entries are checked once, before training (structure, image file present and readable);
   with skip_bad_samples they are dropped and counted, else the first problems are raised
   with the entry ids. A file that exists but cannot be decoded fails in the loader with its
   entry id and path (decoding every image up front would cost an epoch's worth of IO).
 - Longer than model_max_length: cut at the end and counted (the collate reports it, train.py
   logs it). A cut that would remove image tokens is an error naming the entry.
 - The mix: each epoch holds every LLaVA entry once plus round(n_llava * a / b) ImageNet
   images (a:b = 1:7), taken from a seeded permutation of ImageNet that continues across epochs
   (epoch 2 sees other images than epoch 1); the union is shuffled with a seed from (seed, epoch).
   Without LLaVA data (method imagenet-ft) an epoch is every ImageNet image once.
 - Sharding: global position p of an epoch belongs to step p // global_batch; within a step
   each rank reads a contiguous block of global_batch / world positions. A resume starts at a
   position, so any world size can continue a run.
 - The classification prompt of a sample (template, open/closed, candidates) is drawn from a
   RNG keyed by (seed, epoch, position): deterministic in any worker or rank.
 - Closed world: `<template> Choose one from "<c1>, <c2>, ...".` with k candidates (true + k-1
   random others, shuffled); the same wording as eval.py's closed-world prompt.
 - Records are stored packed in one numpy byte buffer (no per-entry Python objects), so
   DataLoader workers do not copy the 665K-entry JSON through reference counting.
 - No grouping by modality/length (LLaVA's group_by_modality_length): batches are small
   relative to the data and the padding cost is modest; left as a possible speed-up.
"""
import json
import os
import random
from dataclasses import dataclass, asdict

import numpy as np
import torch

from kernels import IGNORE_INDEX


IMAGE_TAG = "<image>"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# 20 classification prompts; the first two are the paper's (section 4.1)
CLASSIFICATION_TEMPLATES = [
    "Identify the object in this image:",
    "What object can you spot in the picture?",
    "What is the main object in this image?",
    "What type of object is in this photo?",
    "Name the object shown in the picture.",
    "What is shown in this image?",
    "Which object does this photo show?",
    "What is the object in the picture?",
    "Tell me what object appears in this image.",
    "What can be seen in this photo?",
    "Classify the object in this image.",
    "What is this a picture of?",
    "Which category does the object in this image belong to?",
    "What do you see in this image?",
    "Name the main subject of this photo.",
    "What kind of object is this?",
    "Recognize the object in the picture:",
    "What is depicted in this image?",
    "Give the name of the object in this photo.",
    "What is the object in this image called?",
]


def vicuna_prompt(question: str, has_image: bool) -> str:
    """A one-turn vicuna_v1 prompt ending in "ASSISTANT:", for generation. The tokenizer adds <s>."""
    image = IMAGE_TAG + "\n" if has_image else ""
    return f"{SYSTEM_PROMPT} USER: {image}{question} ASSISTANT:"


def closed_world_question(template: str, candidates) -> str:
    return f'{template} Choose one from "{", ".join(candidates)}".'


@dataclass
class DataConfig:
    llava_json: str | None = None  # llava_v1_5_mix665k.json (None: no instruction data)
    image_root: str | None = None  # folder the entries' "image" paths are relative to
    imagenet: str | None = None  # ImageFolder root holding train/<class_dir>/*
    imagenet_classes: str | None = None  # class-name file (default <imagenet>/classnames.txt)
    mix: tuple = (1, 7)  # ImageNet : LLaVA samples per epoch
    closed_k: int = 10  # candidates listed in a closed-world classification prompt
    model_max_length: int = 2048  # longer samples are cut (and counted)
    skip_bad_samples: bool = False  # drop (and count) bad entries instead of failing
    seed: int = 0

    def to_dict(self):
        return asdict(self)


class BadSampleError(ValueError):
    """Bad input data; the message names the entry id, file or flag."""


# -----------------------------------------------------------------------------
# packed records: one byte buffer + offsets, no per-record Python objects in the workers

class PackedRecords:
    def __init__(self, records):
        blobs = [json.dumps(r, ensure_ascii=False).encode() for r in records]
        self.offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return json.loads(self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes())


# -----------------------------------------------------------------------------
# LLaVA-Instruct

def check_conversation(entry, image_root):
    """Problems of one LLaVA entry as a list of strings (empty = good). Returns (problems, record)."""
    sid = entry.get("id", "<no id>") if isinstance(entry, dict) else "<not an object>"
    if not isinstance(entry, dict):
        return [f"entry is not a JSON object"], None
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        return ["'conversations' is missing or empty"], None
    problems = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(f"turn {t} is not {{'from': ..., 'value': str}}")
            continue
        role = turn.get("from")
        if role not in ("human", "gpt"):
            problems.append(f"turn {t} has unknown 'from' {role!r} (expected 'human' or 'gpt')")
        elif role != ("human" if t % 2 == 0 else "gpt"):
            problems.append(f"turn {t} is from {role!r}: roles must alternate human, gpt, ... starting with human")
    if problems:
        return problems, None
    if conv[-1]["from"] != "gpt":
        return ["the conversation does not end with a gpt turn (nothing to supervise)"], None
    n_tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv)
    n_gpt_tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv if turn["from"] == "gpt")
    image = entry.get("image")
    if image is not None:
        if not isinstance(image, str):
            return [f"'image' must be one path (multi-image entries are not supported), got {type(image).__name__}"], None
        if n_tags != 1 or n_gpt_tags:
            return [f"has an image but {n_tags} {IMAGE_TAG} tags ({n_gpt_tags} in gpt turns); expected exactly one in a human turn"], None
        path = os.path.join(image_root or "", image)
        if not os.path.isfile(path):
            return [f"image file {path} does not exist"], None
        if not os.access(path, os.R_OK) or os.path.getsize(path) == 0:
            return [f"image file {path} is empty or unreadable"], None
    elif n_tags:
        return [f"has no 'image' but {n_tags} {IMAGE_TAG} tag(s)"], None
    record = dict(id=str(sid), image=image, turns=[turn["value"] for turn in conv])
    return [], record


def load_llava_json(path, image_root, skip_bad_samples=False):
    """Read the LLaVA-Instruct JSON once and check every entry.
    -> (PackedRecords of {id, image, turns}, number of skipped entries)."""
    if not os.path.isfile(path):
        raise BadSampleError(f"--data {path}: file not found")
    if image_root is not None and not os.path.isdir(image_root):
        raise BadSampleError(f"--image-root {image_root}: not a directory")
    with open(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise BadSampleError(f"--data {path}: not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise BadSampleError(f"--data {path}: expected a JSON list of entries, got {type(entries).__name__}")
    records, bad = [], []
    for i, entry in enumerate(entries):
        problems, record = check_conversation(entry, image_root)
        if problems:
            sid = entry.get("id", "<no id>") if isinstance(entry, dict) else "<not an object>"
            bad.append(f"entry {i} (id {sid}): {'; '.join(problems)}")
        else:
            records.append(record)
    if bad and not skip_bad_samples:
        shown = "\n  ".join(bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise BadSampleError(f"{path}: {len(bad)} bad entries (use --skip-bad-samples to drop and count them):\n  {shown}{more}")
    return PackedRecords(records), len(bad)


def move_image_tag_first(text):
    """LLaVA: the <image> tag goes to the start of its turn, followed by a newline."""
    if IMAGE_TAG not in text:
        return text
    return IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()


def tokenizer_adds_prefix_space(tokenizer):
    """True for SentencePiece-style tokenizers whose encoding of "a" already starts with a space."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[:1])[0].startswith("\u2581")


TEMPLATES = ("vicuna_v1", "chat")


class ConversationTokenizer:
    """vicuna_v1 formatting + label masking, tokenized segment by segment."""

    def __init__(self, tokenizer, n_image_tokens, image_token_id, model_max_length=2048, template="vicuna_v1"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {template!r}; expected one of {TEMPLATES}")
        self.template = template
        self.tokenizer = tokenizer
        self.n_image_tokens = n_image_tokens
        self.image_token_id = image_token_id
        self.model_max_length = model_max_length
        self.answer_space = "" if tokenizer_adds_prefix_space(tokenizer) else " "

    def encode(self, text):
        """Text ids without special tokens; <image> becomes the P image tokens."""
        ids = []
        for i, piece in enumerate(text.split(IMAGE_TAG)):
            if i > 0:
                ids += [self.image_token_id] * self.n_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def encode_prompt(self, question, has_image=True):
        """The generation prompt of a one-turn conversation: ids incl. BOS up to and including the
        assistant's cue ("ASSISTANT:" for vicuna_v1), exactly what training gives for that user turn."""
        if self.template == "chat":
            content = IMAGE_TAG + "\n" + question if has_image else question
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.encode(text)
        return [self.tokenizer.bos_token_id] + self.encode(vicuna_prompt(question, has_image))

    def __call__(self, turns, sample_id="?"):
        """turns: [human, gpt, human, gpt, ...] texts. -> (input_ids, labels, truncated)."""
        ids = [self.tokenizer.bos_token_id]
        labels = [IGNORE_INDEX]
        for t in range(0, len(turns), 2):
            question = move_image_tag_first(turns[t])
            prompt = (SYSTEM_PROMPT + " " if t == 0 else "") + f"USER: {question} ASSISTANT:"
            prompt_ids = self.encode(prompt)
            answer_ids = self.encode(self.answer_space + turns[t + 1].strip()) + [self.tokenizer.eos_token_id]
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        truncated = len(ids) > self.model_max_length
        if truncated:
            n_images = ids.count(self.image_token_id)
            ids, labels = ids[:self.model_max_length], labels[:self.model_max_length]
            if ids.count(self.image_token_id) != n_images:
                raise BadSampleError(f"sample {sample_id}: cutting it to model_max_length={self.model_max_length} "
                                     f"would cut its image tokens; raise --model-max-length or drop the entry")
        return ids, labels, truncated


# -----------------------------------------------------------------------------
# ImageNet-style classification

def read_class_names(path, class_dirs):
    """A class-name file: one name per line in sorted class-dir order, or `wnid<TAB>name` lines."""
    if not os.path.isfile(path):
        raise BadSampleError(f"class-name file {path} not found (set --imagenet-classes)")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if lines and all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        missing = [d for d in class_dirs if d not in mapping]
        if missing:
            raise BadSampleError(f"class-name file {path} has no name for class dirs {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)")
        return [mapping[d].strip() for d in class_dirs]
    if len(lines) != len(class_dirs):
        raise BadSampleError(f"class-name file {path} has {len(lines)} names but the ImageFolder has "
                             f"{len(class_dirs)} class dirs (one name per line in sorted dir order, or wnid<TAB>name)")
    return [line.strip() for line in lines]


class ImageNetIndex:
    """File list of an ImageFolder train split, its targets and class names."""

    def __init__(self, root, classes_file=None):
        train = os.path.join(root, "train")
        if not os.path.isdir(train):
            raise BadSampleError(f"--imagenet {root}: expected an ImageFolder at {train}/<class_dir>/*")
        class_dirs = sorted(e.name for e in os.scandir(train) if e.is_dir())
        if not class_dirs:
            raise BadSampleError(f"--imagenet {root}: {train} has no class directories")
        self.class_names = read_class_names(classes_file or os.path.join(root, "classnames.txt"), class_dirs)
        paths, targets = [], []
        for c, d in enumerate(class_dirs):
            files = sorted(e.name for e in os.scandir(os.path.join(train, d))
                           if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise BadSampleError(f"--imagenet {root}: class dir {os.path.join(train, d)} has no images")
            paths += [os.path.join(d, name) for name in files]
            targets += [c] * len(files)
        self.root = train
        self.paths = PackedRecords(paths)
        self.targets = np.array(targets, dtype=np.int64)

    def __len__(self):
        return len(self.targets)

    def path(self, i):
        return os.path.join(self.root, self.paths[i])


def classification_turns(class_names, target, rng, closed_k):
    """One classification conversation. -> (turns [question, answer], template index, closed)."""
    template_index = rng.randrange(len(CLASSIFICATION_TEMPLATES))
    template = CLASSIFICATION_TEMPLATES[template_index]
    closed = rng.random() < 0.5
    question = template
    if closed:
        others = [c for c in range(len(class_names)) if c != target]
        k = min(closed_k, len(class_names))
        candidates = [target] + rng.sample(others, k - 1)
        rng.shuffle(candidates)
        question = closed_world_question(template, [class_names[c] for c in candidates])
    return [IMAGE_TAG + "\n" + question, class_names[target]], template_index, closed


# -----------------------------------------------------------------------------
# the interleaved mix and the per-rank shard

class MixPlan:
    """Which sample sits at each position of each epoch. Sources: 0 = LLaVA, 1 = ImageNet."""

    def __init__(self, n_llava, n_imagenet, mix=(1, 7), seed=0):
        self.n_llava, self.n_imagenet, self.seed = n_llava, n_imagenet, seed
        a, b = mix
        if n_llava and n_imagenet:
            self.imagenet_per_epoch = int(round(n_llava * a / b))
        else:
            self.imagenet_per_epoch = n_imagenet
        self.epoch_length = n_llava + self.imagenet_per_epoch
        if self.epoch_length == 0:
            raise BadSampleError("no training data: give --data (LLaVA-Instruct json) and/or --imagenet")
        self._epoch, self._order = None, None

    def imagenet_slice(self, epoch):
        """ImageNet indices of an epoch: the next imagenet_per_epoch items of a seeded stream of
        permutations, so consecutive epochs see different images."""
        start = epoch * self.imagenet_per_epoch
        out = []
        while len(out) < self.imagenet_per_epoch:
            cycle, offset = divmod(start + len(out), self.n_imagenet)
            perm = np.random.default_rng([self.seed, 1, cycle]).permutation(self.n_imagenet)
            out.extend(perm[offset:offset + self.imagenet_per_epoch - len(out)].tolist())
        return np.array(out, dtype=np.int64)

    def order(self, epoch):
        """(epoch_length, 2) int64 rows of (source, index)."""
        if self._epoch != epoch:
            llava = np.stack([np.zeros(self.n_llava, np.int64), np.arange(self.n_llava)], 1)
            imagenet = self.imagenet_slice(epoch) if self.imagenet_per_epoch else np.zeros(0, np.int64)
            imagenet = np.stack([np.ones(len(imagenet), np.int64), imagenet], 1)
            both = np.concatenate([llava, imagenet]).reshape(-1, 2)
            perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(both))
            self._epoch, self._order = epoch, both[perm]
        return self._order

    def item(self, epoch, position):
        source, index = self.order(epoch)[position]
        return int(source), int(index)


class RankSampler(torch.utils.data.Sampler):
    """Yields (epoch, position) keys for one rank: the steps of an epoch from start_position on;
    in each step this rank reads a contiguous block of global_batch // world positions. The tail
    that does not fill a global batch is left out of the epoch (drop_last)."""

    def __init__(self, epoch_length, global_batch, rank, world, epoch, start_position=0):
        if global_batch % world:
            raise ValueError(f"--batch-size {global_batch} is not divisible by the world size {world}")
        if start_position % global_batch:
            raise ValueError(f"resume position {start_position} is not at a step boundary (global batch {global_batch})")
        self.steps = epoch_length // global_batch
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.epoch, self.start_step = epoch, start_position // global_batch

    def __iter__(self):
        per_rank = self.global_batch // self.world
        for step in range(self.start_step, self.steps):
            first = step * self.global_batch + self.rank * per_rank
            for p in range(first, first + per_rank):
                yield (self.epoch, p)

    def __len__(self):
        return max(self.steps - self.start_step, 0) * (self.global_batch // self.world)


# -----------------------------------------------------------------------------
# the dataset and the collate

def load_image(path, sample_id):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types; name the sample and file whatever it is
        raise BadSampleError(f"sample {sample_id}: cannot read image {path}: {e}") from e


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by (epoch, position) keys from RankSampler. Tokenizes and
    decodes lazily (in the DataLoader workers)."""

    def __init__(self, config: DataConfig, processor, llava_records=None, imagenet=None):
        self.config = config
        self.llava = llava_records
        self.imagenet = imagenet
        n_llava = len(llava_records) if llava_records is not None else 0
        n_imagenet = len(imagenet) if imagenet is not None else 0
        self.plan = MixPlan(n_llava, n_imagenet, config.mix, config.seed)
        tokenizer = processor.tokenizer
        self.conversation = ConversationTokenizer(tokenizer, n_image_tokens(processor),
                                                  tokenizer.convert_tokens_to_ids(IMAGE_TAG), config.model_max_length)

    @classmethod
    def from_config(cls, config: DataConfig, processor):
        """-> (dataset, number of skipped LLaVA entries)."""
        records, skipped = None, 0
        if config.llava_json:
            records, skipped = load_llava_json(config.llava_json, config.image_root, config.skip_bad_samples)
        imagenet = ImageNetIndex(config.imagenet, config.imagenet_classes) if config.imagenet else None
        return cls(config, processor, records, imagenet), skipped

    def __len__(self):
        return self.plan.epoch_length

    def describe(self, epoch, position):
        """The sample at a position without tokenizing it: dict(source, id, turns, image path,
        template, closed)."""
        source, index = self.plan.item(epoch, position)
        if source == 0:
            r = self.llava[index]
            image = os.path.join(self.config.image_root or "", r["image"]) if r["image"] else None
            return dict(source="llava", id=r["id"], turns=r["turns"], image=image)
        rng = random.Random(f"{self.config.seed}-{epoch}-{position}")
        target = int(self.imagenet.targets[index])
        turns, template, closed = classification_turns(self.imagenet.class_names, target, rng, self.config.closed_k)
        return dict(source="imagenet", id=f"imagenet:{self.imagenet.paths[index]}", turns=turns,
                    image=self.imagenet.path(index), template=template, closed=closed, target=target)

    def __getitem__(self, key):
        epoch, position = key
        s = self.describe(epoch, position)
        ids, labels, truncated = self.conversation(s["turns"], s["id"])
        image = load_image(s["image"], s["id"]) if s["image"] else None
        return dict(id=s["id"], source=s["source"], input_ids=ids, labels=labels, image=image, truncated=truncated)


def n_image_tokens(processor):
    """P: image tokens per image, as the processor expands <image>."""
    crop = processor.image_processor.crop_size
    height, width = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop.height, crop.width)
    n = (height // processor.patch_size) * (width // processor.patch_size)
    if getattr(processor, "vision_feature_select_strategy", "default") != "default":
        n += getattr(processor, "num_additional_image_tokens", 0)
    return n


class Collator:
    """Right-pads a list of samples. -> dict(input_ids (B, T), attention_mask (B, T),
    labels (B, T), pixel_values (n_img, 3, H, W) or a dict of them or None, n_truncated,
    n_imagenet, ids). pixel_values holds the images of the samples that have one, in batch order."""

    def __init__(self, pad_token_id, image_transform):
        self.pad_token_id = pad_token_id
        self.image_transform = image_transform

    def __call__(self, samples):
        B = len(samples)
        T = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[b, :n] = torch.tensor(s["input_ids"])
            labels[b, :n] = torch.tensor(s["labels"])
            attention_mask[b, :n] = 1
        images = [s["image"] for s in samples if s["image"] is not None]
        pixel_values = self.image_transform(images) if images else None
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values,
                    n_truncated=sum(s["truncated"] for s in samples),
                    n_imagenet=sum(s["source"] == "imagenet" for s in samples), ids=[s["id"] for s in samples])


def make_loader(dataset, collator, micro_batch_size, global_batch, rank, world, epoch, start_position=0,
                num_workers=0):
    sampler = RankSampler(len(dataset), global_batch, rank, world, epoch, start_position)
    return torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collator,
                                       num_workers=num_workers, drop_last=False,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None)


# -----------------------------------------------------------------------------
# the synthetic data set of --preset tiny

