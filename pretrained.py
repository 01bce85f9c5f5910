"""
pretrained.py: a trained run, one call from use. Loading (a run folder, a moved copy of one, or a
Hub id), asking it about an image, and writing a portable, shareable run folder.

    model = pretrained.load("runs/tiny")                  # or CARPE.from_pretrained(...), or "user/repo"
    model.ask("photo.jpg", "What is in this image?")       # -> str (lists in, list out)
    model.ask(image, question, return_dict=True)           # .answer, .context_weights, .route
    model.save_pretrained("carpe-tiny"); model.push_to_hub("user/carpe-tiny")

What a loaded model carries (plain attributes): .processor (the base's), .image_transform (LLaVA's
pad-to-square then the image processor; one per expert under CARPE-MoE), .template (the run's
conversation template), .run_config (the run's config, a dict) and .run_dir (the local folder).

`ask` builds exactly the prompt and pixels that training and eval.py build: the prompt is
data.ConversationTokenizer.encode_prompt (with a history: the ids training gives the same
conversation, cut before the last answer), images are decoded by data.load_image and go through the
run's image transform, prompts are left-padded as eval.py pads them, and decoding is the model's
cached greedy generate. A test checks that ask and eval.py answer the same benchmark items alike.

The base of a run is named in its config as the user gave it: a Hub id, a folder, or "preset:tiny" /
"preset:small" (tiny.py and small.py rebuild those, deterministically, on first use on any
machine). `resolve_base` turns it into a folder; older run configs holding an absolute folder still
load where that folder exists, and a tiny-world path from another machine or cache maps back to
"preset:tiny" when its settings key matches today's. Nothing in a run folder depends on where the
folder lies, so it can be moved or copied to another machine.

A shared folder (save_pretrained / push_to_hub) holds: model.safetensors (the trainable tensors),
run_config.json (never config.json, which tools read as a transformers model), manifest.json (their
digests), README.md (a model card with Hugging Face front matter), and when the source run has
them log.jsonl, the training summary and the metrics of its eval folder (eval/<bench>/metrics.json).
"""
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch
from huggingface_hub import ModelCardData, create_repo, snapshot_download, upload_folder
from PIL import Image

import common
import small
import tiny
from baselines import LEVI, METHODS, LlavaBaseline
from benchmarks import BENCHMARKS, read_eval_dir
from carpe import CARPE, looks_like_path
from data import IMAGE_TAG, ConversationTokenizer, load_image, n_image_tokens
from kernels import IGNORE_INDEX

PRESET_PREFIX = "preset:"
PRESETS = ("tiny", "small")  # what "preset:<name>" may name: the worlds tiny.py and small.py build
DEFAULT_CACHE = small.DEFAULT_CACHE  # the repo's .cache/, train.py's and eval.py's default --cache-dir
METHOD_CLASSES = {"carpe": CARPE, "levi": LEVI, "llava": LlavaBaseline, "imagenet-ft": LlavaBaseline}
CARD = "README.md"
COPIED_FILES = ("log.jsonl", "summary.json")  # from the source run into a saved folder, when present
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_CACHE_PATH = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")  # a Hub id's folder in the local Hub cache


# -----------------------------------------------------------------------------
# bases: "preset:tiny", a Hub id or a folder -> a folder (or id) carpe.load_base reads

def tiny_base_name():
    """The folder name of today's tiny base (its settings key): equal names are the same base."""
    return os.path.basename(tiny.prestage_dir(""))


def portable_base(base):
    """The base as a run config should name it on any machine: a preset name for the tiny / small
    worlds' cache folders, the Hub id for a folder of the local Hub cache, else as given."""
    if base.startswith(PRESET_PREFIX):
        return base
    path = os.path.normpath(base)
    hub = HUB_CACHE_PATH.search(path + "/")
    if hub:
        return f"{hub.group(1)}/{hub.group(2)}"
    if os.path.basename(path) == tiny_base_name():
        return PRESET_PREFIX + "tiny"
    if os.path.basename(path).startswith("small-base-"):
        return PRESET_PREFIX + "small"
    return base


