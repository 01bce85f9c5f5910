"""
eval.py: evaluate CARPE, CARPE-MoE and the baselines on the paper's 11 benchmarks, with each
benchmark's official scoring rule, greedy cached batched generation, resumable runs, sharding
under torchrun, and the paper's Tables 2-4.

    python eval.py --bench all --ckpt runs/carpe                  # a train.py run dir (CARPE, MoE, baselines)
    python eval.py --bench vl --method llava --preset llava-7b    # vanilla LLaVA-1.5-7B, no CARPE modules
    python eval.py --bench cls --wise-ft BASE_DIR FT_DIR --alpha 0.5   # WiSE-FT
    torchrun --nproc_per_node 8 eval.py --bench all --ckpt runs/carpe  # sharded, gathered on rank 0
    python eval.py --table runs/llava/eval runs/carpe/eval          # one Markdown table, a row per dir

Outputs under <out>/<bench>/ (default <out> = <ckpt>/eval, or runs/eval-<method>):
  predictions.jsonl  one line per item, appended (and flushed) after every batch; a rerun skips
                     the ids already there, so a crash loses at most one batch. Under torchrun each
                     rank appends to predictions.rank<r>.jsonl, and rank 0 merges them at the end.
  metrics.json       headline + sub-scores, mean (vision, language) context weights (Table 4) and,
                     for CARPE-MoE, the routing histogram.
  run.json           what produced the predictions; a rerun with another model or prompt setting
                     into the same folder is refused instead of mixing predictions.
and <out>/summary.md (+ summary.json): Tables 2 / 3 / 4 in the paper's layout for every bench there.

Benchmarks, data layout under --data-root (LLaVA's playground/data/eval layout where LLaVA has one):
  imagenet     imagenet/val/<class folder>/*.JPEG   + imagenet/classnames.txt (or .json)
  caltech101   caltech101/test/<class folder>/*     + caltech101/classnames.txt (optional)
  flowers102   flowers102/test/<class folder>/*     + flowers102/classnames.txt
  food101      food101/test/<class folder>/*        + food101/classnames.txt (optional)
               (split folder: the first of test/, val/ that exists; classnames.txt has one name per
               line in the sorted order of the class folders, classnames.json maps folder -> name;
               without either, the folder name with "_" -> " " is the class name)
  sqa          scienceqa/llava_test_CQM-A.json + scienceqa/images/test/ (+ optional problems.json)
  textvqa      textvqa/llava_textvqa_val_v051_ocr.jsonl + textvqa/TextVQA_0.5.1_val.json + textvqa/train_images/
  pope         pope/coco/coco_pope_{adversarial,popular,random}.json + pope/val2014/
  mme          MME/MME_Benchmark_release_version/<subtask>/ (images + question txt files, as released)
  mmbench      mmbench/mmbench_dev_20230712.tsv (base64 images)
  cvbench      cvbench/test_2d.jsonl + cvbench/test_3d.jsonl (or test.jsonl) + cvbench/img/
               (the parquet release is read only when pyarrow is installed)
  mmvp         MMVP/Questions.csv + "MMVP/MMVP Images/<index>.jpg"

Scoring (one pure function per benchmark; we follow LLaVA's official eval scripts and each
benchmark's own rules, not lmms-eval, so the numbers compare with the paper's LLaVA-1.5 rows):
  classification  Zhang et al. 2024: the lower-cased label is a substring of the lower-cased answer
                  (--match exact: the answer, stripped of trailing punctuation, equals the label).
  sqa             LLaVA's letter parser: a bare letter, "X. ...", or "The answer is X"; else wrong.
                  Accuracy over the items with an image (SQA-IMG).
  textvqa         VQA answer normalisation (punctuation, number words -> digits, articles,
                  contractions) and soft accuracy min(1, #matches / 3) averaged over the 10
                  leave-one-out subsets of the 10 human answers.
  pope            "no" if the first sentence contains the word no / not / No, else "yes";
                  headline = mean F1 over the 3 splits; accuracy, precision, recall, yes-ratio too.
  mme             yes/no read from the answer's first 4 characters; per subtask 100*acc + 100*acc+
                  (acc+ = both questions of an image right); P = 10 perception subtasks,
                  C = 4 cognition subtasks; headline P+C.
  mmbench         circular: the dev TSV's copies (index + k*1e6) are rotations of one question;
                  without copies in the file we make the rotations ourselves. The letter is read by
                  rules (option letter, then a unique option-text match; no GPT grader); a question
                  counts when all its rotations are right.
  cvbench         accuracy per source; headline ((ADE20K + COCO)/2 + Omni3D)/2.
  mmvp            letter or option text by rules; headline = share of the 150 pairs with both right.

Choices where the issue and DESIGN.md are silent:
  - Prompts: vicuna_v1 (data.vicuna_prompt). Classification: "What type of object is in this
    photo?" (+ ' Choose one from "<labels shuffled per item, seeded by its id>".' when closed).
    SQA / MMBench / CV-Bench / MMVP end with "Answer with the option's letter from the given
    choices directly."; TextVQA / POPE / MME with "Answer the question using a single word or
    phrase." (both as LLaVA-1.5's eval does; never appended twice). MMVP options go one per line
    as "(a) ...".
  - Items are batched in dataset order after the finished ones are removed; whole batches are
    dealt to ranks round-robin, so a sharded run sees the same batches as a single process.
  - --limit N keeps the first N items in file order (for MMBench: N whole circular groups are
    not guaranteed; use it for smoke tests only).
  - WiSE-FT (--wise-ft A B --alpha a) accepts, for A and B alike: a train.py run dir (its
    model.safetensors: the trainable tensors), an HF model dir (model.safetensors or *.safetensors
    shards, with or without model.safetensors.index.json), or a tiny-base dir
    (carpe.save_tiny_base). Both must have the same tensor names and shapes, else the error names
    the first tensor that differs. The merge runs on CPU one shard at a time:
    (1 - a) * A + a * B in fp32, cast back to A's dtype (so a = 0 / 1 give A / B exactly); the
    merged copy of A's folder goes to <out>/wise_ft_weights/ and is loaded from there.
    One pairing of kinds is allowed: a base (HF id / dir / tiny-base dir) with a run dir trained
    from it. The base side is then the base's own values of the run's trainable tensors (for an
    imagenet-ft run, the base projector), written to <out>/wise_ft_base_side/. So
    `--wise-ft llava-hf/llava-1.5-7b-hf runs/imagenet-ft --alpha 0.5` is the paper's WiSE-FT
    row made from our own ImageNet fine-tune.
  - The paper's Table 2/3 averages are its rows' means truncated (not rounded) to one decimal
    (CARPE 45.48 -> 45.4, SPHINX 69.47 -> 69.4); our tables round.
"""
import argparse
import base64
import csv
import glob
import io
import json
import math
import os
import random
import re
import shutil
import string
import sys
from dataclasses import dataclass, asdict

