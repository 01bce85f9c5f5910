"""
benchmarks.py: the paper's 11 benchmarks (and Fashion-MNIST for the small preset). One section per
benchmark holds its prompt, its reader and its official scorer side by side; the registry BENCHMARKS
at the end is what eval.py, the summary tables and the tests read.

  read(root, world="open", closed_k=None) -> list[Item]     (world / closed_k: classification only)
  score(records, match="official") -> dict with "headline"
A record is one prediction line, {id, answer, error, context_weights, route, **item.meta}; a failed
item (Item.error set: a malformed row, or an image that did not decode) has answer "" and is scored
as the official script scores an empty answer. Readers never decode images; data.load_image does.

Each prompt is built word for word as LLaVA-1.5's question files and scripts build it (Cambrian's for
CV-Bench and MMVP), and each scorer computes what the official script computes on any answer, however
messy; the official code is cited beside each. Where that code crashes on some input, we do what it
means and say so. Nothing looser exists; classification's match="exact" is a stricter diagnostic.

Layout under --data-root (LLaVA's playground/data/eval layout where LLaVA has one):
  imagenet, caltech101, flowers102, food101, fashion-mnist: <bench>/{test or val}/<class folder>/* +
      <bench>/classnames.txt (a name per line in sorted folder order, or folder<TAB>name) or classnames.json
  sqa      scienceqa/llava_test_CQM-A.json + images/test/ + problems.json (the answers)
  textvqa  textvqa/llava_textvqa_val_v051_ocr.jsonl + TextVQA_0.5.1_val.json + train_images/
  pope     pope/coco/coco_pope_{adversarial,popular,random}.json + pope/val2014/
  mme      MME/MME_Benchmark_release_version/<subtask>/ (as released)
  mmbench  mmbench/mmbench_dev_20230712.tsv (base64 images)
  cvbench  cvbench/test_2d.jsonl + test_3d.jsonl (or test.jsonl) + img/, or the parquet release
  mmvp     MMVP/Questions.csv + "MMVP/MMVP Images/<index>.jpg"
"""
import binascii
import csv
import glob
import json
import os
import random
import re
import string
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from data import IMAGE_EXTENSIONS, closed_world_question, read_class_names

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
OPEN_WORLD_QUESTION = "What type of object is in this photo?"
MATCH_RULES = ("official", "substring", "exact")  # substring: classification's official rule; exact: stricter


@dataclass
class Item:
    id: str  # unique within the benchmark; also seeds anything random in the prompt
    question: str  # the user turn without the image tag
    image: str | dict | None  # a file path, {"b64": str} or {"bytes": bytes}; decoded by data.load_image
    meta: dict = field(default_factory=dict)  # what the scorer needs; copied into the prediction line
    error: str | None = None  # set: the row is malformed; eval records a failed prediction without generating


@dataclass(frozen=True)
class Benchmark:
    name: str  # the folder / flag name
    display: str  # column title in the summary tables
    group: str  # "cls" (Table 2), "vl" (Table 3), "cls-extra" (no paper table)
    max_new_tokens: int  # the official generation limit
    read: Callable  # read(root, world="open", closed_k=None) -> list[Item]
    score: Callable  # score(records, match="official") -> dict with "headline" (match: classification only)


