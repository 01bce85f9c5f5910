"""
data.py: the training data of CARPE (paper section 4.1).

 - LLaVA-Instruct (`llava_v1_5_mix665k.json`: {id, image?, conversations: [{from, value}]}, text-only
   entries allowed), checked and packed once per node into a memory-mapped cache.
 - ImageNet-style classification (ImageFolder `<root>/train/<class_dir>/*` + class names): one of 20
   prompts, half open world, half closed world; the answer is the class name.
 - The 1:7 mix, a resumable deterministic shard per rank, and a collate into right-padded Batches.

Templates (`DataConfig.template`):
 - "vicuna_v1", LLaVA-1.5's conv_vicuna_v1: "<s>SYSTEM USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>".
   Ids and labels are those of LLaVA's train.py `preprocess_v1`: the WHOLE string tokenised, split only
   at <image> (`tokenizer_image_token`: each piece on its own, BOS once), labels by preprocess_v1's
   round arithmetic (ConversationTokenizer.vicuna). Where that misses the end (LLaVA's "tokenization
   mismatch": it trains on nothing) the sample is an error.
 - "chat": the tokenizer's chat template, tokenised the same way; supervised from the end of the
   generation prompt through the end-of-turn token after the answer.
 Either way `<image>` goes first in its turn, then "\n" (preprocess_multimodal), and expands to P tokens.

Checks (one bad item costs one item; messages name the file and the entry): the json up front,
streamed (check_entry); truncated images, image tokens that cutting to model_max_length would cut and
samples with no supervised token in the loader. With skip_bad_samples, bad entries are dropped up
front (`TrainDataset.skipped`) and a sample failing in the loader is replaced by the next good sample
of the epoch order (every micro-batch stays full under DDP/FSDP; `Batch.skipped`). Without it the
first bad sample stops the run with id, file, cause.

The LLaVA json cache (`ensure_llava_cache`) lives under `DataConfig.cache_dir` (default
$XDG_CACHE_HOME/carpe, never beside the json, whose folder may be read-only); every rank and resume
memory-maps it. Images: `load_image`, as LLaVA's `Image.open(path).convert("RGB")` wherever that
keeps the picture (EXIF orientation ignored, first frame, transparency dropped); wide modes are
scaled (wide_to_uint8).

Other choices where the paper and LLaVA leave room:
 - Turns alternate human/gpt from human to gpt (LLaVA drops a leading gpt turn; here: an error).
 - The mix (MixPlan): each epoch holds every LLaVA entry once plus round(n_llava * a / b) ImageNet
   images (a:b = 1:7), shuffled; without LLaVA data (imagenet-ft) every ImageNet image once. A mix
   that cannot be honoured is an error, never a silently different run (check_mix).
 - Sharding (RankSampler): contiguous blocks per rank within each step; a resume starts at a position.
 - A classification prompt comes from an RNG keyed by (seed, epoch, position) (classification_turns).
 - No grouping by modality/length (LLaVA's group_by_modality_length): a possible speed-up.
"""
import base64
import codecs
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
from array import array
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from kernels import IGNORE_INDEX


IMAGE_TAG = "<image>"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TEMPLATES = ("vicuna_v1", "chat")
ASSISTANT_SEP = " ASSISTANT: "  # LLaVA's conv.sep + roles[1] + ": ", where preprocess_v1 splits a round
CACHE_VERSION = 1  # bump when the cache layout or the up-front check changes
MAX_REPLACEMENTS = 64  # consecutive bad samples the loader replaces before it calls the data broken

# 20 classification prompts; the first two are the paper's (section 4.1)
CLASSIFICATION_TEMPLATES = [
    "Identify the object in this image:", "What object can you spot in the picture?",
    "What is the main object in this image?", "What type of object is in this photo?",
    "Name the object shown in the picture.", "What is shown in this image?", "Which object does this photo show?",
    "What is the object in the picture?", "Tell me what object appears in this image.",
    "What can be seen in this photo?", "Classify the object in this image.", "What is this a picture of?",
    "Which category does the object in this image belong to?", "What do you see in this image?",
    "Name the main subject of this photo.", "What kind of object is this?", "Recognize the object in the picture:",
    "What is depicted in this image?", "Give the name of the object in this photo.",
    "What is the object in this image called?",
]


def vicuna_prompt(question: str, has_image: bool) -> str:
    """A one-turn vicuna_v1 prompt ending in "ASSISTANT:", for generation (BOS not included)."""
    image = IMAGE_TAG + "\n" if has_image else ""
    return f"{SYSTEM_PROMPT} USER: {image}{question} ASSISTANT:"


def closed_world_question(template: str, candidates) -> str:
    return f'{template} Choose one from "{", ".join(candidates)}".'


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "carpe")


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
    template: str = "vicuna_v1"  # "vicuna_v1" (LLaVA-1.5 bases) or "chat" (the tokenizer's chat template)
    cache_dir: str | None = None  # where the checked LLaVA json is packed (None: default_cache_dir())