import torch
from PIL import Image
from tqdm import tqdm

import carpe
from data import ConversationTokenizer, vicuna_prompt, n_image_tokens

CLS_BENCHES = ("imagenet", "caltech101", "flowers102", "food101")
VL_BENCHES = ("sqa", "textvqa", "pope", "mme", "mmbench", "cvbench", "mmvp")
BENCH_GROUPS = {"cls": CLS_BENCHES, "vl": VL_BENCHES, "all": CLS_BENCHES + VL_BENCHES}
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
OPEN_WORLD_QUESTION = "What type of object is in this photo?"
POPE_SPLITS = ("adversarial", "popular", "random")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PRESETS = {  # defaults a preset fills in when the flag is not given
    "tiny": dict(base="tiny", data_root="runs/tiny-eval-data", batch_size=4, max_new_tokens=8, workers=0, dtype="float32"),
    "llava-7b": dict(base="llava-hf/llava-1.5-7b-hf", data_root="playground/data/eval", batch_size=16,
                     max_new_tokens=None, workers=4, dtype="auto"),
}
MAX_NEW_TOKENS = {  # per-bench default when neither --max-new-tokens nor the preset fixes it
    "imagenet": 64, "caltech101": 64, "flowers102": 64, "food101": 64, "sqa": 32, "textvqa": 32,
    "pope": 16, "mme": 16, "mmbench": 32, "cvbench": 32, "mmvp": 32,
}


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# data readers: each returns a list of items dict(id, question, image, meta). `image` is a
# file path or {"b64": str} / {"bytes": bytes}; `meta` holds what the scorer needs and is
# copied into predictions.jsonl, so scoring reads the predictions file alone.