def require(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: expected {path} (see the data layout in benchmarks.py's docstring)")
    return path


def read_json_or_jsonl(path):
    """A .json holding one JSON document, or one object per line (POPE's files are the latter)."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def add_instruction(text, instruction):
    """text + "\\n" + instruction, unless the question file already ends with it (LLaVA's TextVQA file does)."""
    return text if text.rstrip().endswith(instruction) else f"{text}\n{instruction}"


def percent(n, total):
    return 100.0 * n / max(total, 1)


# -----------------------------------------------------------------------------
# Classification (ImageNet, Caltech101, Flowers102, Food101; Fashion-MNIST for the small preset).
# Prompt: Zhang et al. (yuhui-zh15/VLMClassifier, main_results/main.py): open world "What type of
# object is in this photo?"; closed world adds ' Choose one from "<candidates>".' with the true
# label among K candidates (K-1 others drawn from the sorted remaining labels), shuffled.
# Score: VLMClassifier main_results/eval.ipynb get_accuracy: the lower-cased label is a substring
# of the lower-cased answer.

def class_names(bench_dir, folders):
    """Folder -> class name: classnames.json ({folder: name}), classnames.txt, else the folder name."""
    json_path, txt_path = os.path.join(bench_dir, "classnames.json"), os.path.join(bench_dir, "classnames.txt")
    if os.path.exists(json_path):
        with open(json_path) as f:
            mapping = json.load(f)
        missing = [d for d in folders if d not in mapping]
        if missing:
            raise ValueError(f"{json_path} has no name for class folders {missing[:5]}")
        return {d: mapping[d] for d in folders}
    if os.path.exists(txt_path):
        return dict(zip(folders, read_class_names(txt_path, folders)))
    return {d: d.replace("_", " ") for d in folders}


def classification_question(labels, label, world, closed_k, seed_key):
    """The question for one image; a pure function of its arguments, so the same on every rank and
    rerun (a prediction line need not store it). closed_k None (or >= #labels): every label."""
    if world == "open":
        return OPEN_WORLD_QUESTION
    if world != "closed":
        raise ValueError(f"world must be 'open' or 'closed', not {world!r}")
    rng = random.Random(seed_key)
    if closed_k is None or closed_k >= len(labels):
        candidates = list(labels)
    elif closed_k < 1:
        raise ValueError(f"closed_k must be at least 1, not {closed_k}")
    else:
        candidates = [label] + rng.sample(sorted(set(labels) - {label}), closed_k - 1)
    rng.shuffle(candidates)
    return closed_world_question(OPEN_WORLD_QUESTION, candidates)


def read_classification(bench, root, world="open", closed_k=None):
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
                question = classification_question(labels, names[folder], world, closed_k, f"{bench}/{item_id}")
                items.append(Item(item_id, question, os.path.join(split_dir, folder, fname), dict(label=names[folder])))
    return items


def score_classification(records, match="official"):
    """official / substring: VLMClassifier's rule. exact: the answer without trailing punctuation
    equals the label (case-insensitive); a stricter diagnostic."""
    if match not in MATCH_RULES:
        raise ValueError(f"unknown match rule {match!r}; one of {MATCH_RULES}")

    def correct(r):
        if match == "exact":
            return r["answer"].strip().rstrip(string.punctuation + " ").lower() == r["label"].strip().lower()
        return r["label"].lower() in r["answer"].lower()
    n = sum(correct(r) for r in records)
    return dict(headline=percent(n, len(records)), accuracy=percent(n, len(records)), correct=n,
                total=len(records), match=match)


# -----------------------------------------------------------------------------
# ScienceQA-IMG. Prompt: LLaVA llava/eval/model_vqa_science.py with --single-pred-prompt: the
# llava_test_CQM-A.json human turn without "<image>", stripped, then "\n" + the letter instruction.
# Score: LLaVA llava/eval/eval_science_qa.py (__main__ block and get_pred_idx); IMG accuracy.

def read_sqa(root):
    base = os.path.join(root, "scienceqa")
    questions = read_json_or_jsonl(require(os.path.join(base, "llava_test_CQM-A.json"), "ScienceQA questions"))
    image_dir = require(os.path.join(base, "images", "test"), "ScienceQA test images")
    problems_path = os.path.join(base, "problems.json")
    problems = json.load(open(problems_path)) if os.path.exists(problems_path) else {}
    items = []
    for q in questions:
        if "image" not in q:
            continue  # SQA-IMG: the items with an image
        qid = str(q["id"])
        text = q["conversations"][0]["value"].replace("<image>", "").strip()
        item = Item(qid, f"{text}\n{LETTER_ANSWER}", os.path.join(image_dir, q["image"]), {})
        if qid in problems:  # the official ground truth and option count
            n_options, gt = len(problems[qid]["choices"]), "ABCDE"[problems[qid]["answer"]]
        else:  # no problems.json: the letter in the training-format answer, options counted in the prompt
            n_options = sum(1 for line in text.split("\n") if re.match(r"^[A-E]\. ", line))
            gt = parse_sqa_letter(q["conversations"][1]["value"], max(n_options, 1))
            if gt is None:
                item.error = f"ScienceQA item {qid}: no problems.json entry and no letter in {q['conversations'][1]['value']!r}"
        item.meta = dict(gt=gt, n_options=n_options)
        items.append(item)
    return items


def parse_sqa_letter(text, n_options):
    """The letter eval_science_qa.py reads from one answer, or None ("FAILED" there, so wrong).
    The answer is stripped first, as model_vqa_science.py stores it."""
    text = text.strip()
    if text in ("A", "B", "C", "D", "E"):  # its --options list: all five letters
        answer = text
    elif len(text) >= 3 and text[0] in "ABCDE" and text[1:3] == ". ":
        answer = text[0]
    else:
        # `.` wants one more character (not a newline) after the letter; exactly one match counts
        found = re.findall(r"The answer is ([A-Z]).", text)
        answer = found[0] if len(found) == 1 else None
    # get_pred_idx: a letter beyond this question's choices is wrong
    return answer if answer is not None and answer in "ABCDE"[:n_options] else None


def score_sqa(records, match="official"):
    n = sum(r["gt"] is not None and parse_sqa_letter(r["answer"], r["n_options"] or 5) == r["gt"] for r in records)
    return dict(headline=percent(n, len(records)), img_accuracy=percent(n, len(records)), correct=n,
                total=len(records))


# -----------------------------------------------------------------------------
# TextVQA. Prompt: LLaVA's llava_textvqa_val_v051_ocr.jsonl text as is (question, reference OCR
# tokens, short-answer instruction). Score: LLaVA llava/eval/eval_textvqa.py (prompt_processor
# for the annotation key) with llava/eval/m4c_evaluator.py (EvalAIAnswerProcessor,
# TextVQAAccuracyEvaluator).

def textvqa_question(prompt):
    """The lower-cased question inside a TextVQA prompt, as eval_textvqa.py's prompt_processor
    reads it (that function asserts on other shapes; we take the first plain line)."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    elif len(lines) == 2:
        return lines[0].lower()
    plain = [l for l in lines if l.strip() and not l.startswith("Reference OCR token:") and l.strip() != SHORT_ANSWER]
    return (plain[0] if plain else prompt).strip().lower()


def read_textvqa(root):
    base = os.path.join(root, "textvqa")
    lines = read_json_or_jsonl(require(os.path.join(base, "llava_textvqa_val_v051_ocr.jsonl"), "TextVQA questions"))
    with open(require(os.path.join(base, "TextVQA_0.5.1_val.json"), "TextVQA annotations")) as f:
        annotations = json.load(f)["data"]
    image_dir = require(os.path.join(base, "train_images"), "TextVQA images")
    # eval_single's key: (image_id, lower-cased question); LLaVA's question_id field holds the image id
    by_image_question = {(str(a["image_id"]), a["question"].lower()): a for a in annotations}
    items = []
    for n, line in enumerate(lines):
        ann = by_image_question.get((str(line["question_id"]), textvqa_question(line["text"])))
        item = Item(f"{n}:{line['question_id']}", add_instruction(line["text"], SHORT_ANSWER),
                    os.path.join(image_dir, line["image"]), dict(answers=ann["answers"] if ann else []))
        if ann is None:
            item.error = f"TextVQA line {n + 1} (question_id {line['question_id']}): no annotation in TextVQA_0.5.1_val.json"
        items.append(item)
    return items


# EvalAIAnswerProcessor's tables (m4c_evaluator.py); contractions as "written:normalised" pairs
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've""".split())
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def normalize_vqa_answer(text):
    """EvalAIAnswerProcessor.__call__, step by step."""
    # word_tokenize: lower case, drop "," and "?", split off "'s"
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # process_punctuation: whether a mark is deleted or becomes a space is decided on the text as it
    # came in, not as the loop changes it. (Its digit-comma test can never fire: commas are gone.)
    source = text
    for p in _PUNCTUATION:
        text = text.replace(p, "" if (p + " " in source or " " + p in source) else " ")
    # its PERIOD_STRIP: a period not followed by a digit goes (the pattern's "(?!<=\d)" is a
    # look-ahead that never fires); re.UNICODE lands in sub()'s `count`, so at most 32 go
    text = re.sub(r"\.(?!\d)", "", text, count=32)
    # process_digit_article: number words to digits, articles dropped, contractions restored
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction, gt_answers):
    """TextVQAAccuracyEvaluator: min(1, #other humans who gave the answer / 3), averaged over the
    leave-one-out subsets of the human answers (it asserts there are 10; we average over any)."""
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in gt_answers]
    scores = [min(1.0, sum(a == pred for a in gts[:i] + gts[i + 1:]) / 3.0) for i in range(len(gts))]
    return sum(scores) / max(len(scores), 1)