class BadSampleError(ValueError):
    """Bad input data; the message names the entry id, file or flag."""


@dataclass
class SkipReport:
    """Bad samples dropped under skip_bad_samples, each with its id and the reason."""
    items: list = field(default_factory=list)  # [(id, reason)]

    def add(self, sample_id, reason):
        self.items.append((sample_id, reason))

    def __len__(self):
        return len(self.items)

    @property
    def ids(self):
        return [sample_id for sample_id, _ in self.items]

    def summary(self, shown=5):
        """The first few "id: reason" lines, for a warning."""
        more = [f"... and {len(self.items) - shown} more"] if len(self.items) > shown else []
        return "\n  ".join([f"{sample_id}: {reason}" for sample_id, reason in self.items[:shown]] + more)


# -----------------------------------------------------------------------------
# packed records: one byte buffer + offsets, no per-record Python objects in the workers

class PackedRecords:
    """JSON values in one uint8 buffer with int64 offsets, built in memory (from_values) or mapped from
    a cache folder (open); pickled by path when mapped, so DataLoader workers map instead of copy."""

    def __init__(self, buffer, offsets, folder=None, in_use=None):
        self.buffer, self.offsets, self.folder = buffer, offsets, folder
        self.in_use = in_use  # a shared lock on the pack while mapped (see remove_stale_packs)

    @classmethod
    def from_values(cls, values):
        blobs = [json.dumps(v, ensure_ascii=False).encode() for v in values]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        return cls(np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets)

    @classmethod
    def open(cls, folder):
        in_use = open(os.path.join(folder, "meta.json"))
        fcntl.flock(in_use, fcntl.LOCK_SH)  # released when this process closes it or exits
        offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")
        path = os.path.join(folder, "records.bin")
        # np.memmap refuses an empty file: a cache whose entries were all skipped holds no bytes
        buffer = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
        return cls(buffer, offsets, folder, in_use)

    def __reduce__(self):
        return (PackedRecords.open, (self.folder,)) if self.folder else (PackedRecords, (self.buffer, self.offsets))

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return json.loads(self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes())


# -----------------------------------------------------------------------------
# conversation templates and tokenisation

def move_image_tag_first(text):
    """LLaVA's preprocess_multimodal: the <image> tag goes to the start of its turn, then a newline."""
    return (IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()).strip() if IMAGE_TAG in text else text


def render_vicuna(turns, round_end):
    """LLaVA's conv_vicuna_v1.get_prompt(): "SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ..."."""
    text = SYSTEM_PROMPT + " "
    for t, value in enumerate(turns):
        text += f"USER: {value} " if t % 2 == 0 else f"ASSISTANT: {value}{round_end}"
    return text


def special_token_texts(tokenizer):
    """The texts of the tokenizer's special tokens except <image>, longest first."""
    texts = set(tokenizer.all_special_tokens)
    texts |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(texts - {IMAGE_TAG, ""}, key=len, reverse=True)