def require(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: expected {path} (see the data layout in eval.py's docstring / the README)")
    return path


def read_json_or_jsonl(path):
    """A .json that holds one JSON document, or one object per line (POPE's files are the latter)."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def class_names(bench_dir, folders):
    """Folder -> class name from classnames.json ({folder: name}) or classnames.txt (one name per line,
    in sorted folder order); else the folder name with underscores as spaces."""
    json_path, txt_path = os.path.join(bench_dir, "classnames.json"), os.path.join(bench_dir, "classnames.txt")
    if os.path.exists(json_path):
        with open(json_path) as f:
            mapping = json.load(f)
        missing = [d for d in folders if d not in mapping]
        if missing:
            raise ValueError(f"{json_path} has no name for class folders {missing[:5]}")
        return {d: mapping[d] for d in folders}
    if os.path.exists(txt_path):
        with open(txt_path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{txt_path} lists {len(names)} class names but there are {len(folders)} class folders")
        return dict(zip(folders, names))
    return {d: d.replace("_", " ") for d in folders}


def classification_question(labels, world, item_id):
    if world == "open":
        return OPEN_WORLD_QUESTION
    shuffled = list(labels)
    random.Random(item_id).shuffle(shuffled)  # per-item order, the same on every rank and rerun
    return f'{OPEN_WORLD_QUESTION} Choose one from "{", ".join(shuffled)}".'


def read_classification(root, bench, world="open"):
    bench_dir = require(os.path.join(root, bench), f"{bench} (an ImageFolder)")
    split_dir = next((os.path.join(bench_dir, s) for s in ("test", "val") if os.path.isdir(os.path.join(bench_dir, s))), None)
    if split_dir is None:
        raise FileNotFoundError(f"{bench}: expected a split folder {bench_dir}/test/ or {bench_dir}/val/ "
                                f"holding one folder of images per class")
    folders = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not folders:
        raise FileNotFoundError(f"{bench}: {split_dir} has no class folders")
    names = class_names(bench_dir, folders)
    labels = sorted(set(names.values()))
    items = []
    for folder in folders:
        for fname in sorted(os.listdir(os.path.join(split_dir, folder))):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                item_id = f"{folder}/{fname}"
                items.append(dict(id=item_id, question=classification_question(labels, world, f"{bench}/{item_id}"),
                                  image=os.path.join(split_dir, folder, fname), meta=dict(label=names[folder])))
    return items


def with_suffix(text, suffix):
    text = text.strip()
    return text if text.endswith(suffix) else f"{text}\n{suffix}"


def read_sqa(root):
    base = os.path.join(root, "scienceqa")
    questions = read_json_or_jsonl(require(os.path.join(base, "llava_test_CQM-A.json"), "ScienceQA questions"))
    image_dir = require(os.path.join(base, "images", "test"), "ScienceQA test images")
    problems_path = os.path.join(base, "problems.json")
    problems = json.load(open(problems_path)) if os.path.exists(problems_path) else None
    items = []
    for q in questions:
        if "image" not in q:
            continue  # SQA-IMG: the items with an image
        text = q["conversations"][0]["value"].replace("<image>", "").strip()
        n_options = sum(1 for line in text.split("\n") if re.match(r"^[A-E]\. ", line))
        if problems is not None and str(q["id"]) in problems:
            gt = "ABCDE"[problems[str(q["id"])]["answer"]]
        else:
            gt = parse_sqa_letter(q["conversations"][1]["value"], max(n_options, 1))
            if gt is None:
                raise ValueError(f"ScienceQA item {q['id']}: cannot read the answer letter from "
                                 f"{q['conversations'][1]['value']!r} (and no problems.json in {base})")
        items.append(dict(id=str(q["id"]), question=with_suffix(text, LETTER_ANSWER),
                          image=os.path.join(image_dir, q["image"]), meta=dict(gt=gt, n_options=n_options)))
    return items


def textvqa_question(prompt):
    """The bare question inside LLaVA's TextVQA prompt (the lines are the question, the reference
    OCR tokens and the answer instruction, in some order)."""
    lines = [l for l in prompt.split("\n") if l.strip() and not l.startswith("Reference OCR token:") and l.strip() != SHORT_ANSWER]
    return lines[0].strip() if lines else prompt.strip()


def read_textvqa(root):
    base = os.path.join(root, "textvqa")
    lines = read_json_or_jsonl(require(os.path.join(base, "llava_textvqa_val_v051_ocr.jsonl"), "TextVQA questions"))
    with open(require(os.path.join(base, "TextVQA_0.5.1_val.json"), "TextVQA annotations")) as f:
        annotations = json.load(f)["data"]
    image_dir = require(os.path.join(base, "train_images"), "TextVQA images")
    by_image_question = {(str(a["image_id"]), a["question"].lower()): a for a in annotations}
    by_qid = {str(a["question_id"]): a for a in annotations}
    items = []
    for n, line in enumerate(lines):
        question = textvqa_question(line["text"]).lower()
        image_stem = os.path.splitext(line["image"])[0]
        ann = (by_image_question.get((str(line["question_id"]), question))  # LLaVA's key
               or by_image_question.get((image_stem, question)) or by_qid.get(str(line["question_id"])))
        if ann is None:
            raise ValueError(f"TextVQA line {n + 1} (question_id {line['question_id']}, image {line['image']}): "
                             f"no annotation for it in TextVQA_0.5.1_val.json")
        items.append(dict(id=f"{n}:{line['question_id']}", question=with_suffix(line["text"], SHORT_ANSWER),
                          image=os.path.join(image_dir, line["image"]), meta=dict(answers=ann["answers"])))
    return items


def read_pope(root):
    base = os.path.join(root, "pope")
    image_dir = require(os.path.join(base, "val2014"), "POPE (COCO val2014) images")
    items = []
    for split in POPE_SPLITS:
        rows = read_json_or_jsonl(require(os.path.join(base, "coco", f"coco_pope_{split}.json"), f"POPE {split} split"))
        for row in rows:
            items.append(dict(id=f"{split}/{row['question_id']}", question=with_suffix(row["text"], SHORT_ANSWER),
                              image=os.path.join(image_dir, row["image"]),
                              meta=dict(split=split, label=row["label"].strip().lower())))
    return items


def find_image(folder, stem):
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        path = os.path.join(folder, stem + ext)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"MME: no image {stem}.* in {folder}")


def read_mme(root):
    base = require(os.path.join(root, "MME", "MME_Benchmark_release_version"), "MME release folder")
    items = []
    for subtask in MME_PERCEPTION + MME_COGNITION:
        folder = require(os.path.join(base, subtask), f"MME subtask {subtask}")
        qa_dir = os.path.join(folder, "questions_answers_YN")
        if os.path.isdir(qa_dir):  # artwork, celebrity, landmark, posters, scene
            txt_files, image_dir = sorted(glob.glob(os.path.join(qa_dir, "*.txt"))), os.path.join(folder, "images")
        else:
            txt_files, image_dir = sorted(glob.glob(os.path.join(folder, "*.txt"))), folder
        if not txt_files:
            raise FileNotFoundError(f"MME subtask {subtask}: no question files (*.txt) in {qa_dir if os.path.isdir(qa_dir) else folder}")
        for txt in txt_files:
            stem = os.path.splitext(os.path.basename(txt))[0]
            image = find_image(image_dir, stem)
            with open(txt) as f:
                rows = [line.rstrip("\n") for line in f if line.strip()]
            for k, row in enumerate(rows):
                if "\t" not in row:
                    raise ValueError(f"{txt}: line {k + 1} is not 'question<TAB>answer'")
                question, answer = row.rsplit("\t", 1)
                image_key = f"{subtask}/{os.path.basename(image)}"
                items.append(dict(id=f"{image_key}/{k}", question=with_suffix(question, SHORT_ANSWER), image=image,
                                  meta=dict(subtask=subtask, image=image_key, gt=answer.strip().lower())))
    return items


def is_missing(value):
    return value is None or str(value).strip() == "" or str(value).strip().lower() == "nan"


def read_mmbench(root):
    path = require(os.path.join(root, "mmbench", "mmbench_dev_20230712.tsv"), "MMBench dev TSV")
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for col in ("index", "question", "answer", "image", "A", "B"):
        if rows and col not in rows[0]:
            raise ValueError(f"{path}: no column {col!r} (columns: {list(rows[0])})")
    image_of = {int(r["index"]): r["image"] for r in rows}
    has_copies = any(int(r["index"]) >= 1_000_000 for r in rows)
    items = []
    for r in rows:
        index = int(r["index"])
        image = r["image"]
        if len(image) < 64 and image.strip().isdigit():  # a copy that points at another row's image
            image = image_of[int(image)]
        options = [(L, r[L].strip()) for L in "ABCDE" if L in r and not is_missing(r[L])]
        texts = [t for _, t in options]
        answer_text = dict(options)[r["answer"].strip()]
        hint = None if is_missing(r.get("hint")) else r["hint"].strip()
        rotations = [0] if has_copies else range(len(options))
        for rot in rotations:
            rotated = texts[rot:] + texts[:rot]
            letters = "ABCDE"[:len(rotated)]
            question = (f"{hint}\n" if hint else "") + r["question"].strip()
            question += "".join(f"\n{L}. {t}" for L, t in zip(letters, rotated))
            gt = letters[rotated.index(answer_text)]
            items.append(dict(id=str(index) if has_copies else f"{index}/r{rot}", question=f"{question}\n{LETTER_ANSWER}",
                              image={"b64": image},
                              meta=dict(group=index % 1_000_000, gt=gt, options=dict(zip(letters, rotated)),
                                        category=r.get("category"))))
    return items


def read_cvbench(root):
    base = require(os.path.join(root, "cvbench"), "CV-Bench folder")
    files = [p for p in (os.path.join(base, "test.jsonl"),) if os.path.exists(p)] or \
        [p for p in (os.path.join(base, "test_2d.jsonl"), os.path.join(base, "test_3d.jsonl")) if os.path.exists(p)]
    if files:
        rows = [row for p in files for row in read_json_or_jsonl(p)]
        image_of = lambda row: os.path.join(base, row["filename"])
    else:
        parquet = sorted(glob.glob(os.path.join(base, "test_*d.parquet"))) or sorted(glob.glob(os.path.join(base, "test.parquet")))
        if not parquet:
            raise FileNotFoundError(f"CV-Bench: expected {base}/test_2d.jsonl and {base}/test_3d.jsonl (or test.jsonl) "
                                    f"with the images under {base}/img/, or the parquet release")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"CV-Bench: only the parquet release is in {base}, and reading it needs pyarrow "
                              f"(pip install pyarrow), or put test_2d.jsonl / test_3d.jsonl and img/ there") from None
        rows = [row for p in parquet for row in pq.read_table(p).to_pylist()]
        image_of = lambda row: {"bytes": row["image"]["bytes"]}
    items = []
    for row in rows:
        gt = row["answer"].strip().strip("()").upper()
        letters = "ABCDEF"[:len(row["choices"])]
        items.append(dict(id=f"{row.get('type', '')}/{row['idx']}", question=with_suffix(row["prompt"], LETTER_ANSWER),
                          image=image_of(row),
                          meta=dict(source=row["source"], gt=gt, options=dict(zip(letters, map(str, row["choices"]))),
                                    task=row.get("task"))))
    return items


def read_mmvp(root):
    base = os.path.join(root, "MMVP")
    path = require(os.path.join(base, "Questions.csv"), "MMVP questions")
    image_dir = require(os.path.join(base, "MMVP Images"), "MMVP images")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], [r for r in rows[1:] if r]
    col = {name.strip().lower(): i for i, name in enumerate(header)}
    for name in ("question", "options", "correct answer"):
        if name not in col:
            raise ValueError(f"{path}: no column {name!r} (header {header})")
    items = []
    for r in rows:
        index = int(r[0])  # the first column ("Index", spelled "lndex" in the release)
        options = re.findall(r"\(([a-zA-Z])\)\s*([^()]*?)\s*(?=\([a-zA-Z]\)|$)", r[col["options"]].strip())
        if len(options) < 2:
            raise ValueError(f"{path}: item {index}: cannot read the options from {r[col['options']]!r}")
        options = {L.upper(): t.strip() for L, t in options}
        question = r[col["question"]].strip() + "".join(f"\n({L.lower()}) {t}" for L, t in options.items())
        gt = r[col["correct answer"]].strip().strip("()").upper()
        items.append(dict(id=str(index), question=f"{question}\n{LETTER_ANSWER}",
                          image=os.path.join(image_dir, f"{index}.jpg"),
                          meta=dict(pair=(index - 1) // 2, gt=gt, options=options)))
    return items


def read_bench(bench, root, world="open"):
    if bench in CLS_BENCHES:
        return read_classification(root, bench, world)
    readers = dict(sqa=read_sqa, textvqa=read_textvqa, pope=read_pope, mme=read_mme, mmbench=read_mmbench,
                   cvbench=read_cvbench, mmvp=read_mmvp)
    return readers[bench](root)


def open_image(ref):
    if isinstance(ref, dict):
        raw = base64.b64decode(ref["b64"]) if "b64" in ref else ref["bytes"]
        return Image.open(io.BytesIO(raw)).convert("RGB")
    if not os.path.exists(ref):
        raise FileNotFoundError(f"image {ref} is missing")
    return Image.open(ref).convert("RGB")


# -----------------------------------------------------------------------------
# --preset tiny: small synthetic copies of every benchmark's release format, drawn with the
# shapes of data.py's synthetic set (so a tiny CARPE trained by train.py can score on them)

def build_tiny_benchmarks(root, seed=0, per_class=4, n_vl=6):
    """Write every benchmark's layout under root with a few synthetic items each."""
    import data
    rng = random.Random(seed)
    shapes, colours = sorted(data.SHAPES), list(data.COLOURS)
    positions = ["left", "center", "right"]

    def scene(shape=None, colour=None, count=None):
        shape, colour = shape or rng.choice(shapes), colour or rng.choice(colours)
        count = count or rng.choice([1, 1, 2, 3])
        image = data.draw_scene(rng, shape, colour, count, rng.choice(positions), 64, 48)
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


# -----------------------------------------------------------------------------
# answer parsers and scorers (pure functions of predictions records)

def parse_sqa_letter(text, n_options):
    """LLaVA's SQA rules: a bare letter, "X. ...", or "The answer is X"; else None (wrong)."""
    text = text.replace("\n", ". ").strip()
    letters = "ABCDE"[:n_options]
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    m = re.search(r"The answer is ([A-E])", text)
    if m and m.group(1) in letters:
        return m.group(1)
    return None


def extract_choice(text, options):
    """Rule-based option letter for multiple choice (MMBench, CV-Bench, MMVP); options: {letter: text},
    letters upper-case. First an option letter ("B", "(b)", "B.", "B) ...", "The answer is B"), then
    an option text found in the answer, when exactly one option matches; else None."""
    letters = set(options)
    s = text.strip()
    core = s.strip(string.punctuation + " ")
    if len(core) == 1 and core.upper() in letters:
        return core.upper()
    m = re.match(r"^\(?([A-Za-z])[.):](\s|$)", s) or \
        re.search(r"(?i:answer)(?: is)?:?\s*(?:\(([A-Za-z])\)|([A-Z])\b)", s)
    if m:
        letter = next(g for g in m.groups() if g and len(g) == 1 and g.strip()).upper()
        if letter in letters:
            return letter
    found = {L.upper() for L in re.findall(r"\(([A-Za-z])\)", s)} & letters
    if len(found) == 1:
        return found.pop()
    # capital letters standing alone as words, minus a sentence-initial article "A"
    body = re.sub(r"^A\s+(?=[a-z])", "", s)
    found = set(re.findall(r"\b([A-Z])\b", body)) & letters
    if len(found) == 1:
        return found.pop()
    low = s.lower()
    hits = [L for L, t in options.items() if t and t.lower() in low]
    return hits[0] if len(hits) == 1 else None


def score_classification(records, match="substring"):
    def correct(r):
        label, answer = r["label"].lower().strip(), r["answer"].lower().strip()
        if match == "exact":
            return answer.rstrip(string.punctuation + " ") == label
        return label in answer
    n_correct = sum(correct(r) for r in records)
    return dict(headline=100.0 * n_correct / max(len(records), 1), accuracy=100.0 * n_correct / max(len(records), 1),
                correct=n_correct, total=len(records), match=match)


def score_sqa(records):
    n_correct = sum(parse_sqa_letter(r["answer"], r["n_options"] or 5) == r["gt"] for r in records)
    acc = 100.0 * n_correct / max(len(records), 1)
    return dict(headline=acc, img_accuracy=acc, correct=n_correct, total=len(records))


# VQA answer normalisation (the rules of the official VQA / TextVQA evaluation)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                 "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                 "hed": "he'd", "hes": "he's", "id": "i'd", "im": "i'm", "ive": "i've", "isnt": "isn't",
                 "itd": "it'd", "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's",
                 "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
                 "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
                 "youre": "you're", "youve": "you've", "youll": "you'll", "shes": "she's", "weve": "we've"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def normalize_vqa_answer(text):
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # punctuation: dropped when it touches a space or sits in a number ("1,000"), else becomes a space
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(r"(\d)(,)(\d)", text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = re.sub(r"(?!<=\d)(\.)(?!\d)", "", text)  # periods that are not decimal points
    words = []
    for w in text.split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_accuracy(prediction, gt_answers):
    """min(1, #humans who gave this answer / 3), averaged over the leave-one-out subsets of the answers."""
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / max(len(scores), 1)


def score_textvqa(records):
    acc = 100.0 * sum(vqa_soft_accuracy(r["answer"], r["answers"]) for r in records) / max(len(records), 1)
    return dict(headline=acc, accuracy=acc, total=len(records))


def parse_pope_yes_no(text):
    """'no' when the first sentence has the word no / not / No, else 'yes' (LLaVA's POPE rule)."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds, labels):
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = max(len(preds), 1)
    return dict(f1=100 * f1, accuracy=100 * (tp + tn) / n, precision=100 * precision, recall=100 * recall,
                yes_ratio=100 * (tp + fp) / n, total=len(preds))


def score_pope(records):
    splits = {}
    for split in POPE_SPLITS:
        rs = [r for r in records if r["split"] == split]
        if rs:
            splits[split] = binary_metrics([parse_pope_yes_no(r["answer"]) for r in rs], [r["label"] for r in rs])
    mean = lambda key: sum(s[key] for s in splits.values()) / max(len(splits), 1)
    return dict(headline=mean("f1"), f1=mean("f1"), accuracy=mean("accuracy"), yes_ratio=mean("yes_ratio"), splits=splits)


def parse_mme_yes_no(text):
    """MME's rule: 'yes' / 'no' when the answer is that word, else read from its first 4 characters."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(records):
    subtasks = {}
    for name in MME_PERCEPTION + MME_COGNITION:
        rs = [r for r in records if r["subtask"] == name]
        if not rs:
            continue
        right = [parse_mme_yes_no(r["answer"]) == r["gt"] for r in rs]
        per_image = {}
        for r, ok in zip(rs, right):
            per_image.setdefault(r["image"], []).append(ok)
        acc = 100.0 * sum(right) / len(right)
        acc_plus = 100.0 * sum(all(v) for v in per_image.values()) / len(per_image)
        subtasks[name] = dict(score=acc + acc_plus, acc=acc, acc_plus=acc_plus, total=len(rs))
    perception = sum(s["score"] for n, s in subtasks.items() if n in MME_PERCEPTION)
    cognition = sum(s["score"] for n, s in subtasks.items() if n in MME_COGNITION)
    return dict(headline=perception + cognition, perception=perception, cognition=cognition,
                total_score=perception + cognition, subtasks=subtasks)


def all_correct_by(records, key):
    """MMBench's circular rule and MMVP's pair rule: a group counts when every question in it is
    right. -> (group accuracy, question accuracy, number of groups), in %."""
    groups = {}
    for r in records:
        groups.setdefault(r[key], []).append(extract_choice(r["answer"], r["options"]) == r["gt"])
    group_acc = 100.0 * sum(all(v) for v in groups.values()) / max(len(groups), 1)
    question_acc = 100.0 * sum(sum(v) for v in groups.values()) / max(len(records), 1)
    return group_acc, question_acc, len(groups)


def score_mmbench(records):
    circular, single, n = all_correct_by(records, "group")
    return dict(headline=circular, circular_accuracy=circular, per_rotation_accuracy=single,
                questions=n, total=len(records))


def score_cvbench(records):
    by_source = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(extract_choice(r["answer"], r["options"]) == r["gt"])
    acc = {s: 100.0 * sum(v) / len(v) for s, v in by_source.items()}
    get = lambda s: acc.get(s, 0.0)
    acc_2d = (get("ADE20K") + get("COCO")) / 2
    headline = (acc_2d + get("Omni3D")) / 2
    return dict(headline=headline, accuracy_2d=acc_2d, accuracy_3d=get("Omni3D"), per_source=acc, total=len(records))


def score_mmvp(records):
    pair_acc, question_acc, n = all_correct_by(records, "pair")
    return dict(headline=pair_acc, pair_accuracy=pair_acc, question_accuracy=question_acc, pairs=n, total=len(records))


def score_bench(bench, records, match="substring"):
    if bench in CLS_BENCHES:
        return score_classification(records, match)
    scorers = dict(sqa=score_sqa, textvqa=score_textvqa, pope=score_pope, mme=score_mme, mmbench=score_mmbench,
                   cvbench=score_cvbench, mmvp=score_mmvp)
    return scorers[bench](records)


# -----------------------------------------------------------------------------
# the paper's tables

def table2_average(row):
    """Table 2: mean of the 4 classification accuracies (None unless all 4 are there)."""
    values = [row.get(b) for b in CLS_BENCHES]
    return None if any(v is None for v in values) else sum(values) / len(values)


def table3_average(row):
    """Table 3: mean of the 7 VL scores, MME (P+C) scaled by 1/20 (None unless all 7 are there)."""
    values = [row.get(b) for b in VL_BENCHES]
    if any(v is None for v in values):
        return None
    return sum(v / 20 if b == "mme" else v for b, v in zip(VL_BENCHES, values)) / len(values)


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_tables(rows):
    """rows: list of (name, {bench: headline}, {bench: (vision, language) mean weights}).
    -> Markdown text with Tables 2, 3 and 4 in the paper's layout."""
    names = dict(imagenet="ImageNet", caltech101="Caltech101", flowers102="Flowers102", food101="Food101", sqa="SQA",
                 textvqa="TextVQA", pope="POPE", mme="MME", mmbench="MMBench", cvbench="CV-Bench", mmvp="MMVP")
    out = ["Table 2: classification accuracy (%)", "",
           "| Model | " + " | ".join(names[b] for b in CLS_BENCHES) + " | Average |",
           "|---" * (len(CLS_BENCHES) + 2) + "|"]
    for name, scores, _ in rows:
        out.append(f"| {name} | " + " | ".join(fmt(scores.get(b)) for b in CLS_BENCHES) + f" | {fmt(table2_average(scores))} |")
    out += ["", "Table 3: vision-language benchmarks (POPE F1, MME P+C, others accuracy; the average uses MME/20)", "",
            "| Model | " + " | ".join(names[b] for b in VL_BENCHES) + " | Average |",
            "|---" * (len(VL_BENCHES) + 2) + "|"]
    for name, scores, _ in rows:
        out.append(f"| {name} | " + " | ".join(fmt(scores.get(b)) for b in VL_BENCHES) + f" | {fmt(table3_average(scores))} |")
    out += ["", "Table 4: mean context weights (vision / language)", "",
            "| Model | Classification | Vision-language |", "|---|---|---|"]
    for name, _, weights in rows:
        cells = []
        for group in (CLS_BENCHES, VL_BENCHES):
            ws = [weights[b] for b in group if weights.get(b) is not None]
            cells.append("-" if not ws else f"{sum(w[0] for w in ws) / len(ws):.2f} / {sum(w[1] for w in ws) / len(ws):.2f}")
        out.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(out) + "\n"


def read_eval_dir(path):
    """(scores, weights) from <path>/<bench>/metrics.json, or <path>/eval/<bench>/... for a run dir."""
    if not any(os.path.exists(os.path.join(path, b, "metrics.json")) for b in BENCH_GROUPS["all"]) \
            and os.path.isdir(os.path.join(path, "eval")):
        path = os.path.join(path, "eval")
    scores, weights = {}, {}
    for b in BENCH_GROUPS["all"]:
        p = os.path.join(path, b, "metrics.json")
        if os.path.exists(p):
            with open(p) as f:
                m = json.load(f)
            scores[b] = m["headline"]
            cw = m.get("context_weights")
            weights[b] = (cw["vision"], cw["language"]) if cw else None
    return scores, weights


def table_name(path):
    path = os.path.normpath(path)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base == "eval" else base


def comparison_table(dirs):
    rows = []
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--table: {d} is not a directory")
        scores, weights = read_eval_dir(d)
        if not scores:
            raise FileNotFoundError(f"--table: no <bench>/metrics.json under {d} (nor {d}/eval)")
        rows.append((table_name(d), scores, weights))
    return markdown_tables(rows)


# -----------------------------------------------------------------------------
# WiSE-FT: stream-interpolate two weight sets on CPU

def weight_files(path):
    """The safetensors files of a run dir / HF dir / tiny-base dir, or a single .safetensors file."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--wise-ft: {path} is neither a folder nor a .safetensors file")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"--wise-ft: no *.safetensors in {path} (expected a train.py run dir, "
                                f"an HF model dir or a tiny-base dir)")
    return files


def tensor_index(files):
    """{tensor name: (file, shape, dtype)} without loading any tensor."""
    from safetensors import safe_open
    index = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in index:
                    raise ValueError(f"--wise-ft: tensor {key} is in both {index[key][0]} and {path}")
                sl = f.get_slice(key)
                index[key] = (path, tuple(sl.get_shape()), sl.get_dtype())
    return index


def check_same_tensors(index_a, index_b, a, b):
    only_a, only_b = sorted(set(index_a) - set(index_b)), sorted(set(index_b) - set(index_a))
    if only_a or only_b:
        key, where = (only_a[0], f"in {a} but not in {b}") if only_a else (only_b[0], f"in {b} but not in {a}")
        raise ValueError(f"--wise-ft: the two weight sets have different tensors: {key} is {where} "
                         f"({len(only_a)} only in A, {len(only_b)} only in B)")
    for key in sorted(index_a):
        if index_a[key][1] != index_b[key][1]:
            raise ValueError(f"--wise-ft: tensor {key} has shape {index_a[key][1]} in {a} but {index_b[key][1]} in {b}")


def base_side_of_run(run_dir, base, out_dir):
    """A copy of run dir `run_dir` whose weights are `base`'s own values of the tensors the run
    trains: the zero-shot end of WiSE-FT for a run trained from `base` (for an imagenet-ft run,
    the base's projector; for methods that add modules, their fresh seeded init)."""
    from safetensors.torch import save_file
    with open(os.path.join(run_dir, "config.json")) as f:
        run = json.load(f)
    if run.get("moe"):
        raise ValueError(f"--wise-ft: {run_dir} is a CARPE-MoE run; pair it with another run dir, not with a base")
    if base == "tiny":
        llava, _ = carpe.tiny_llava()
    else:  # on CPU, in half precision: the 7B base never needs a GPU here
        llava, _ = carpe.load_base(base, dtype=None if os.path.isfile(os.path.join(base, "tiny_llava.json")) else torch.float16)
    cfg = carpe.CarpeConfig.from_dict(run["carpe"]) if run.get("carpe") else None
    model = carpe.build_model(run["method"], llava, cfg)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(run_dir, "config.json"), os.path.join(out_dir, "config.json"))
    state = {k: v.detach().float().contiguous() for k, v in model.trainable_state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def interpolate_weights(a, b, alpha, out_dir):
    """Write (1 - alpha) * A + alpha * B into out_dir, a copy of folder A (its other files copied as
    they are), one of A's shards at a time, on CPU. Returns out_dir."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    files_a, files_b = weight_files(a), weight_files(b)
    index_a, index_b = tensor_index(files_a), tensor_index(files_b)
    check_same_tensors(index_a, index_b, a, b)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(a):
        for name in os.listdir(a):  # config, tokenizer, index: everything but the weights
            src = os.path.join(a, name)
            if os.path.isfile(src) and not name.endswith(".safetensors"):
                shutil.copy(src, os.path.join(out_dir, name))
    handles_b = {}
    try:
        for path in files_b:
            handles_b[path] = safe_open(path, framework="pt")
        for path in tqdm(files_a, desc="wise-ft", disable=len(files_a) < 2):
            merged = {}
            with safe_open(path, framework="pt") as fa:
                metadata = fa.metadata() or {}
                for key in fa.keys():
                    ta, tb = fa.get_tensor(key), handles_b[index_b[key][0]].get_tensor(key)
                    if ta.is_floating_point():
                        merged[key] = ((1 - alpha) * ta.float() + alpha * tb.float()).to(ta.dtype)
                    elif torch.equal(ta, tb):
                        merged[key] = ta
                    else:
                        raise ValueError(f"--wise-ft: integer tensor {key} differs between {a} and {b}; cannot interpolate it")
            save_file(merged, os.path.join(out_dir, os.path.basename(path)), metadata={"format": "pt", **metadata})
            del merged
    finally:
        handles_b.clear()
    with open(os.path.join(out_dir, "wise_ft.json"), "w") as f:
        json.dump(dict(a=a, b=b, alpha=alpha), f, indent=1)
    return out_dir


# -----------------------------------------------------------------------------
# the model

def is_run_dir(path):
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        return "method" in json.load(f)


def resolve_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return dict(float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16)[name]


def tiny_default_base():
    """--preset tiny without --base: train.py's cached pre-stage base when it exists (a tiny LLaVA
    trained on the synthetic data, so 'vanilla LLaVA' rows are meaningful), else 'tiny'."""
    try:
        import train
        path = train.prestage_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))
    except (ImportError, AttributeError):
        return "tiny"
    return path if os.path.isfile(os.path.join(path, "tiny_llava.json")) else "tiny"


def load_model(args, device):
    """-> (model, processor, image_transform, description dict). Rank 0 merges the WiSE-FT weights."""
    dtype = resolve_dtype(args.dtype, device)
    ckpt = args.ckpt
    base = args.base
    if args.wise_ft:
        a, b = args.wise_ft
        merged = os.path.join(args.out, "wise_ft_weights")
        if int(os.environ.get("RANK", 0)) == 0:
            if is_run_dir(a) != is_run_dir(b):  # a base against a run of it: the base side of the run's tensors
                run, other = (a, b) if is_run_dir(a) else (b, a)
                side = base_side_of_run(run, other, os.path.join(args.out, "wise_ft_base_side"))
                a, b = (a, side) if run == a else (side, b)
            print0(f"WiSE-FT: {1 - args.alpha:g} * {a} + {args.alpha:g} * {b} -> {merged}")
            interpolate_weights(a, b, args.alpha, merged)
        barrier()
        if is_run_dir(merged):  # a copy of A's folder (or of the run's base side)
            ckpt = merged
        else:
            base = merged
    if ckpt:
        model, processor, image_transform = carpe.load_run(ckpt, device=device, dtype=dtype)
        with open(os.path.join(ckpt, "config.json")) as f:
            method = json.load(f)["method"]
    else:
        method = args.method or "llava"
        if base == "tiny":  # the random tiny LLaVA, built from configs
            llava, processor = carpe.tiny_llava()
            llava.to(device=device, dtype=dtype)
        else:
            llava, processor = carpe.load_base(base, device=device, dtype=dtype)
        model = carpe.build_model(method, llava, carpe.CarpeConfig(integrator_heads=args.integrator_heads))
        model.to(device=device, dtype=dtype)
        image_transform = carpe.make_image_transform(processor)
    model.eval()
    norm = lambda p: os.path.normpath(p) if p and os.path.exists(p) else p  # ./runs/x and runs/x are one run
    return model, processor, image_transform, dict(method=method, ckpt=norm(args.ckpt), base=norm(base) if not ckpt else None,
                                                             wise_ft=args.wise_ft, alpha=args.alpha if args.wise_ft else None)


# -----------------------------------------------------------------------------
# generation with resume and sharding

def barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_predictions(path, repair=False):
    """Records of a predictions file. A torn last line (a crash mid-write) is dropped, and with
    repair=True cut from the file so that appending continues cleanly."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records, good = [], []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            if any(l.strip() for l in lines[n + 1:]):
                raise ValueError(f"{path}: line {n + 1} is not valid JSON (and it is not the last line)") from None
            if repair:
                with open(path, "w") as f:
                    f.write("".join(l + "\n" for l in good))
    return records


def prediction_files(bench_dir):
    return [os.path.join(bench_dir, "predictions.jsonl")] + sorted(glob.glob(os.path.join(bench_dir, "predictions.rank*.jsonl")))


class BatchCollator:
    """Turns a batch of items into model inputs (runs in DataLoader workers: images decode there).
    Prompts are tokenised as training tokenises them (data.ConversationTokenizer: text pieces around
    the image tokens encoded separately, as LLaVA's tokenizer_image_token does), so the ids next to
    the image match training whatever the tokenizer, then left-padded for generate()."""

    def __init__(self, tokenizer, image_transform, n_image_tokens):
        self.tokenizer, self.image_transform = tokenizer, image_transform
        self.conversation = ConversationTokenizer(tokenizer, n_image_tokens, tokenizer.convert_tokens_to_ids("<image>"))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, batch):
        items = batch[0]
        rows = [[self.tokenizer.bos_token_id] + self.conversation.encode(vicuna_prompt(it["question"], has_image=True))
                for it in items]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T), left-padded
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, T - len(r):] = torch.tensor(r)
            attention_mask[b, T - len(r):] = 1
        pixel_values = self.image_transform([open_image(it["image"]) for it in items])
        return items, input_ids, attention_mask, pixel_values