def score_textvqa(records, match="official"):
    acc = percent(sum(vqa_soft_accuracy(r["answer"].strip(), r["answers"]) for r in records), len(records))
    return dict(headline=acc, accuracy=acc, total=len(records))


# -----------------------------------------------------------------------------
# POPE. Prompt: LLaVA's llava_pope_test.jsonl: the POPE question + "\n" + the short-answer
# instruction. Score: LLaVA llava/eval/eval_pope.py (eval_pope), per split; headline = mean F1.

POPE_SPLITS = ("adversarial", "popular", "random")


def read_pope(root):
    base = os.path.join(root, "pope")
    image_dir = require(os.path.join(base, "val2014"), "POPE (COCO val2014) images")
    items = []
    for split in POPE_SPLITS:
        rows = read_json_or_jsonl(require(os.path.join(base, "coco", f"coco_pope_{split}.json"), f"POPE {split} split"))
        for row in rows:
            label = str(row.get("label", "")).strip().lower()
            item = Item(f"{split}/{row['question_id']}", add_instruction(row["text"], SHORT_ANSWER),
                        os.path.join(image_dir, row["image"]), dict(split=split, label=label))
            if label not in ("yes", "no"):
                item.error = f"POPE {split} question {row['question_id']}: label {row.get('label')!r} is not yes/no"
            items.append(item)
    return items


