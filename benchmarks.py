"""
benchmarks.py: the paper's 11 benchmarks: for each, its prompt, its reader and its official scorer.
"""
import base64
import csv
import glob
import io
import json
import os
import random
import re
import string
import sys

from PIL import Image

from data import IMAGE_EXTENSIONS, closed_world_question



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


MAX_NEW_TOKENS = {  # per-bench default when neither --max-new-tokens nor the preset fixes it
    "imagenet": 64, "caltech101": 64, "flowers102": 64, "food101": 64, "sqa": 32, "textvqa": 32,
    "pope": 16, "mme": 16, "mmbench": 32, "cvbench": 32, "mmvp": 32,
}


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
    return closed_world_question(OPEN_WORLD_QUESTION, shuffled)


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