def to_device(pixel_values, device, dtype):
    if isinstance(pixel_values, dict):  # CARPE-MoE: one tensor per expert
        return {k: v.to(device=device, dtype=dtype) for k, v in pixel_values.items()}
    return pixel_values.to(device=device, dtype=dtype)


def generate_records(model, processor, image_transform, batches, args, device, bench, out_file):
    """Greedy answers for each batch, appended to out_file (flushed per batch). -> the new records."""
    from torch.utils.data import DataLoader
    tokenizer = processor.tokenizer
    collate = BatchCollator(tokenizer, image_transform, n_image_tokens(processor))
    loader = DataLoader(batches, batch_size=1, collate_fn=collate, num_workers=args.workers)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    max_new = args.max_new_tokens or MAX_NEW_TOKENS[bench]
    records = []
    rank = int(os.environ.get("RANK", 0))
    with open(out_file, "a") as f:
        for items, input_ids, attention_mask, pixel_values in tqdm(loader, desc=bench, disable=rank != 0):
            out = model.generate(input_ids.to(device), attention_mask.to(device), to_device(pixel_values, device, dtype),
                                 max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, return_dict=True)
            answers = tokenizer.batch_decode(out.sequences[:, input_ids.size(1):], skip_special_tokens=True)
            weights = out.context_weights.float().cpu().tolist() if out.context_weights is not None else [None] * len(items)
            routes = out.route.cpu().tolist() if out.route is not None else [None] * len(items)
            for it, answer, w, route in zip(items, answers, weights, routes):
                rec = dict(id=it["id"], answer=answer.strip(), question=it["question"], **it["meta"])
                rec["context_weights"] = w
                rec["route"] = route
                records.append(rec)
                f.write(json.dumps(rec) + "\n")
            f.flush()
    return records