def parse_pope_yes_no(text):
    """eval_pope: keep the text before the first ".", drop commas, split on spaces; "no" when a
    word is exactly No / not / no, else "yes" (so "NO", "Not" and "no\\n..." read as yes)."""
    text = text.strip()  # as model_vqa_loader.py stores the answer
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds, labels):
    """eval_pope's numbers. It divides by zero when the model never says yes (precision) or when
    the split has no yes label (recall); such a ratio, and F1 with P + R = 0, count as 0."""
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


def score_pope(records, match="official"):
    splits = {}
    for split in POPE_SPLITS:
        rs = [r for r in records if r["split"] == split]
        if rs:
            splits[split] = binary_metrics([parse_pope_yes_no(r["answer"]) for r in rs], [r["label"] for r in rs])
    mean = lambda key: sum(s[key] for s in splits.values()) / max(len(splits), 1)
    return dict(headline=mean("f1"), f1=mean("f1"), accuracy=mean("accuracy"), yes_ratio=mean("yes_ratio"),
                splits=splits)


# -----------------------------------------------------------------------------
# MME. Prompt: LLaVA's llava_mme.jsonl: the release question without "Please answer yes or no.",
# then "\n" + the short-answer instruction (LLaVA's convert_answer_to_mme.py undoes exactly this to
# find the ground truth). Score: that converter + MME eval_tool/calculation.py
# (calculate_metrics.parse_pred_ans and process_result): per subtask 100*acc + 100*acc+, where acc+
# counts images with both questions right; P = 10 perception subtasks, C = 4 cognition, P+C.

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_RELEASE_INSTRUCTION = "Please answer yes or no."


def mme_question(release_question):
    return release_question.replace(MME_RELEASE_INSTRUCTION, "").strip() + "\n" + SHORT_ANSWER


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
            image = next((p for e in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)
                          for p in [os.path.join(image_dir, stem + e)] if os.path.exists(p)), None)
            image_key = f"{subtask}/{os.path.basename(image) if image else stem}"
            with open(txt) as f:
                rows = [line.rstrip("\n") for line in f if line.strip()]
            for k, row in enumerate(rows):
                question, _, answer = row.rpartition("\t")
                gt = answer.strip().lower()
                item = Item(f"{image_key}/{k}", mme_question(question), image, dict(subtask=subtask, image=image_key, gt=gt))
                if image is None:
                    item.error = f"MME: no image {stem}.* in {image_dir} for {txt}"
                elif not question or gt not in ("yes", "no"):
                    item.error = f"{txt}: line {k + 1} is not 'question<TAB>Yes|No'"
                items.append(item)
    return items


def parse_mme_yes_no(text):
    """calculation.py parse_pred_ans on the lower-cased answer: "yes"/"no" when it is that word, else
    whichever of them its first 4 characters contain ("yes" first), else "other". The answer is
    stripped as model_vqa_loader.py stores it. A tab or newline inside it would split the
    converter's tab-separated line (calculation.py then crashes or misaligns); we read it whole."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(records, match="official"):
    subtasks = {}
    for name in MME_PERCEPTION + MME_COGNITION:
        rs = [r for r in records if r["subtask"] == name]
        if not rs:
            continue
        right = [parse_mme_yes_no(r["answer"]) == r["gt"] for r in rs]
        per_image = {}  # calculation.py pairs consecutive lines; the release has 2 questions per image
        for r, ok in zip(rs, right):
            per_image.setdefault(r["image"], []).append(ok)
        acc, acc_plus = percent(sum(right), len(right)), percent(sum(all(v) for v in per_image.values()), len(per_image))
        subtasks[name] = dict(score=acc + acc_plus, acc=acc, acc_plus=acc_plus, total=len(rs))
    perception = sum(s["score"] for n, s in subtasks.items() if n in MME_PERCEPTION)
    cognition = sum(s["score"] for n, s in subtasks.items() if n in MME_COGNITION)
    return dict(headline=perception + cognition, perception=perception, cognition=cognition,
                total_score=perception + cognition, subtasks=subtasks)


# -----------------------------------------------------------------------------
# MMBench (dev, circular). Prompt: LLaVA llava/eval/model_vqa_mmbench.py: hint + "\n" (when the
# hint is not None / NaN / "nan" / "none"), the question, "\n<L>. <option>" for A-D up to the
# first missing option, "\n" + the letter instruction. The dev TSV's copies (index + k * 1e6)
# carry the rotated options; without copies we rotate the option texts under fixed letters
# (LLaVA's --all-rounds). Score: VLMEvalKit vlmeval/utils/matching_util.py (can_infer,
# can_infer_option, can_infer_text; as of commit e8e78f05) and
# vlmeval/dataset/utils/multiple_choice.py (mcq_circular_eval, prefetch_circular_group): a
# question counts when every rotation is read as its answer; no ChatGPT fallback (the exact-
# matching policy), which the leaderboard server's fallback could only raise.

_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def is_missing(value):
    """A cell LLaVA's is_none() skips, read as pandas.read_table reads it (these strings become NaN)."""
    return value is None or value in _PANDAS_NA or value.lower() in ("nan", "none")