def resolve_base(name, cache_dir=None):
    """A run config's base -> what carpe.load_base reads. "preset:tiny" / "preset:small": the
    world tiny.py / small.py builds under cache_dir (default: the repo's .cache/; built on first
    use); a folder or Hub id as is; an absolute folder that is gone: its preset when it was a tiny
    world's base with today's settings, else FileNotFoundError naming it."""
    if name.startswith(PRESET_PREFIX):
        preset = name[len(PRESET_PREFIX):]
        if preset == "tiny":
            return tiny.ensure_tiny_world(cache_dir or DEFAULT_CACHE).base
        if preset == "small":
            return small.ensure_small_world(cache_dir or DEFAULT_CACHE).base
        raise ValueError(f"base {name!r}: unknown preset; choose one of " + ", ".join(PRESET_PREFIX + p for p in PRESETS))
    if os.path.isdir(name):
        return name
    if looks_like_path(name) or not HUB_ID.match(name):
        portable = portable_base(name)
        if portable.startswith(PRESET_PREFIX):
            print(f"the run's base {name} is not here; it is the {portable} base, rebuilt from its settings",
                  file=sys.stderr)
            return resolve_base(portable, cache_dir)
        raise FileNotFoundError(f"the run's base folder {name} does not exist (the run config names a folder of the "
                                f"machine it was trained on). Pass base= (or --base): the Hub id or a local copy of "
                                f"that base")
    return name  # a Hub id: transformers finds it in the local Hub cache or downloads it


# -----------------------------------------------------------------------------
# loading a run

def run_folder(path_or_hub_id, revision=None, cache_dir=None):
    """A run folder on this machine: the folder itself, or the Hub repo's snapshot (downloaded
    through huggingface_hub, or found in its local cache when offline)."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if not HUB_ID.match(path_or_hub_id):
        raise FileNotFoundError(f"{path_or_hub_id} is not a folder (a train.py run or a saved model) and not a Hub id")
    try:
        return snapshot_download(path_or_hub_id, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # not found, gated, offline and not cached: huggingface_hub's own error says which
        raise FileNotFoundError(f"{path_or_hub_id} is not a folder here, and as a Hub id it could not be fetched "
                                f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


def trained_cache_dir(run):
    """The --cache-dir the run was trained with, when that folder exists here (the tiny / small
    world it built is there)."""
    recorded = (run.get("train") or {}).get("cache_dir")
    return recorded if recorded and os.path.isdir(recorded) else None


def torch_dtype(dtype, device):
    """None, a torch dtype, or a name (float32, float16, bfloat16, auto = float16 on GPU, float32 on CPU)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    names = dict(float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16)
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: expected a torch dtype or one of auto, {', '.join(names)}")
    return names[dtype]


def check_expected_class(run, where, expect):
    """The class a caller asked through (CARPE.from_pretrained on a LEVI run) must be the run's."""
    method = run.get("method", "carpe")
    if method not in METHOD_CLASSES:
        raise ValueError(f"{where}: unknown method {method!r} in its run config; expected one of {METHODS}")
    cls = METHOD_CLASSES[method]
    if expect is not None and not issubclass(cls, expect):
        raise TypeError(f"{where} is a {method!r} run (a {cls.__name__}), not a {expect.__name__}: load it with "
                        f"{cls.__name__}.from_pretrained(...) or pretrained.load(...), which returns what the run holds")


def load_run(path, device="cpu", dtype=None, base=None, cache_dir=None, revision=None):
    """common.load_run with the base resolved (preset names, Hub ids, moved folders) and the run
    itself from a folder or a Hub id. -> (model, processor, image_transform)."""
    model = load(path, device=device, dtype=dtype, base=base, cache_dir=cache_dir, revision=revision)
    return model, model.processor, model.image_transform