def eval_signature(args, model_desc, bench):
    """What the predictions depend on; a rerun into the same folder must match it."""
    return dict(model=model_desc, bench=bench, world=args.world if bench in CLS_BENCHES else None,
                max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS[bench])


def check_signature(bench_dir, signature):
    path = os.path.join(bench_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(signature)):
            raise ValueError(f"{bench_dir} holds predictions from another setting ({old}); now {signature}. "
                             f"Use another --out, or delete that folder to start over.")
    else:
        with open(path, "w") as f:
            json.dump(signature, f, indent=1)


def summarize_weights(records):
    ws = [r["context_weights"] for r in records if r.get("context_weights") is not None]
    if not ws:
        return None
    return dict(vision=sum(w[0] for w in ws) / len(ws), language=sum(w[1] for w in ws) / len(ws))


def routing_histogram(records):
    routes = [r["route"] for r in records if r.get("route") is not None]
    if not routes:
        return None
    hist = {}
    for route in routes:
        hist[str(route)] = hist.get(str(route), 0) + 1
    return dict(sorted(hist.items()))


def load_items(bench, args):
    items = read_bench(bench, args.data_root, args.world)
    if args.limit:
        items = items[:args.limit]
    seen = set()
    for it in items:
        if it["id"] in seen:
            raise ValueError(f"{bench}: item id {it['id']} appears twice in the data")
        seen.add(it["id"])
    return items