def read_mmbench(root):
    path = require(os.path.join(root, "mmbench", "mmbench_dev_20230712.tsv"), "MMBench dev TSV")
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for col in ("index", "question", "answer", "image", "A", "B"):
        if rows and col not in rows[0]:
            raise ValueError(f"{path}: no column {col!r} (columns: {list(rows[0])})")
    image_of = {r["index"].strip(): r["image"] for r in rows}
    has_copies = any(r["index"].strip().isdigit() and int(r["index"]) >= 1_000_000 for r in rows)
    checked = {}  # index of the row holding the base64 -> its error (checked once; not decoded into an image)
    items = []
    for r in rows:
        raw = r["index"].strip()
        group = int(raw) % 1_000_000 if raw.isdigit() else raw
        options = []
        for L in "ABCD":
            if L not in r or is_missing(r[L]):
                break
            options.append(r[L])
        hint = None if is_missing(r.get("hint")) else r["hint"]
        answer, image, source = (r["answer"] or "").strip(), r["image"], raw
        if len(image) <= 64 and image.strip() in image_of and image.strip() != raw:
            source = image.strip()  # a copy points at another row's image
            image = image_of[source]
        if source not in checked:
            checked[source] = base64_error(image)
        error = None
        if answer not in list("ABCD"[:len(options)]):
            error = f"MMBench index {raw}: answer {r['answer']!r} is not one of its options {'ABCD'[:len(options)]}"
        elif checked[source]:
            error = f"MMBench index {raw}: {checked[source]}"
        for rot in [0] if has_copies else range(max(len(options), 1)):
            texts = options[rot:] + options[:rot]  # rotated texts under fixed letters
            letters = "ABCD"[:len(texts)]
            question = (f"{hint}\n" if hint else "") + r["question"] + "".join(f"\n{L}. {t}" for L, t in zip(letters, texts))
            gt = letters[("ABCD".index(answer) - rot) % len(options)] if error is None else None
            items.append(Item(raw if has_copies else f"{raw}/r{rot}", f"{question}\n{LETTER_ANSWER}", {"b64": image},
                              dict(group=group, gt=gt, options=dict(zip(letters, texts)), category=r.get("category")),
                              error))
    return items


def base64_error(text):
    """Why `text` is not base64 (None when it is); the image itself is decoded only when generated."""
    try:
        binascii.a2b_base64(text)  # as lenient as LLaVA's base64.b64decode
        return None
    except (binascii.Error, ValueError) as e:
        return f"the image is not valid base64 ({e}; {len(text)} chars)"