def load(path_or_hub_id, device="cpu", dtype=None, expect=None, base=None, cache_dir=None, revision=None):
    """A ready model from a run folder or a Hub id: CARPE, CARPE-MoE or a baseline, as trained,
    in eval mode, with .processor, .image_transform, .template, .run_config and .run_dir attached.
    expect: the class asked through (X.from_pretrained); a run of another class is refused.
    base: load on this base (a Hub id, folder or preset name) instead of the run config's.
    cache_dir: where the tiny / small worlds live (default: the run's own, else the repo's .cache/)."""
    folder = run_folder(path_or_hub_id, revision)
    run = common.read_run_config(folder)
    check_expected_class(run, path_or_hub_id, expect)
    base_dir = resolve_base(base or run["base"], cache_dir or trained_cache_dir(run))
    model, processor, image_transform = common.load_run(folder, device=device, dtype=torch_dtype(dtype, device),
                                                        base=base_dir)
    model.processor, model.image_transform = processor, image_transform
    model.template = run.get("template", "vicuna_v1")
    model.run_config, model.run_dir = run, folder
    return model


# -----------------------------------------------------------------------------
# asking: eval.py's prompts and pixels, one call

@dataclass
class AskOutput:
    """ask(..., return_dict=True). Lists for a batch, one value for a single question."""
    answer: str | list
    context_weights: tuple | list  # (vision, language)
    route: str | list | None  # CARPE-MoE: the chosen expert's name (None without experts or image)


def attached(model, name):
    value = getattr(model, name, None)
    if value is None:
        raise AttributeError(f"ask needs model.{name}: load the model with pretrained.load(...) / "
                             f"X.from_pretrained(...), or set .processor, .image_transform and .template yourself")
    return value


def conversation_tokenizer(model):
    """The training tokenizer of the run's template (data.ConversationTokenizer), no length cut:
    ask checks the length against the model's positions itself."""
    processor = attached(model, "processor")
    tokenizer = processor.tokenizer
    return ConversationTokenizer(tokenizer, n_image_tokens(processor), tokenizer.convert_tokens_to_ids(IMAGE_TAG),
                                 model_max_length=sys.maxsize, template=attached(model, "template"))


def prompt_ids(conversation, question, has_image, history=()):
    """The generation prompt's ids. Without history: encode_prompt, eval.py's prompt. With
    history [(question, answer), ...] (the image in the first turn): the ids training gives the
    whole conversation, cut before the first supervised token of the last answer."""
    if not history:
        return conversation.encode_prompt(question, has_image=has_image)
    turns = [text for pair in history for text in pair] + [question, "placeholder"]
    if has_image:
        turns[0] = IMAGE_TAG + turns[0]  # training's move_image_tag_first puts it at the turn's start
    ids, labels, _ = conversation(turns, sample_id="ask")
    start = len(labels)
    while start > 0 and labels[start - 1] == IGNORE_INDEX:  # past any unsupervised tail
        start -= 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:  # back to the last answer's first token
        start -= 1
    return ids[:start]


def as_image(image, where):
    """A PIL image, a path or raw bytes -> an RGB PIL image through data.load_image, the decoder
    of training and eval.py (16-bit and float modes scaled, alpha dropped, as they are there)."""
    if image is None:
        return None
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, (Image.Image, str, bytes, dict)):
        raise TypeError(f"{where}: expected a PIL image, a path, bytes or None, got {type(image).__name__}")
    return load_image(image, where)


def to_device(pixel_values, device, dtype):
    if isinstance(pixel_values, dict):  # CARPE-MoE: one tensor per expert
        return {k: v.to(device=device, dtype=dtype) for k, v in pixel_values.items()}
    return pixel_values.to(device=device, dtype=dtype)