class ConversationTokenizer:
    """A conversation [human, gpt, human, gpt, ...] -> (input_ids, labels, truncated) in the
    template's format, tokenised as a whole string split only at <image> (see the module docstring)."""

    def __init__(self, tokenizer, n_image_tokens, image_token_id, model_max_length=2048, template="vicuna_v1"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {template!r}; expected one of {TEMPLATES}")
        self.tokenizer, self.template, self.model_max_length = tokenizer, template, model_max_length
        self.n_image_tokens, self.image_token_id = n_image_tokens, image_token_id
        if template == "vicuna_v1":
            if tokenizer.bos_token_id is None or tokenizer.eos_token is None:
                raise ValueError("template 'vicuna_v1' needs a tokenizer with BOS and EOS tokens "
                                 "(LLaVA-1.5 bases); use template 'chat' for this tokenizer")
            self.round_end = tokenizer.eos_token  # LLaVA's sep2, "</s>"
            # LLaVA's `not tokenizer.legacy`: text right after a special token gets no SentencePiece
            # prefix, so a later round is one token shorter in context than tokenised alone
            fresh = tokenizer("USER", add_special_tokens=False)["input_ids"]
            after = tokenizer(self.round_end + "USER", add_special_tokens=False)["input_ids"][1:]
            self.later_round_shift = int(after != fresh)
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("template 'chat' needs a tokenizer with a chat_template; "
                                 "use template 'vicuna_v1' for LLaVA-1.5 bases")
            self.specials = special_token_texts(tokenizer)

    def encode(self, text, offsets=False):
        """Ids of text, no special tokens added, as LLaVA's tokenizer_image_token: each piece between
        <image> tags on its own, each tag -> P image tokens. offsets=True adds each token's start char."""
        ids, starts, base = [], [], 0
        for i, piece in enumerate(text.split(IMAGE_TAG)):
            if i > 0:
                ids += [self.image_token_id] * self.n_image_tokens
                starts += [base - len(IMAGE_TAG)] * self.n_image_tokens
            if piece:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=offsets)
                ids += enc["input_ids"]
                if offsets:
                    starts += [base + start for start, _ in enc["offset_mapping"]]
            base += len(piece) + len(IMAGE_TAG)
        return (ids, starts) if offsets else ids

    def render_chat(self, turns, generation_prompt=False):
        messages = [dict(role="user" if t % 2 == 0 else "assistant", content=v) for t, v in enumerate(turns)]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode_prompt(self, question, has_image=True):
        """Ids (with BOS) of a one-turn conversation through the assistant's cue ("ASSISTANT:" or the
        chat template's generation prompt), exactly as training tokenises that user turn."""
        if self.template == "chat":
            content = move_image_tag_first(IMAGE_TAG + question) if has_image else question
            return self.encode(self.render_chat([content], generation_prompt=True))
        return [self.tokenizer.bos_token_id] + self.encode(vicuna_prompt(question, has_image))

    def vicuna(self, turns, sample_id):
        """ids and labels as LLaVA's preprocess_v1 computes them."""
        text = render_vicuna(turns, self.round_end)
        ids = [self.tokenizer.bos_token_id] + self.encode(text)
        labels = np.array(ids, dtype=np.int64)
        labels[0] = IGNORE_INDEX
        cur = 1  # after BOS
        for r, round_text in enumerate(text.split(self.round_end)):
            parts = round_text.split(ASSISTANT_SEP)
            if not round_text or len(parts) != 2:
                break
            # both lengths as tokenizer_image_token counts them alone: BOS + the round; the BOS
            # slot stands for the round's </s>, and "- 2" drops BOS and the space after "ASSISTANT:"
            shift = self.later_round_shift if r > 0 else 0  # a later round in context (see __init__)
            round_len = 1 + len(self.encode(round_text)) - shift
            instruction_len = 1 + len(self.encode(parts[0] + ASSISTANT_SEP)) - 2 - shift
            labels[cur:cur + max(instruction_len, 0)] = IGNORE_INDEX
            cur += round_len
        labels[cur:] = IGNORE_INDEX
        if cur != len(ids):
            raise BadSampleError(f"sample {sample_id}: LLaVA's preprocess_v1 arithmetic ends at token {cur} of "
                                 f"{len(ids)} (its 'tokenization mismatch': it would train on nothing); a turn "
                                 f"holding {self.round_end!r} or {ASSISTANT_SEP.strip()!r}? else use template 'chat'")
        return ids, labels.tolist()

    def chat(self, turns, sample_id):
        """ids of the rendered chat; labels on each answer through its end-of-turn token."""
        text = self.render_chat(turns)
        ids, starts = self.encode(text, offsets=True)
        supervised = np.zeros(len(text) + 1, dtype=bool)  # per character of text
        for t in range(1, len(turns), 2):
            prompt = self.render_chat(turns[:t], generation_prompt=True)
            answer = turns[t].strip()
            at = text.find(answer, len(prompt))
            if not text.startswith(prompt) or at < 0:
                raise BadSampleError(f"sample {sample_id}: the chat template does not render turn {t} after its "
                                     f"generation prompt; it cannot be masked by prefix")
            end = at + len(answer)
            hits = [(at_s, -len(s)) for s in self.specials if (at_s := text.find(s, end)) >= 0]  # longest at a tie
            if not hits:
                raise BadSampleError(f"sample {sample_id}: no special token ends turn {t} in the chat template")
            eot, minus_length = min(hits)
            supervised[len(prompt):eot - minus_length] = True
        return ids, [i if supervised[s] else IGNORE_INDEX for i, s in zip(ids, starts)]

    def __call__(self, turns, sample_id="?"):
        """[human, gpt, ...] texts -> (input_ids, labels, truncated); BadSampleError if cutting to
        model_max_length would cut image tokens or leave no supervised token."""
        turns = [move_image_tag_first(v) if t % 2 == 0 else v for t, v in enumerate(turns)]
        ids, labels = (self.vicuna if self.template == "vicuna_v1" else self.chat)(turns, sample_id)
        truncated = len(ids) > self.model_max_length
        if truncated:
            n_images = ids.count(self.image_token_id)
            ids, labels = ids[:self.model_max_length], labels[:self.model_max_length]
            if ids.count(self.image_token_id) != n_images:
                raise BadSampleError(f"sample {sample_id}: cutting it to model_max_length={self.model_max_length} "
                                     f"would cut its image tokens; raise --model-max-length or drop the entry")
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSampleError(f"sample {sample_id}: no supervised token left"
                                 + (f" after cutting to model_max_length={self.model_max_length}" if truncated else ""))
        return ids, labels, truncated