def can_infer_option(answer, choices):
    """VLMEvalKit can_infer_option (with the VERBOSE environment variable unset)."""
    if "Failed to obtain answer via API" in answer:
        return None
    for refusal in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer"):
        if refusal in answer:
            return "Z"
    # tokens: the answer with . ( ) [ ] , : ; ! * # { } as spaces, split on white space
    tokens = answer.translate(str.maketrans({c: " " for c in ".()[],:;!*#{}"})).split()
    found = [c for c in choices if c in tokens]
    if len(found) == 1:
        # the letter counts only among the last 4 tokens (its first occurrence)
        if tokens.index(found[0]) > len(tokens) - 5:
            return found[0]
    elif not found and "Z" in tokens:
        return "Z"
    m = re.search(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def can_infer_text(answer, choices):
    """VLMEvalKit can_infer_text: the one option whose lower-cased text is in the lower-cased answer,
    unless the answer is longer than twice all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer, choices):
    """VLMEvalKit can_infer: option letter first, then option text; None = not read (its 'Z')."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def all_correct_by(records, key, correct):
    """A group counts when every question in it is right (MMBench's circular rule, MMVP's pairs).
    -> (group accuracy, question accuracy, number of groups), in %."""
    groups = {}
    for r in records:
        groups.setdefault(r[key], []).append(bool(correct(r)))
    group_acc = percent(sum(all(v) for v in groups.values()), len(groups))
    return group_acc, percent(sum(sum(v) for v in groups.values()), len(records)), len(groups)


def score_mmbench(records, match="official"):
    correct = lambda r: r["gt"] is not None and can_infer(r["answer"].strip(), r["options"]) == r["gt"]
    circular, single, n = all_correct_by(records, "group", correct)
    return dict(headline=circular, circular_accuracy=circular, per_rotation_accuracy=single, questions=n,
                total=len(records))


# -----------------------------------------------------------------------------
# Cambrian's answer cleaning (cambrian-mllm/cambrian eval/eval/{ade,coco,omni,mmvp}/*_test.py,
# extract_mcq_answer): lower-case and strip; after each of "answer is", "answer is:", "answer:"
# found in the text (in that order) keep what follows its last occurrence; strip; drop trailing
# `trailing` characters, a leading "(" run and a trailing ")" run; CV-Bench keeps only the first
# character of what is left.

def cambrian_answer(text, trailing, first_char):
    text = text.lower().strip()
    for keyword in ("answer is", "answer is:", "answer:"):
        if keyword in text:
            text = text.split(keyword)[-1]
    text = text.strip().rstrip(trailing).lstrip("(").rstrip(")")
    return text[0] if first_char and len(text) > 1 else text


def cambrian_gt_letter(answer):
    """Cambrian reads the ground truth "(A)" as its second character, lower-cased (a bare "A" would
    crash there; we read the letter)."""
    return answer.strip().strip("()").upper()


# -----------------------------------------------------------------------------
# CV-Bench. Prompt: Cambrian eval/eval/{ade,coco,omni}/*_eval.py process(): the release's
# "prompt" + "\n" + the letter instruction. Score: the per-source scripts' compute_metrics:
# ADE20K and COCO (ade_test.py, coco_test.py): the cleaned first character equals the letter;
# Omni3D (omni_test.py): also ".:," stripped, and the character may equal the letter or the
# correct option's text as given. Headline ((ADE20K + COCO)/2 + Omni3D)/2.

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
            import pyarrow.parquet as pq  # optional: only the parquet release needs it
        except ImportError:
            raise ImportError(f"CV-Bench: only the parquet release is in {base}, and reading it needs pyarrow "
                              f"(pip install pyarrow), or put test_2d.jsonl / test_3d.jsonl and img/ there") from None
        rows = [row for p in parquet for row in pq.read_table(p).to_pylist()]
        image_of = lambda row: {"bytes": row["image"]["bytes"]}
    items = []
    for row in rows:
        choices = [str(c) for c in row.get("choices") or []]
        letters = "ABCDEFGH"[:len(choices)]
        gt = cambrian_gt_letter(str(row.get("answer", "")))
        item = Item(f"{row.get('type', '')}/{row['idx']}", f"{row['prompt']}\n{LETTER_ANSWER}", image_of(row),
                    dict(source=row["source"], gt=gt if gt in list(letters) else None,
                         options=dict(zip(letters, choices)), task=row.get("task")))
        if item.meta["gt"] is None:
            item.error = f"CV-Bench {item.id}: answer {row.get('answer')!r} is not one of its choices {letters}"
        items.append(item)
    return items


def cvbench_correct(r):
    if r["gt"] is None:
        return False
    gt = r["gt"].lower()
    if r["source"] == "Omni3D":  # omni_test.py
        answer = cambrian_answer(r["answer"], ".:,", first_char=True)
        return answer == gt or answer == r["options"][r["gt"]]
    return cambrian_answer(r["answer"], ".", first_char=True) == gt  # ade_test.py / coco_test.py


def score_cvbench(records, match="official"):
    by_source = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(cvbench_correct(r))
    acc = {s: percent(sum(v), len(v)) for s, v in by_source.items()}
    acc_2d = (acc.get("ADE20K", 0.0) + acc.get("COCO", 0.0)) / 2
    headline = (acc_2d + acc.get("Omni3D", 0.0)) / 2
    return dict(headline=headline, accuracy_2d=acc_2d, accuracy_3d=acc.get("Omni3D", 0.0), per_source=acc,
                total=len(records))


# -----------------------------------------------------------------------------
# MMVP. Prompt: Cambrian eval/eval/mmvp/mmvp_eval.py process(): the question + " Options:", then
# the options split at "(b)", each stripped, "(a)" written "A.", the second prefixed "B. ", one per
# line, then the letter instruction; option texts as its give_options() reads them. Score:
# Cambrian eval/eval/mmvp/mmvp_test.py compute_metrics: the cleaned answer equals the letter or
# the lower-cased option text exactly; a pair (consecutive questions, one image each) counts when
# both are right. Pair accuracy is the headline, question accuracy beside it (see MMVP_NOTE).

MMVP_NOTE = ("headline = pair accuracy (the official MMVP score; its authors report about 25 for LLaVA-1.5); "
             "the paper's 63.0 for LLaVA-1.5-7B can only be question accuracy")


def mmvp_prompt(question, options):
    parts = [p.strip().replace("(a)", "A.").replace("(b)", "B.") for p in options.split("(b)")]
    if len(parts) > 1:
        parts[1] = "B. " + parts[1]
    return question + " Options:" + "".join(f"\n{p}" for p in parts) + f"\n{LETTER_ANSWER}"


def mmvp_option_texts(options):
    """give_options(): after each "(", the text between the next ")" and the one after that (a "("
    without ")" crashes it; a ValueError here)."""
    parts = [p.split(")") for p in options.split("(")[1:]]
    if any(len(p) < 2 for p in parts):
        raise ValueError(f"cannot read the options from {options!r}")
    return [p[1].strip() for p in parts]


def read_mmvp(root):
    base = os.path.join(root, "MMVP")
    path = require(os.path.join(base, "Questions.csv"), "MMVP questions")
    image_dir = require(os.path.join(base, "MMVP Images"), "MMVP images")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0] not in ("lndex", "Index")]  # the header ("lndex" as released)
    items = []
    for n, r in enumerate(rows):
        item = Item(r[0].strip(), "", None, dict(pair=n // 2, gt=None, options={}))
        try:
            index, question, options, answer = int(r[0]), r[1], r[2], r[3]
            texts = mmvp_option_texts(options)
            letters = "ABCDEFGH"[:len(texts)]
            gt = cambrian_gt_letter(answer)
            if gt not in list(letters):
                raise ValueError(f"correct answer {answer!r} is not one of {letters}")
            item.question, item.image = mmvp_prompt(question, options), os.path.join(image_dir, f"{index}.jpg")
            item.meta.update(gt=gt, options=dict(zip(letters, texts)))
        except (ValueError, IndexError) as e:
            item.error = f"{path}: row {n + 1} ({r[:1]}): {e}"
        items.append(item)
    return items


def mmvp_correct(r):
    if r["gt"] is None:
        return False
    answer = cambrian_answer(r["answer"], ".:,", first_char=False)
    return answer == r["gt"].lower() or answer == r["options"][r["gt"]].lower()


def score_mmvp(records, match="official"):
    pair_acc, question_acc, n = all_correct_by(records, "pair", mmvp_correct)
    return dict(headline=pair_acc, pair_accuracy=pair_acc, question_accuracy=question_acc, pairs=n,
                total=len(records), note=MMVP_NOTE)


# -----------------------------------------------------------------------------
# The registry

def open_world_only(reader):
    """A VL reader under the common read() signature; world and closed_k concern classification."""
    def read(root, world="open", closed_k=None):
        return reader(root)
    return read


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    # max_new_tokens: VLMClassifier 64; LLaVA's model_vqa_science / model_vqa_mmbench 1024 and
    # model_vqa_loader 128; Cambrian's CV-Bench and MMVP scripts 512
    Benchmark("imagenet", "ImageNet", "cls", 64, partial(read_classification, "imagenet"), score_classification),
    Benchmark("caltech101", "Caltech101", "cls", 64, partial(read_classification, "caltech101"), score_classification),
    Benchmark("flowers102", "Flowers102", "cls", 64, partial(read_classification, "flowers102"), score_classification),
    Benchmark("food101", "Food101", "cls", 64, partial(read_classification, "food101"), score_classification),
    Benchmark("fashion-mnist", "Fashion-MNIST", "cls-extra", 64, partial(read_classification, "fashion-mnist"), score_classification),
    Benchmark("sqa", "SQA", "vl", 1024, open_world_only(read_sqa), score_sqa),
    Benchmark("textvqa", "TextVQA", "vl", 128, open_world_only(read_textvqa), score_textvqa),
    Benchmark("pope", "POPE", "vl", 128, open_world_only(read_pope), score_pope),
    Benchmark("mme", "MME", "vl", 128, open_world_only(read_mme), score_mme),
    Benchmark("mmbench", "MMBench", "vl", 1024, open_world_only(read_mmbench), score_mmbench),
    Benchmark("cvbench", "CV-Bench", "vl", 512, open_world_only(read_cvbench), score_cvbench),
    Benchmark("mmvp", "MMVP", "vl", 512, open_world_only(read_mmvp), score_mmvp),
]}
BENCH_GROUPS = {group: tuple(n for n, b in BENCHMARKS.items() if b.group == group)
                for group in dict.fromkeys(b.group for b in BENCHMARKS.values())}