def run_bench(bench, items, model, processor, image_transform, model_desc, args, device):
    """Generate what is missing (sharded), gather, score. -> metrics (rank 0) or None."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    bench_dir = os.path.join(args.out, bench)
    ids = [it["id"] for it in items]
    if rank == 0:
        os.makedirs(bench_dir, exist_ok=True)
        check_signature(bench_dir, eval_signature(args, model_desc, bench))
        for path in prediction_files(bench_dir):
            read_predictions(path, repair=True)
    barrier()
    done = {r["id"] for path in prediction_files(bench_dir) for r in read_predictions(path)}
    todo = [it for it in items if it["id"] not in done]
    print0(f"{bench}: {len(items)} items, {len(items) - len(todo)} already done, {len(todo)} to generate")
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    out_file = os.path.join(bench_dir, "predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    barrier()  # every rank has read the finished ids before anyone appends
    new = generate_records(model, processor, image_transform, batches[rank::world], args, device, bench, out_file)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        torch.distributed.gather_object(new, gathered, dst=0)
        new = [r for part in gathered for r in part] if rank == 0 else []
    metrics = None
    if rank == 0:
        records = {}
        for r in [r for path in prediction_files(bench_dir) for r in read_predictions(path)] + new:
            records.setdefault(r["id"], r)  # first copy wins: no duplicates
        order = {i: n for n, i in enumerate(ids)}
        merged = sorted(records.values(), key=lambda r: order.get(r["id"], len(order)))
        tmp = os.path.join(bench_dir, "predictions.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in merged)
        os.replace(tmp, os.path.join(bench_dir, "predictions.jsonl"))
        for path in prediction_files(bench_dir)[1:]:
            os.remove(path)
        scored = [records[i] for i in ids if i in records]
        missing = [i for i in ids if i not in records]
        if missing:
            raise RuntimeError(f"{bench}: {len(missing)} items have no prediction after generation (e.g. {missing[:3]})")
        metrics = dict(bench=bench)
        metrics.update(score_bench(bench, scored, args.match))
        metrics.update(n=len(scored), context_weights=summarize_weights(scored), routing=routing_histogram(scored),
                       model=model_desc, settings=dict(world=args.world, match=args.match, limit=args.limit,
                                                       max_new_tokens=args.max_new_tokens or MAX_NEW_TOKENS[bench]))
        with open(os.path.join(bench_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        print0(f"{bench}: {metrics['headline']:.2f}")
    barrier()
    return metrics


def write_summary(out_dir, name):
    scores, weights = read_eval_dir(out_dir)
    text = markdown_tables([(name, scores, weights)])
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(name=name, scores=scores, context_weights=weights, table2_average=table2_average(scores),
                       table3_average=table3_average(scores)), f, indent=1)
    return text


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate CARPE / CARPE-MoE / baselines on the paper's benchmarks.")
    p.add_argument("--bench", default=None, help="a benchmark (" + ", ".join(BENCH_GROUPS["all"]) +
                   ") or a group: cls (the 4 classifiers), vl (the 7 VL sets), all; comma-separated lists work too")
    p.add_argument("--ckpt", default=None, help="a train.py run dir (config.json + model.safetensors), CARPE or MoE or a baseline")
    p.add_argument("--method", default=None, choices=["llava", "carpe", "imagenet-ft", "levi"],
                   help="without --ckpt: the model built around --base (llava = vanilla LLaVA, no CARPE modules; default llava)")
    p.add_argument("--base", default=None, help="base LLaVA: an HF id, an HF dir, a tiny-base dir, or 'tiny' (the random "
                   "tiny LLaVA); default: the preset's (tiny: train.py's cached pre-stage base if present, else 'tiny')")
    p.add_argument("--preset", default="llava-7b", choices=list(PRESETS), help="defaults for base, data root, batch size, dtype")
    p.add_argument("--data-root", default=None, help="root of the benchmark folders (default: the preset's)")
    p.add_argument("--out", default=None, help="output folder (default <ckpt>/eval, else runs/eval-<method>)")
    p.add_argument("--world", default="open", choices=["open", "closed"], help="classification prompt: open, or closed with all labels listed")
    p.add_argument("--match", default="substring", choices=["substring", "exact"], help="classification scoring rule")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each benchmark")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generate call, per rank")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length cap (default: per benchmark)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers that decode images")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="model dtype (auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--integrator-heads", type=int, default=32, help="CarpeConfig.integrator_heads for a model built without --ckpt")
    p.add_argument("--wise-ft", nargs=2, metavar=("A", "B"), default=None,
                   help="WiSE-FT: evaluate (1 - alpha) * A + alpha * B; A, B: two run dirs, two HF / tiny-base dirs with the "
                   "same tensors, or a base (HF id or dir) and a run dir trained from it")
    p.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT mixing coefficient (0 = A, 1 = B)")
    p.add_argument("--table", nargs="+", metavar="DIR", default=None,
                   help="only print one Markdown table (Tables 2-4) with a row per eval dir (or run dir with eval/)")
    p.add_argument("--table-out", default=None, help="also write the --table Markdown to this file")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("base", "data_root", "batch_size", "workers", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    base_given = any(a == "--base" or a.startswith("--base=") for a in (argv if argv is not None else sys.argv[1:]))
    if args.preset == "tiny" and args.base == "tiny" and not base_given:
        args.base = tiny_default_base()
    if args.max_new_tokens is None:
        args.max_new_tokens = preset["max_new_tokens"]
    if args.table is None:
        if args.bench is None:
            p.error("--bench is required (or --table DIR ...)")
        if args.ckpt and args.method:
            p.error("--method builds a model around --base; a --ckpt run dir already names its method")
        if args.ckpt and args.wise_ft:
            p.error("--wise-ft takes its two weight sets itself; drop --ckpt")
        if not 0.0 <= args.alpha <= 1.0:
            p.error(f"--alpha must be in [0, 1], got {args.alpha}")
        if args.batch_size < 1:
            p.error("--batch-size must be at least 1")
        if args.out is None:
            args.out = os.path.join(args.ckpt, "eval") if args.ckpt else f"runs/eval-{'wise-ft' if args.wise_ft else args.method or 'llava'}"
    return args


def bench_list(spec):
    benches = []
    for name in spec.split(","):
        name = name.strip()
        if name in BENCH_GROUPS:
            benches += BENCH_GROUPS[name]
        elif name in BENCH_GROUPS["all"]:
            benches.append(name)
        else:
            raise SystemExit(f"--bench: unknown benchmark {name!r}; choose from {', '.join(BENCH_GROUPS['all'])}, cls, vl, all")
    return list(dict.fromkeys(benches))


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        text = comparison_table(args.table)
        print(text)
        if args.table_out:
            with open(args.table_out, "w") as f:
                f.write(text)
        return
    benches = bench_list(args.bench)
    device = setup_distributed()
    if args.preset == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy machine
    try:
        if int(os.environ.get("RANK", 0)) == 0:
            os.makedirs(args.out, exist_ok=True)
            if args.preset == "tiny" and not os.path.isdir(args.data_root):
                print0(f"drawing the synthetic tiny benchmarks into {args.data_root}")
                build_tiny_benchmarks(args.data_root)
        barrier()
        items = {bench: load_items(bench, args) for bench in benches}  # missing data fails before the model loads
        model, processor, image_transform, model_desc = load_model(args, device)
        for bench in benches:
            run_bench(bench, items.pop(bench), model, processor, image_transform, model_desc, args, device)
        if int(os.environ.get("RANK", 0)) == 0:
            print0(write_summary(args.out, table_name(args.ckpt) if args.ckpt else table_name(args.out)))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