# -----------------------------------------------------------------------------
# LLaVA-Instruct: the up-front check, streamed, packed once into a memory-mapped cache

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def image_problem(path):
    """Why the image file at path cannot be used, or None: a known signature (IMAGE_MAGIC, WebP) in the
    first bytes passes, anything else must open in PIL (header only; the loader finds truncation)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"image file {path} {'does not exist' if isinstance(e, FileNotFoundError) else f'cannot be read ({e})'}"
    if head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    try:
        with Image.open(path) as im:
            im.size
    except Exception as e:  # PIL raises many types for junk; name the file whatever it is
        return f"image file {path} is not an image PIL can read ({type(e).__name__}: {e})"


_SURROGATE = re.compile("[\ud800-\udfff]")


def not_utf8(text):
    """True if text holds a lone surrogate: a "\\ud800" escape, or a byte that was not UTF-8."""
    return _SURROGATE.search(text) is not None


def check_entry(entry, image_root):
    """The problems of one LLaVA entry as a list of strings (empty = good) and its record
    [id, image, turns] (None when bad)."""
    if not isinstance(entry, dict):
        return ["entry is not a JSON object"], None
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
        elif not turn["value"].strip():
            problems.append(f"turn {t} ({role}) is empty" + (": an empty answer teaches nothing" if role == "gpt" else ""))
        elif not_utf8(turn["value"]):
            problems.append(f"turn {t} holds text that is not UTF-8 (a lone surrogate such as \\ud800, or a byte that "
                            f"is not UTF-8 in the file)")
    if problems:
        return problems, None
    if conv[-1]["from"] != "gpt":
        return ["the conversation does not end with a gpt turn (nothing to supervise)"], None
    n_tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv)
    n_gpt_tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv if turn["from"] == "gpt")
    image = entry.get("image")
    if image is not None:
        if not isinstance(image, str) or not_utf8(image):
            return [f"'image' must be one path (multi-image entries are not supported), got {image!r}"], None
        if n_tags != 1 or n_gpt_tags:
            return [f"has an image but {n_tags} {IMAGE_TAG} tags ({n_gpt_tags} in gpt turns); expected exactly one in a human turn"], None
        if problem := image_problem(os.path.join(image_root or "", image)):
            return [problem], None
    elif n_tags:
        return [f"has no 'image' but {n_tags} {IMAGE_TAG} tag(s)"], None
    return [], [entry_id(entry), image, [turn["value"] for turn in conv]]


def entry_id(entry):
    sid = str(entry.get("id", "<no id>")) if isinstance(entry, dict) else "<not an object>"
    return sid.encode("utf-8", "backslashreplace").decode() if not_utf8(sid) else sid


_WHITESPACE = re.compile(r"[ \t\r\n]*")


class JsonListReader:
    """The entries of a top-level JSON list, read in chunks (one chunk and one entry alive at a time).
    Bytes that are not UTF-8 come through as lone surrogates, so the check names their entry."""

    def __init__(self, path, chunk_bytes=1 << 23, max_entry_chars=1 << 26):
        self.path, self.chunk_bytes, self.max_entry_chars = path, chunk_bytes, max_entry_chars

    def fill(self):  # drop what was consumed, append the next chunk
        chunk = self.file.read(self.chunk_bytes)
        self.eof = not chunk
        self.buf, self.pos = self.buf[self.pos:] + self.utf8.decode(chunk, final=self.eof), 0

    def next_char(self):  # the next non-whitespace character ("" at the end of the file)
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.fill()

    def fail(self, index, why):
        raise BadSampleError(f"--data {self.path}: not valid JSON at entry {index} ({why})")

    def __iter__(self):
        decoder = json.JSONDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        with open(self.path, "rb") as self.file:
            if self.next_char() != "[":
                raise BadSampleError(f"--data {self.path}: expected a JSON list of entries")
            self.pos += 1
            index = 0
            while self.next_char() != "]":
                if index:  # the comma after the previous entry
                    if self.next_char() != ",":
                        self.fail(index, f"expected ',' or ']' after entry {index - 1}")
                    self.pos += 1
                    self.next_char()
                while True:  # an entry may run past the chunk: read on until it parses
                    try:
                        entry, end = decoder.raw_decode(self.buf, self.pos)
                        if end < len(self.buf) or self.eof:
                            break
                    except json.JSONDecodeError as e:
                        if self.eof or len(self.buf) - self.pos > self.max_entry_chars:
                            self.fail(index, e.msg)
                    self.fill()
                self.pos = end
                yield entry
                index += 1
            self.pos += 1
            if self.next_char():
                self.fail(index, "text after the closing ']'")


def llava_cache_dir(config: DataConfig):
    """config's cache folder, llava-<stem>-<json>-<state>-<settings>: digests of the json's absolute path,
    of (cache version, size, mtime) and of the settings that change what the check keeps."""
    path = os.path.abspath(config.llava_json)
    if not os.path.isfile(path):
        raise BadSampleError(f"--data {config.llava_json}: file not found")
    st = os.stat(path)
    image_root = os.path.abspath(config.image_root) if config.image_root else None
    parts = [path, (CACHE_VERSION, st.st_size, st.st_mtime_ns), (image_root, config.skip_bad_samples)]
    digests = [hashlib.sha256(json.dumps(p).encode()).hexdigest()[:8] for p in parts]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(config.cache_dir or default_cache_dir(), "-".join(["llava", stem] + digests))


def pack_llava_json(config: DataConfig, folder, progress=True):
    """Check the json's entries, streaming; write the good records into folder: records.bin, offsets.npy
    (int64, n + 1), meta.json (counts, skipped). Bad entries raise unless skip_bad_samples."""
    offsets, skipped, first_bad, n_bad, n_entries = array("q", [0]), SkipReport(), [], 0, 0
    entries = tqdm(JsonListReader(config.llava_json), desc=f"checking {os.path.basename(config.llava_json)}",
                   unit=" entries", disable=not progress, mininterval=2.0)
    with open(os.path.join(folder, "records.bin"), "wb") as out:
        for i, entry in enumerate(entries):
            n_entries += 1
            problems, record = check_entry(entry, config.image_root)
            if problems:
                # keep all ids when skipping (they are the report), only the first ten when failing
                n_bad += 1
                if config.skip_bad_samples:
                    skipped.add(entry_id(entry), f"entry {i}: {'; '.join(problems)}")
                elif len(first_bad) < 10:
                    first_bad.append(f"entry {i} (id {entry_id(entry)}): {'; '.join(problems)}")
                continue
            blob = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
            out.write(blob)
            offsets.append(offsets[-1] + len(blob))
    if n_bad and not config.skip_bad_samples:
        more = f"\n  ... and {n_bad - 10} more" if n_bad > 10 else ""
        raise BadSampleError(f"{config.llava_json}: {n_bad} bad entries (use --skip-bad-samples to drop and count "
                             f"them):\n  " + "\n  ".join(first_bad) + more)
    np.save(os.path.join(folder, "offsets.npy"), np.frombuffer(offsets, dtype=np.int64))
    meta = dict(version=CACHE_VERSION, llava_json=os.path.abspath(config.llava_json), n_entries=n_entries,
                n_records=len(offsets) - 1, skipped=skipped.items)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def ensure_llava_cache(config: DataConfig, progress=True) -> str:
    """Check and pack config.llava_json once (one process per node, before the others map it); -> the
    cache folder. Built in a temporary folder and renamed: it appears complete or not at all."""
    if config.image_root is not None and not os.path.isdir(config.image_root):
        raise BadSampleError(f"--image-root {config.image_root}: not a directory")
    folder = llava_cache_dir(config)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return folder
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = f"{folder}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
        os.makedirs(tmp)
    except OSError as e:
        raise BadSampleError(f"cannot write the LLaVA json cache under {parent} ({e}); set --cache-dir") from e
    try:
        pack_llava_json(config, tmp, progress)
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "meta.json")):  # another process did not win the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remove_stale_packs(folder)
    return folder


def remove_stale_packs(folder):
    """Remove the packs of another state (size, mtime, cache version) of folder's json, each a full copy
    of its text; packs under other settings stay, as does one a job maps (PackedRecords.open's lock)."""
    parent, name = os.path.split(folder)
    same_json, state, _ = name.rsplit("-", 2)
    for other in os.listdir(parent):
        if other.startswith(same_json + "-") and ".tmp-" not in other and other.rsplit("-", 2)[1] != state:
            try:
                with open(os.path.join(parent, other, "meta.json")) as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a job still maps it
                    shutil.rmtree(os.path.join(parent, other), ignore_errors=True)
            except OSError:
                continue  # not a pack, or one in use


def load_llava_records(config: DataConfig):
    """-> (PackedRecords of [id, image, turns], SkipReport), memory-mapped from the cache."""
    folder = ensure_llava_cache(config)
    with open(os.path.join(folder, "meta.json")) as f:
        skipped = SkipReport([tuple(item) for item in json.load(f)["skipped"]])
    return PackedRecords.open(folder), skipped


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
        if missing := [d for d in class_dirs if d not in mapping]:
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
        self.root, self.paths, self.targets = train, PackedRecords.from_values(paths), np.array(targets, np.int64)

    def __len__(self):
        return len(self.targets)

    def path(self, i):
        return os.path.join(self.root, self.paths[i])


def classification_turns(class_names, target, rng, closed_k):
    """One classification conversation -> (turns [question, answer], template index, closed). Closed
    world: `<template> Choose one from "<c1>, <c2>, ...".`, k shuffled candidates including the true one."""
    template_index = rng.randrange(len(CLASSIFICATION_TEMPLATES))
    question = template = CLASSIFICATION_TEMPLATES[template_index]
    closed = rng.random() < 0.5
    if closed:
        others = [c for c in range(len(class_names)) if c != target]
        candidates = [target] + rng.sample(others, min(closed_k, len(class_names)) - 1)
        rng.shuffle(candidates)
        question = closed_world_question(template, [class_names[c] for c in candidates])
    return [IMAGE_TAG + "\n" + question, class_names[target]], template_index, closed


# -----------------------------------------------------------------------------
# the interleaved mix and the per-rank shard

class MixPlan:
    """Which sample (source 0 = LLaVA, 1 = ImageNet) sits at each position of each epoch. ImageNet images
    come from seeded permutations that continue across epochs; an epoch is shuffled by (seed, epoch)."""

    def __init__(self, n_llava, n_imagenet, mix=(1, 7), seed=0):
        self.n_llava, self.n_imagenet, self.seed = n_llava, n_imagenet, seed
        a, b = mix
        self.imagenet_per_epoch = int(round(n_llava * a / b)) if n_llava and n_imagenet else n_imagenet
        self.epoch_length = n_llava + self.imagenet_per_epoch
        if self.epoch_length == 0:
            raise BadSampleError("no training data: give --data (LLaVA-Instruct json) and/or --imagenet")
        self._epoch, self._order = None, None

    def imagenet_slice(self, epoch):
        """ImageNet indices of an epoch: the next imagenet_per_epoch items of the permutation stream."""
        start, out = epoch * self.imagenet_per_epoch, []
        while len(out) < self.imagenet_per_epoch:
            cycle, offset = divmod(start + len(out), self.n_imagenet)
            perm = np.random.default_rng([self.seed, 1, cycle]).permutation(self.n_imagenet)
            out.extend(perm[offset:offset + self.imagenet_per_epoch - len(out)].tolist())
        return np.array(out, dtype=np.int64)

    def order(self, epoch):
        """(epoch_length, 2) int64 rows of (source, index)."""
        if self._epoch != epoch:
            llava = np.stack([np.zeros(self.n_llava, np.int64), np.arange(self.n_llava)], 1)
            imagenet = np.stack([np.ones(self.imagenet_per_epoch, np.int64), self.imagenet_slice(epoch)], 1)
            both = np.concatenate([llava, imagenet]).reshape(-1, 2)
            perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(both))
            self._epoch, self._order = epoch, both[perm]
        return self._order

    def item(self, epoch, position):
        source, index = self.order(epoch)[position]
        return int(source), int(index)