BENCH_GROUPS["all"] = BENCH_GROUPS["cls"] + BENCH_GROUPS["vl"]  # the paper's 11
CLS_BENCHES, VL_BENCHES = BENCH_GROUPS["cls"], BENCH_GROUPS["vl"]
MAX_NEW_TOKENS = {n: b.max_new_tokens for n, b in BENCHMARKS.items()}


def read_bench(bench, root, world="open", closed_k=None):
    return BENCHMARKS[bench].read(root, world, closed_k)


def score_bench(bench, records, match="official", **options):
    return BENCHMARKS[bench].score(records, match=match, **options)


# -----------------------------------------------------------------------------
# The paper's tables

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
    """rows: list of (name, {bench: headline}, {bench: (vision, language) mean weights}); a scores
    dict may also hold "mmvp_question" (MMVP question accuracy). -> Markdown: Tables 2, 3 and 4 in
    the paper's layout, then any benchmark outside the paper's tables."""
    name_of = lambda b: BENCHMARKS[b].display
    out = ["Table 2: classification accuracy (%)", "",
           "| Model | " + " | ".join(name_of(b) for b in CLS_BENCHES) + " | Average |",
           "|---" * (len(CLS_BENCHES) + 2) + "|"]
    for name, scores, _ in rows:
        out.append(f"| {name} | " + " | ".join(fmt(scores.get(b)) for b in CLS_BENCHES) + f" | {fmt(table2_average(scores))} |")
    out += ["", "Table 3: vision-language benchmarks (POPE F1, MME P+C, MMVP pair accuracy, others accuracy; "
            "the average uses MME/20)", "",
            "| Model | " + " | ".join(name_of(b) for b in VL_BENCHES) + " | Average | MMVP question acc. |",
            "|---" * (len(VL_BENCHES) + 3) + "|"]
    for name, scores, _ in rows:
        out.append(f"| {name} | " + " | ".join(fmt(scores.get(b)) for b in VL_BENCHES) +
                   f" | {fmt(table3_average(scores))} | {fmt(scores.get('mmvp_question'))} |")
    out += ["", f"MMVP: {MMVP_NOTE}.",
            "", "Table 4: mean context weights (vision / language)", "",
            "| Model | Classification | Vision-language |", "|---|---|---|"]
    for name, _, weights in rows:
        cells = []
        for group in (CLS_BENCHES, VL_BENCHES):
            ws = [weights[b] for b in group if weights.get(b) is not None]
            cells.append("-" if not ws else f"{sum(w[0] for w in ws) / len(ws):.2f} / {sum(w[1] for w in ws) / len(ws):.2f}")
        out.append(f"| {name} | {cells[0]} | {cells[1]} |")
    extra = [b for b in BENCHMARKS if b not in BENCH_GROUPS["all"] and any(b in s for _, s, _ in rows)]
    if extra:
        out += ["", "Other benchmarks (not in the paper's averages)", "",
                "| Model | " + " | ".join(name_of(b) for b in extra) + " |", "|---" * (len(extra) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(fmt(scores.get(b)) for b in extra) + " |" for name, scores, _ in rows]
    return "\n".join(out) + "\n"


def read_eval_dir(path):
    """(scores, weights) from <path>/<bench>/metrics.json, or <path>/eval/<bench>/... for a run dir."""
    if not any(os.path.exists(os.path.join(path, b, "metrics.json")) for b in BENCHMARKS) \
            and os.path.isdir(os.path.join(path, "eval")):
        path = os.path.join(path, "eval")
    scores, weights = {}, {}
    for b in BENCHMARKS:
        p = os.path.join(path, b, "metrics.json")
        if os.path.exists(p):
            with open(p) as f:
                m = json.load(f)
            scores[b] = m["headline"]
            if b == "mmvp" and m.get("question_accuracy") is not None:
                scores["mmvp_question"] = m["question_accuracy"]
            cw = m.get("context_weights")
            weights[b] = (cw["vision"], cw["language"]) if cw else None
    return scores, weights


def table_name(path):
    """A row's name: the run's (<run>/eval -> run; a checkpoint <run>/ckpt/step_N or its eval folder
    <run>/eval-step_N -> run@step_N), else the folder's."""
    parent, base = os.path.split(os.path.normpath(path))
    if base == "eval":
        return os.path.basename(parent)
    if re.fullmatch(r"eval-step_\d+", base):
        return f"{os.path.basename(parent)}@{base[len('eval-'):]}"
    if re.fullmatch(r"step_\d+", base) and os.path.basename(parent) == "ckpt":
        return f"{os.path.basename(os.path.dirname(parent))}@{base}"
    return base


def read_eval_dirs(dirs, where="--table"):
    """-> [(row name, scores, weights)] of eval folders (or run folders holding eval/), in order;
    FileNotFoundError naming a folder that is missing or holds no scored benchmark."""
    rows = []
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{where}: {d} is not a directory")
        scores, weights = read_eval_dir(d)
        if not scores:
            raise FileNotFoundError(f"{where}: no <bench>/metrics.json under {d} (nor {d}/eval): run eval.py first")
        rows.append((table_name(d), scores, weights))
    return rows


def comparison_table(dirs):
    return markdown_tables(read_eval_dirs(dirs))
