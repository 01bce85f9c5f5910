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
import glob
import json
import os
import sys

import torch
from tqdm import tqdm

import carpe
import tiny
from benchmarks import (BENCH_GROUPS, CLS_BENCHES, MAX_NEW_TOKENS, comparison_table, markdown_tables, open_image,
                        read_bench, read_eval_dir, score_bench, table2_average, table3_average, table_name)
from common import (barrier, base_side_of_run, interpolate_weights, is_run_dir, load_run, print0,
                    setup_distributed)
from data import ConversationTokenizer, n_image_tokens, vicuna_prompt

PRESETS = {  # defaults a preset fills in when the flag is not given
    "tiny": dict(base="tiny", data_root="runs/tiny-eval-data", batch_size=4, max_new_tokens=8, workers=0, dtype="float32"),
    "llava-7b": dict(base="llava-hf/llava-1.5-7b-hf", data_root="playground/data/eval", batch_size=16,
                     max_new_tokens=None, workers=4, dtype="auto"),
}




# -----------------------------------------------------------------------------
# data readers: each returns a list of items dict(id, question, image, meta). `image` is a
# file path or {"b64": str} / {"bytes": bytes}; `meta` holds what the scorer needs and is
# copied into predictions.jsonl, so scoring reads the predictions file alone.


# -----------------------------------------------------------------------------
# --preset tiny: small synthetic copies of every benchmark's release format, drawn with the
# shapes of data.py's synthetic set (so a tiny CARPE trained by train.py can score on them)


# -----------------------------------------------------------------------------
# answer parsers and scorers (pure functions of predictions records)


# -----------------------------------------------------------------------------
# the paper's tables


# -----------------------------------------------------------------------------
# WiSE-FT: stream-interpolate two weight sets on CPU


# -----------------------------------------------------------------------------
# the model


def resolve_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return dict(float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16)[name]


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
        model, processor, image_transform = load_run(ckpt, device=device, dtype=dtype)
        with open(os.path.join(ckpt, "config.json")) as f:
            method = json.load(f)["method"]
    else:
        method = args.method or "llava"
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
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"),
                   help="where --preset tiny finds train.py's tiny base and keeps the untrained tiny LLaVA ('tiny')")
    p.add_argument("--table-out", default=None, help="also write the --table Markdown to this file")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("base", "data_root", "batch_size", "workers", "dtype"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    base_given = any(a == "--base" or a.startswith("--base=") for a in (argv if argv is not None else sys.argv[1:]))
    if args.preset == "tiny" and args.base == "tiny" and not base_given:
        args.base = tiny.tiny_default_base(args.cache_dir)
    elif args.base == "tiny":
        args.base = tiny.ensure_random_base(args.cache_dir)
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
    rank, world, local_rank, device = setup_distributed()
    if args.preset == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy machine
    try:
        if int(os.environ.get("RANK", 0)) == 0:
            os.makedirs(args.out, exist_ok=True)
            if args.preset == "tiny" and not os.path.isdir(args.data_root):
                print0(f"drawing the synthetic tiny benchmarks into {args.data_root}")
                tiny.build_tiny_benchmarks(args.data_root)
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