def check_mix(config: DataConfig, llava_records, imagenet, skipped: SkipReport):
    """Refuse a mix whose given side would train on nothing in an epoch, naming the file, both counts
    and the ratio. A side left out entirely (no --data, no --imagenet) is the user's choice.
    -> (n_llava, n_imagenet)."""
    a, b = config.mix
    ratio = f"--mix {a:g}:{b:g}"
    if llava_records is not None and len(llava_records) == 0:
        where = f"--data {config.llava_json}" if config.llava_json else "the LLaVA records"
        run = " (an ImageNet-only run)" if imagenet is not None else ""
        if len(skipped):
            raise BadSampleError(f"{where}: all {len(skipped)} entries were dropped by --skip-bad-samples, so the LLaVA "
                                 f"side of {ratio} would train on nothing{run}. The first:\n  {skipped.summary()}")
        raise BadSampleError(f"{where} holds no entries, so the LLaVA side of {ratio} would train on nothing{run}"
                             + ("; leave out --data to train on ImageNet alone" if run else ""))
    n_llava, n_imagenet = (len(x) if x is not None else 0 for x in (llava_records, imagenet))
    if n_llava and b == 0:
        raise BadSampleError(f"{ratio} leaves no LLaVA sample per epoch, but --data {config.llava_json} holds "
                             f"{n_llava} entries (every entry is trained once an epoch); leave out --data instead")
    if n_llava and imagenet is not None and round(n_llava * a / b) == 0:
        raise BadSampleError(f"{ratio} with {n_llava} LLaVA entries gives round({n_llava} * {a:g} / {b:g}) = 0 "
                             f"ImageNet samples per epoch, though --imagenet {config.imagenet} holds {n_imagenet} "
                             f"images: give more LLaVA entries or a larger ImageNet side of --mix")
    return n_llava, n_imagenet