def ask(model, image, question, max_new_tokens=64, return_dict=False, history=None):
    """Greedy answer(s) of a loaded model. image: a PIL image, a path or None (text only); question:
    a str. A batch: a list of images and a list of questions (history then a list per item).
    history: earlier (question, answer) turns of the same conversation, the image in the first.
    -> str (a list for a batch), or AskOutput with the (vision, language) weights and MoE route."""
    batched = isinstance(question, (list, tuple))
    if batched != isinstance(image, (list, tuple)):
        raise TypeError("ask: give one image and one question, or a list of each")
    images, questions = (list(image), list(question)) if batched else ([image], [question])
    histories = (list(history) if history is not None else [None] * len(questions)) if batched else [history]
    if not (len(images) == len(questions) == len(histories)):
        raise ValueError(f"ask: {len(images)} images, {len(questions)} questions and {len(histories)} histories")
    if not questions:
        return AskOutput([], [], []) if return_dict else []
    conversation = conversation_tokenizer(model)
    tokenizer = conversation.tokenizer
    pils = [as_image(im, f"image {n}") for n, im in enumerate(images)]
    rows = [prompt_ids(conversation, q, im is not None, h or ()) for q, im, h in zip(questions, pils, histories)]
    positions = model.llava.config.text_config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > positions:
        raise ValueError(f"ask: a prompt of {longest} tokens + {max_new_tokens} new tokens > the model's {positions} "
                         f"positions; shorten the question or the history, or lower max_new_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # as eval.py
    input_ids, attention_mask = small.left_pad(rows, pad_id)  # (B, T), left-padded for generate()
    device = model.llava.lm_head.weight.device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    with_image = [im for im in pils if im is not None]  # pixel_values: the images in batch order
    pixel_values = to_device(attached(model, "image_transform")(with_image), device, dtype) if with_image else None
    out = model.generate(input_ids.to(device), attention_mask.to(device), pixel_values, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, return_dict=True)
    answers = [a.strip() for a in tokenizer.batch_decode(out.sequences[:, input_ids.size(1):], skip_special_tokens=True)]
    if not return_dict:
        return answers if batched else answers[0]
    weights = [tuple(w) for w in out.context_weights.float().cpu().tolist()]
    names = getattr(getattr(model, "vision_moe", None), "expert_names", None)
    routes = [names[r] if names and r >= 0 else None for r in out.route.cpu().tolist()] if out.route is not None \
        else [None] * len(answers)  # -1: a sample without image
    if batched:
        return AskOutput(answers, weights, routes)
    return AskOutput(answers[0], weights[0], routes[0])


# -----------------------------------------------------------------------------
# a portable, shareable folder

def run_config_of(model, base=None, method=None, template=None):
    """The run config to save: the loaded run's own, or one described from the model (then `base`
    is required), its base made portable (a preset name or Hub id, never a cache path)."""
    run = dict(getattr(model, "run_config", None) or {})
    if not run:
        if base is None:
            raise ValueError("save_pretrained: this model was not loaded from a run; pass base= (the Hub id, folder "
                             "or 'preset:tiny' / 'preset:small' it was built on)")
        by_class = {cls: name for name, cls in METHOD_CLASSES.items() if name != "imagenet-ft"}
        vision_moe = getattr(model, "vision_moe", None)
        config = getattr(model, "config", None)
        run = dict(method=method or by_class.get(type(model), "carpe"), base=base,
                   template=template or getattr(model, "template", None) or "vicuna_v1",
                   carpe=config.to_dict() if hasattr(config, "to_dict") else None,
                   moe=vision_moe.config.to_dict() if vision_moe is not None else None, train={})
    if base is not None:
        run["base"] = base
    if template is not None:
        run["template"] = template
    if method is not None:
        run["method"] = method
    run["base"] = portable_base(run["base"])
    if (run.get("train") or {}).get("base"):  # train.py's flags repeat the base
        run["train"] = dict(run["train"], base=portable_base(run["train"]["base"]))
    if os.path.isabs(run["base"]):
        print(f"save_pretrained: the base {run['base']} is a folder of this machine; the saved run loads elsewhere "
              f"only with base= (pass base='<hub id>' here to name it portably)", file=sys.stderr)
    return run


KNOWN_DATASETS = {"llava_v1_5_mix665k.json": "liuhaotian/LLaVA-Instruct-150K",
                  "llava_instruct_150k.json": "liuhaotian/LLaVA-Instruct-150K"}
METHOD_TEXT = {
    "carpe": "**CARPE** (Context-Aware Image Representation Prioritization via Ensemble) wraps the base LLaVA-1.5 "
             "with a vision integrator (raw vision features through an MLP adapter, cross-attention with queries from "
             "the LLM's hidden states, causal self-attention, MLP), a 1-token context prompt and a linear context "
             "encoder whose softmax weights (vision, language) mix the integrator's logits with the LLM's through the "
             "shared head.",
    "levi": "**LEVI** (Roh et al. 2024, as the CARPE paper adapts it): five adapting blocks on the LLM's last five "
            "layers read the projector's output; their mean goes through the shared head instead of the LLM's states.",
    "imagenet-ft": "**ImageNet fine-tune** (Zhang et al. 2024): vanilla LLaVA-1.5 with its projector trained on "
                   "classification prompts.",
    "llava": "**Vanilla LLaVA-1.5** behind CARPE's API (no added modules).",
}


def card_front_matter(run):
    base, train = run["base"], run.get("train") or {}
    tags = ["carpe", "llava", "vision-language", "multimodal", run.get("method", "carpe")]
    if run.get("moe"):
        tags.append("mixture-of-experts")
    if base.startswith(PRESET_PREFIX):
        tags.append(base.replace(":", "-"))
    datasets = [KNOWN_DATASETS[os.path.basename(train["data"])]] \
        if train.get("data") and os.path.basename(train["data"]) in KNOWN_DATASETS else []
    if train.get("imagenet") and not base.startswith(PRESET_PREFIX):
        datasets.append("ILSVRC/imagenet-1k")
    return ModelCardData(base_model=base if HUB_ID.match(base) else None, library_name="carpe", tags=tags,
                         datasets=datasets or None, pipeline_tag="image-text-to-text").to_yaml()


def eval_section(eval_dirs):
    """Markdown lines: each benchmark's headline and mean (vision, language) weights."""
    lines = []
    for d in eval_dirs:
        scores, weights = read_eval_dir(d)
        if not scores:
            continue
        lines += [f"Measured by `eval.py` ({os.path.basename(os.path.normpath(d))}/):", "",
                  "| benchmark | score | (vision, language) |", "|---|---|---|"]
        for bench, score in scores.items():
            w = weights.get(bench)
            name = BENCHMARKS[bench].display if bench in BENCHMARKS else bench
            lines.append(f"| {name} | {score:.2f} | " + (f"({w[0]:.2f}, {w[1]:.2f})" if w else "-") + " |")
        lines.append("")
    return lines or ["No eval folder next to the run (evaluate with `python eval.py --bench all --ckpt RUN`).", ""]


RECIPE_KEYS = ("preset", "epochs", "max_steps", "batch_size", "micro_batch_size", "lr_adapter", "lr", "mix", "closed_k",
               "model_max_length", "warmup_ratio", "seed", "fsdp")


def model_card(run, name, eval_dirs):
    """README.md: Hugging Face front matter, the method, the recipe, the metrics, how to load it."""
    method, base, train = run.get("method", "carpe"), run["base"], run.get("train") or {}
    title = "CARPE-MoE" if run.get("moe") else {"carpe": "CARPE", "levi": "LEVI", "llava": "LLaVA-1.5",
                                                "imagenet-ft": "ImageNet-FT"}.get(method, method)
    base_text = (f"the `{base[len(PRESET_PREFIX):]}` preset's base (rebuilt by this repository's "
                 f"`{base[len(PRESET_PREFIX):]}.py` on first use)" if base.startswith(PRESET_PREFIX) else f"`{base}`")
    lines = ["---", card_front_matter(run).strip(), "---", "", f"# {name}: {title} on {base.removeprefix(PRESET_PREFIX)}", "",
             f"Trained with the CARPE reference implementation (`train.py`, method `{method}`) on {base_text}, "
             f"conversation template `{run.get('template', 'vicuna_v1')}`. This folder holds only the trained tensors "
             f"(`model.safetensors`); the base is loaded from its own source.", "", METHOD_TEXT.get(method, ""), ""]
    if run.get("moe"):
        experts = ", ".join(e.get("name", "?") for e in run["moe"].get("experts", []))
        lines += [f"CARPE-MoE: experts {experts}, one chosen per sample by a top-1 router on the context prompt.", ""]
    lines += ["## How to load", "", "In a clone of the CARPE reference implementation (`pip install -r requirements.txt`):",
              "", "```python", "from pretrained import load", "", f'model = load("{name}")   # a folder or a Hub id',
              'print(model.ask("image.jpg", "What is in this image?"))',
              'out = model.ask("image.jpg", "What is in this image?", return_dict=True)   # + (vision, language) weights',
              "```", "", f"Chat: `python chat.py --ckpt {name} --image image.jpg`. "
              f"Evaluate: `python eval.py --bench all --ckpt {name}` (a Hub id: download it first).", "",
              "## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {train[k]} |" for k in RECIPE_KEYS if train.get(k) is not None]
    if run.get("carpe"):
        lines += [f"| carpe.{k} | {v} |" for k, v in run["carpe"].items() if v is not None]
    lines += ["", "## Evaluation", ""] + eval_section(eval_dirs)
    lines += ["## Files", "", "`model.safetensors` (trainable tensors), `run_config.json` (method, base, template, "
              "model and training settings), `manifest.json` (their sha256, checked at load), and when present "
              "`log.jsonl` (every training step) and `eval/<bench>/metrics.json`.", ""]
    return "\n".join(lines)


def copy_eval_metrics(eval_dir, folder):
    """eval/<bench>/metrics.json (+ summary.md / .json) of an eval folder into folder/eval/."""
    copied = False
    for bench in BENCHMARKS:
        src = os.path.join(eval_dir, bench, "metrics.json")
        if os.path.isfile(src):
            os.makedirs(os.path.join(folder, "eval", bench), exist_ok=True)
            shutil.copy(src, os.path.join(folder, "eval", bench, "metrics.json"))
            copied = True
    for name in ("summary.md", "summary.json"):
        if copied and os.path.isfile(os.path.join(eval_dir, name)):
            shutil.copy(os.path.join(eval_dir, name), os.path.join(folder, "eval", name))
    return copied


def same_folder(a, b):
    return a is not None and os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def save_pretrained(model, folder, base=None, method=None, template=None, eval_dirs=None, name=None, overwrite=False):
    """Write `model` as a portable run folder (see the module docstring) -> folder. base / method /
    template: override the loaded run's (required for a model not loaded from a run: base). eval_dirs:
    eval folders whose metrics go into the card and folder/eval/ (default: the source run's eval/).
    name: what the card's title and load line name (default: the folder's name). A folder already holding a run is
    refused unless overwrite."""
    run = run_config_of(model, base, method, template)
    source = getattr(model, "run_dir", None)
    in_place = same_folder(source, folder)
    if os.path.isdir(folder) and common.is_run_dir(folder) and not (overwrite or in_place):
        raise FileExistsError(f"save_pretrained: {folder} already holds a run; pass overwrite=True or another folder")
    os.makedirs(folder, exist_ok=True)
    common.save_run(folder, common.gather_trainable(model), run)
    if source and not in_place:
        for file in COPIED_FILES:
            if os.path.isfile(os.path.join(source, file)):
                shutil.copy(os.path.join(source, file), os.path.join(folder, file))
    if eval_dirs is None:
        eval_dirs = [os.path.join(source, "eval")] if source and os.path.isdir(os.path.join(source, "eval")) else []
    if not in_place:
        eval_dirs = [d for d in eval_dirs if copy_eval_metrics(d, folder)]
    with open(os.path.join(folder, CARD), "w") as f:
        f.write(model_card(run, name or os.path.basename(os.path.normpath(folder)), eval_dirs))
    return folder


def push_to_hub(model, repo_id, private=None, token=None, commit_message="Upload CARPE run", **save_kwargs):
    """save_pretrained into a temporary folder, then create the repo (if needed) and upload the
    folder through huggingface_hub. -> the commit's info."""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, name=repo_id, **save_kwargs)
        create_repo(repo_id, private=private, token=token, exist_ok=True)
        return upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, token=token)