class RankSampler(torch.utils.data.Sampler):
    """(epoch, position) keys for one rank from start_position on: in each step a contiguous block of
    global_batch // world positions. The tail that does not fill a global batch is dropped."""

    def __init__(self, epoch_length, global_batch, rank, world, epoch, start_position=0):
        if global_batch % world:
            raise ValueError(f"--batch-size {global_batch} is not divisible by the world size {world}")
        if start_position % global_batch:
            raise ValueError(f"resume position {start_position} is not at a step boundary (global batch {global_batch})")
        self.steps, self.global_batch, self.rank, self.world = epoch_length // global_batch, global_batch, rank, world
        self.epoch, self.start_step = epoch, start_position // global_batch

    def __iter__(self):
        per_rank = self.global_batch // self.world
        for step in range(self.start_step, self.steps):
            first = step * self.global_batch + self.rank * per_rank
            yield from ((self.epoch, p) for p in range(first, first + per_rank))

    def __len__(self):
        return max(self.steps - self.start_step, 0) * (self.global_batch // self.world)


# -----------------------------------------------------------------------------
# the dataset and the collate

@dataclass
class SampleInfo:
    """What sits at one position of an epoch, before tokenizing or decoding."""
    source: str  # "llava" or "imagenet"
    id: str
    turns: list  # [human, gpt, ...]
    image: str | None  # path
    template: int | None = None  # classification prompt template index (ImageNet)
    closed: bool | None = None  # closed-world prompt (ImageNet)
    target: int | None = None  # class index (ImageNet)


@dataclass
class Sample:
    """One tokenized sample with its decoded image."""
    id: str
    source: str
    input_ids: list
    labels: list
    image: object  # PIL image or None
    truncated: bool
    skipped: list = field(default_factory=list)  # (id, reason) of the bad samples this one replaces


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel, one channel


def wide_to_uint8(pixels, mode):
    """(H, W) pixels of a 16-bit, 32-bit integer or float image -> (H, W) uint8, where convert("RGB")
    would clip them at 255 (a 16-bit picture turns all white). NaN or inf is an error."""
    a = pixels.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"its mode {mode} pixels hold NaN or inf")
    lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        a = a / 257  # the full unsigned 16-bit range onto 0..255
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255  # a float picture in [0, 1]
    elif lo >= 0 and hi <= 255:
        pass  # 8-bit values kept in a wider mode (L.convert("I") or "F")
    elif mode == "I" and lo >= 0 and hi <= 65535:
        a = a / 257  # 16-bit values in a 32-bit mode (how older Pillows open a 16-bit PNG)
    else:
        a = (a - lo) * (255 / ((hi - lo) or 1))  # any other range: stretched from its minimum to its maximum
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(im):
    """An opened PIL image in any mode -> RGB, decoding every pixel (a truncated file fails here)."""
    if im.mode in WIDE_MODES:
        return Image.fromarray(wide_to_uint8(np.asarray(im), im.mode), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's route for a palette with transparency; the alpha goes next
    if im.mode == "La":
        im = im.convert("LA")  # premultiplied alpha undone (Pillow has no La -> RGB)
    return im.convert("RGB")  # alpha dropped, as LLaVA's convert("RGB"); CMYK, YCbCr, LAB, HSV by Pillow


def load_image(source, sample_id=None):
    """The one image decoder: a path, raw bytes, {"b64": str}, {"bytes": bytes} or a PIL image -> an RGB
    PIL image, every pixel decoded. A failure is a BadSampleError naming the sample and the source."""
    if isinstance(source, dict):
        what = f"the base64 image ({len(source['b64'])} chars)" if "b64" in source else \
            f"the image bytes ({len(source['bytes'])})"
    else:
        what = f"the image bytes ({len(source)})" if isinstance(source, bytes) else \
            f"<PIL image {source.mode} {source.size}>" if isinstance(source, Image.Image) else source
    try:
        if isinstance(source, Image.Image):
            return to_rgb(source)
        if isinstance(source, dict):
            source = base64.b64decode(source["b64"]) if "b64" in source else source["bytes"]
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return to_rgb(im)
    except Exception as e:  # PIL raises many types; name the sample and the file whatever it is
        where = f"sample {sample_id}: " if sample_id is not None else ""
        raise BadSampleError(f"{where}cannot read image {what}: {type(e).__name__}: {e}") from e


def n_image_tokens(processor):
    """P: image tokens per image, as the processor expands <image>."""
    crop = processor.image_processor.crop_size
    height, width = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop.height, crop.width)
    extra = getattr(processor, "vision_feature_select_strategy", "default") != "default"  # CLS kept too
    return (height // processor.patch_size) * (width // processor.patch_size) + \
        (getattr(processor, "num_additional_image_tokens", 0) if extra else 0)


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by RankSampler's (epoch, position) keys, tokenizing and decoding in the
    DataLoader workers. skipped: the LLaVA entries the up-front check dropped."""

    def __init__(self, config: DataConfig, processor, llava_records=None, imagenet=None, skipped=None):
        self.config, self.llava, self.imagenet, self.skipped = config, llava_records, imagenet, skipped or SkipReport()
        self.plan = MixPlan(*check_mix(config, llava_records, imagenet, self.skipped), config.mix, config.seed)
        tok = processor.tokenizer
        self.conversation = ConversationTokenizer(tok, n_image_tokens(processor), tok.convert_tokens_to_ids(IMAGE_TAG),
                                                  config.model_max_length, config.template)

    @classmethod
    def from_config(cls, config: DataConfig, processor):
        """-> (dataset, number of LLaVA entries the up-front check skipped), the json read via its cache."""
        records, skipped = load_llava_records(config) if config.llava_json else (None, SkipReport())
        imagenet = ImageNetIndex(config.imagenet, config.imagenet_classes) if config.imagenet else None
        return cls(config, processor, records, imagenet, skipped), len(skipped)

    def __len__(self):
        return self.plan.epoch_length

    def describe(self, epoch, position) -> SampleInfo:
        """The sample at a position without tokenizing it."""
        source, index = self.plan.item(epoch, position)
        if source == 0:
            sample_id, image, turns = self.llava[index]
            image = os.path.join(self.config.image_root or "", image) if image else None
            return SampleInfo("llava", sample_id, turns, image)
        rng = random.Random(f"{self.config.seed}-{epoch}-{position}")
        target = int(self.imagenet.targets[index])
        turns, template, closed = classification_turns(self.imagenet.class_names, target, rng, self.config.closed_k)
        return SampleInfo("imagenet", f"imagenet:{self.imagenet.paths[index]}", turns, self.imagenet.path(index),
                          template, closed, target)

    def load(self, info: SampleInfo) -> Sample:
        ids, labels, truncated = self.conversation(info.turns, info.id)
        image = load_image(info.image, info.id) if info.image else None
        return Sample(info.id, info.source, ids, labels, image, truncated)

    def __getitem__(self, key):
        """The sample at (epoch, position); under skip_bad_samples a bad one is replaced by the next good one."""
        epoch, position = key
        skipped = []
        for offset in range(min(MAX_REPLACEMENTS + 1, len(self))):
            info = self.describe(epoch, (position + offset) % len(self))
            try:
                sample = self.load(info)
                sample.skipped = skipped
                return sample
            except BadSampleError as e:
                if not self.config.skip_bad_samples:
                    raise BadSampleError(f"{e} (use --skip-bad-samples to skip and count such samples)") from e
                skipped.append((info.id, str(e)))
        raise BadSampleError(f"{len(skipped)} bad samples in a row from epoch {epoch} position {position}; "
                             f"the data looks broken. Last: {skipped[-1][1]}")


@dataclass
class Batch:
    """A right-padded micro-batch. Item access (batch["input_ids"]) reads the same fields."""
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX where not supervised
    pixel_values: object  # (n_img, 3, H, W), or {expert: tensor} for CARPE-MoE, or None: images in batch order
    n_truncated: int  # samples cut to model_max_length
    n_imagenet: int  # classification samples
    ids: list  # sample ids, in row order
    skipped: list  # (id, reason) of bad samples replaced in this batch (skip_bad_samples)

    def __getitem__(self, name):
        return getattr(self, name)


class Collator:
    """Right-pads a list of Samples into a Batch; pixel_values: the images there are, in batch order."""

    def __init__(self, pad_token_id, image_transform):
        self.pad_token_id, self.image_transform = pad_token_id, image_transform

    def __call__(self, samples):
        B, T = len(samples), max(len(s.input_ids) for s in samples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s.input_ids)
            input_ids[b, :n] = torch.tensor(s.input_ids)
            labels[b, :n] = torch.tensor(s.labels)
            attention_mask[b, :n] = 1
        images = [s.image for s in samples if s.image is not None]
        pixel_values = self.image_transform(images) if images else None
        return Batch(input_ids, attention_mask, labels, pixel_values, n_truncated=sum(s.truncated for s in samples),
                     n_imagenet=sum(s.source == "imagenet" for s in samples), ids=[s.id for s in samples],
                     skipped=[item for s in samples for item in s.skipped])


def ignore_stop_signals(worker_id):
    """A DataLoader worker leaves SIGTERM / SIGINT (SLURM's --signal, Ctrl-C) to the training process,
    which finishes the step and saves; torch's worker handler would re-raise them and fail the run."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, collator, micro_batch_size, global_batch, rank, world, epoch, start_position=0,
                num_workers=0):
    sampler = RankSampler(len(dataset), global_batch, rank, world, epoch, start_position)
    return torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collator,
                                       num_workers=num_workers, drop_last=False, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None,
                                       worker_init_fn=ignore_stop_signals if num_workers else None)
