"""
eval.py: evaluate CARPE, CARPE-MoE and the baselines on the paper's benchmarks: greedy, cached,
batched generation, resumable, sharded under torchrun, scored by benchmarks.py, summarised as the
paper's Tables 2-4.

    python eval.py --bench all --ckpt runs/carpe                  # a train.py run dir (CARPE, MoE, baselines)
    python eval.py --bench vl --method llava --preset llava-7b    # vanilla LLaVA-1.5-7B, no CARPE modules
    python eval.py --bench cls --wise-ft BASE_DIR FT_DIR --alpha 0.5   # WiSE-FT
    torchrun --nproc_per_node 8 eval.py --bench all --ckpt runs/carpe  # sharded, gathered on rank 0
    python eval.py --table runs/llava/eval runs/carpe/eval          # one Markdown table, a row per dir
    python eval.py --bench all --preset tiny                         # offline: tiny model, synthetic benchmarks

What a benchmark is (its data layout, prompt, reader, official scorer, answer length, display
name) lives in benchmarks.py; this file only runs the model over the items.

Outputs under <out>/<bench>/ (default <out> = <ckpt>/eval; <run>/eval-step_N for a checkpoint
<run>/ckpt/step_N, which --ckpt also takes; else runs/eval-<method>):
  predictions.jsonl  one line per item: {id, answer, error, context_weights, route, prompt, **meta},
                     appended and flushed after every batch. `prompt` is a short digest of the
                     question; the question itself is rebuilt from the item id and run.json (world,
                     closed_k, template), so lines stay short even for closed-world ImageNet.
                     Under torchrun each rank appends to predictions.rank<r>.jsonl and rank 0
                     appends those lines to predictions.jsonl at the end, waiting for each file
                     by its name (a network file system may serve a stale folder listing).
  .lock              held by the eval.py working on this benchmark (rank 0, from before its
                     model loads to its end), naming its pid.
  metrics.json       the scorer's output (headline + sub-scores), n, n_failed and the failed ids,
                     mean (vision, language) context weights (Table 4), the MoE routing histogram
                     keyed by expert name.
  run.json           what produced the predictions: the method, the weights' digest, the dtype,
                     the template and the prompt settings.
and <out>/summary.md (+ summary.json): Tables 2 / 3 / 4 in the paper's layout for every bench there.

What a fault costs:
  - a crash or kill mid-run: at most one batch; a rerun reads the predictions once, cuts a torn
    last line in place, and generates only what is missing (nothing is rewritten);
  - a rerun into the same --out with other weights (a run retrained in place), another dtype or
    other prompt settings: refused, naming both;
  - an unreadable item (truncated image, broken base64, an answer missing from its options): that
    item. It is recorded as a failed prediction (answer "", error naming the file) and scored as
    an empty answer; metrics.json counts it. Failed items are final: a rerun does not retry them
    unless --retry-failed;
  - a benchmark folder with no items, non-finite weights, a prompt longer than the model's
    positions: an error naming the folder / tensor / both lengths, before any score is written;
  - run.json, metrics.json, summary.* and the tiny benchmark folders are written atomically;
  - a second eval.py on a benchmark folder in use: refused at once, before its model loads, naming
    the pid that holds <out>/<bench>/.lock (as train.py's run-folder lock). Waiting instead would
    leave its other ranks in a collective for as long as the first runs; once the first is done
    a rerun generates nothing new;
  - --out naming a file, --ckpt naming a run still training (no final weights: its newest
    checkpoint is named, and --ckpt takes it), a rank's predictions file that never shows:
    a one-line error naming the path.

Choices:
  - The tiny preset's synthetic benchmarks live in <--cache-dir>/tiny-eval-data (the repository's
    .cache by default, as train.py's), so the working directory does not matter.
  - Items are batched in dataset order after the finished ones are removed; whole batches are
    dealt to ranks round-robin, so a sharded run sees the same batches as a single process.
  - --limit N keeps the first N items in file order (for MMBench, whole circular groups are not
    guaranteed; use it for smoke tests only).
  - The digest of a run dir's weights is common.run_digest (sha256 of its weights file). For a
    bare base it is the sha256 of its config.json and of the name, size and mtime of each weights
    file (hashing 14 GB at every start would cost minutes; a base is rarely rewritten in place and
    any rewrite changes the mtime). WiSE-FT: the digest of both inputs and alpha.
  - WiSE-FT (--wise-ft A B --alpha a): see common.interpolate_weights; a base (HF id / dir) paired
    with a run dir trained from it interpolates the run's tensors with the base's own values of
    them, so `--wise-ft llava-hf/llava-1.5-7b-hf runs/imagenet-ft --alpha 0.5` is the paper's
    WiSE-FT row made from our own ImageNet fine-tune.
"""
import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from huggingface_hub import try_to_load_from_cache
from torch.utils.data import DataLoader
from tqdm import tqdm

import baselines
import carpe
import kernels
import pretrained
import small
import tiny
from benchmarks import (BENCH_GROUPS, BENCHMARKS, MATCH_RULES, comparison_table, markdown_tables, read_eval_dir,
                        table2_average, table3_average, table_name)
from common import (CHECKPOINT_NAME, DiskFullError, FolderInUseError, barrier, base_side_of_run, interpolate_weights, is_run_dir,
                    list_checkpoints, lock_folder, print0, run_digest, setup_distributed, write_json_atomic,
                    write_text_atomic)
from data import TEMPLATES, BadSampleError, ConversationTokenizer, load_image, n_image_tokens

PRESETS = {  # defaults a preset fills in when the flag is not given
    # tiny: the synthetic benchmarks are drawn once into <--cache-dir>/tiny-eval-data, whatever the working directory
    "tiny": dict(base="tiny", data_root=None, batch_size=4, max_new_tokens=8, workers=0, dtype="float32"),
    "llava-7b": dict(base="llava-hf/llava-1.5-7b-hf", data_root="playground/data/eval", batch_size=16,
                     max_new_tokens=None, workers=4, dtype="auto"),
    # small: small.py's SmolLM2 + Fashion-MNIST world (base and data root resolved from its cache)
    "small": {k: v for k, v in small.EVAL_PRESET.items() if k != "template"},
}


RANK_FILE_TIMEOUT_S = 300  # rank 0 waits this long for a rank's predictions file to show by name


class EvalError(Exception):
    """A refusal with a one-line message naming the cause (printed without a traceback)."""


def short_digest(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# the model and what identifies it

@dataclass
class ModelSource:
    """What produced the predictions; stored in run.json, a rerun must match it."""
    method: str
    ckpt: str | None  # a train.py run dir
    base: str | None  # a bare base (without --ckpt)
    wise_ft: list | None  # [A, B]
    alpha: float | None
    template: str  # the conversation template of the prompts
    weights: str  # a digest of the weights
    dtype: str


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    image_transform: object  # list of PIL images -> pixel_values (a dict of them for CARPE-MoE)
    source: ModelSource


def base_digest(base):
    """sha256 of a base folder's config.json and of its weights files' names, sizes and mtimes. A
    Hub id is looked up in the local Hub cache (after loading, it is there)."""
    folder = base
    if not os.path.isdir(base):
        cached = try_to_load_from_cache(base, "config.json")
        if not isinstance(cached, str):
            return short_digest(f"hub:{base}")  # not in the cache: the id is all we know
        folder = os.path.dirname(cached)
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin", ".index.json")):
            st = os.stat(os.path.join(folder, name))  # follows the Hub cache's symlinks to the blobs
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def weights_digest(path):
    return run_digest(path) if is_run_dir(path) else base_digest(path)


def check_finite_weights(model, where):
    """Refuse NaN / inf anywhere in the model (also after a cast to float16 that overflowed)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EvalError(f"{where}: weight {name} holds non-finite values (NaN or inf); refusing to evaluate it")


def merge_wise_ft(args):
    """Rank 0 writes the WiSE-FT weights into <out>/wise_ft_weights. -> (run dir or None, base dir or None)."""
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
    return (merged, None) if is_run_dir(merged) else (None, merged)


def load_model(args, device):
    """-> LoadedModel: a run dir (--ckpt), WiSE-FT weights, or a model built around a bare base."""
    dtype = pretrained.torch_dtype(args.dtype, device)
    norm = lambda p: os.path.normpath(p) if p and os.path.exists(p) else p  # ./runs/x and runs/x are one run
    if args.wise_ft:
        ckpt, base = merge_wise_ft(args)
        digest = short_digest(f"{weights_digest(args.wise_ft[0])} {weights_digest(args.wise_ft[1])} {args.alpha!r}")
    else:
        ckpt, base = args.ckpt, args.base
    if ckpt:  # its base resolved as the run config names it ("preset:tiny", a Hub id, a folder)
        model = pretrained.load(ckpt, device=device, dtype=dtype, cache_dir=args.cache_dir if args.cache_dir_given else None)
        processor, image_transform = model.processor, model.image_transform
        method, template = model.run_config["method"], model.template
    else:
        method, template = args.method or "llava", args.template
        llava, processor = carpe.load_base(base, device=device, dtype=dtype)
        model = baselines.build_model(method, llava, carpe.CarpeConfig(integrator_heads=args.integrator_heads))
        model.to(device=device, dtype=dtype)
        image_transform = carpe.make_image_transform(processor)
    model.eval()
    check_finite_weights(model, ckpt or base)
    if not args.wise_ft:
        digest = weights_digest(ckpt) if ckpt else base_digest(base)
    if args.compile:  # regional: each repeated block compiled once, the data-dependent glue stays eager
        kernels.compile_blocks(carpe.repeated_blocks(model))
    source = ModelSource(method=method, ckpt=norm(args.ckpt), base=None if ckpt else norm(base), wise_ft=args.wise_ft,
                         alpha=args.alpha if args.wise_ft else None, template=template, weights=digest,
                         dtype=str(dtype).removeprefix("torch."))
    return LoadedModel(model, processor, image_transform, source)


def expert_names(model):
    """CARPE-MoE's expert names in route order, or None for a model without experts."""
    vision_moe = getattr(model, "vision_moe", None)
    if vision_moe is None:
        return None
    return vision_moe.expert_names


# -----------------------------------------------------------------------------
# batches: prompts, images and the items that failed to load

@dataclass
class Batch:
    items: list  # the benchmark Items that go to the model, in order
    failed: list  # prediction records of the items that could not be read
    input_ids: torch.Tensor | None  # (B, T), left-padded; None when every item failed
    attention_mask: torch.Tensor | None  # (B, T)
    pixel_values: object  # (B, 3, H, W), or {expert: tensor} for CARPE-MoE


def describe_image(ref):
    return ref if isinstance(ref, str) else "<image embedded in the benchmark file>"


def failed_record(item, error):
    return dict(id=item.id, answer="", error=error, path=describe_image(item.image), context_weights=None,
                route=None, prompt=short_digest(item.question), **item.meta)


class BatchCollator:
    """Turns a list of items into a Batch (runs in DataLoader workers: images decode there). Prompts
    come from data.ConversationTokenizer.encode_prompt, the ids training gives that user turn. An
    item whose image does not decode becomes a failed record instead of stopping the benchmark."""

    def __init__(self, tokenizer, image_transform, n_image_tokens, template):
        self.image_transform = image_transform
        self.conversation = ConversationTokenizer(tokenizer, n_image_tokens, tokenizer.convert_tokens_to_ids("<image>"),
                                                  template=template)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, batch):
        good, images, failed = [], [], []
        for item in batch[0]:
            if item.error:  # the reader could not make sense of this item
                failed.append(failed_record(item, item.error))
                continue
            try:
                images.append(load_image(item.image))  # the decoder training uses (16-bit, float modes scaled)
            except BadSampleError as e:  # truncated file, broken base64, not an image: this item only
                failed.append(failed_record(item, str(e)))
                continue
            good.append(item)
        if not good:
            return Batch([], failed, None, None, None)
        rows = [self.conversation.encode_prompt(item.question, has_image=True) for item in good]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T), left-padded for generate()
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, T - len(r):] = torch.tensor(r)
            attention_mask[b, T - len(r):] = 1
        return Batch(good, failed, input_ids, attention_mask, self.image_transform(images))


def check_length(batch, max_new, max_positions, closed_world):
    """A prompt plus its answer must fit the model's positions (closed-world ImageNet lists 1000
    names: about 5-6k tokens, past Vicuna's 4096)."""
    lengths = batch.attention_mask.sum(1)  # (B,) prompt lengths without padding
    longest = int(lengths.argmax())
    if int(lengths[longest]) + max_new > max_positions:
        advice = (" Use --closed-k K to list K candidates (the true class among them, as training does) instead "
                  "of every class." if closed_world else " Lower --max-new-tokens or use a base with more positions.")
        raise EvalError(f"item {batch.items[longest].id}: its prompt is {int(lengths[longest])} tokens, + {max_new} new "
                        f"tokens > the model's {max_positions} positions (text_config.max_position_embeddings).{advice}")


def to_device(pixel_values, device, dtype):
    if isinstance(pixel_values, dict):  # CARPE-MoE: one tensor per expert
        return {k: v.to(device=device, dtype=dtype) for k, v in pixel_values.items()}
    return pixel_values.to(device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# predictions files: append-only, read once, torn tails cut in place

def read_predictions(path):
    """Records of a predictions file, in file order. A last line without its newline (a crash
    mid-write) is cut from the file in place (os.truncate), so appending continues cleanly."""
    if not os.path.exists(path):
        return []
    records, good_end = [], 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # only the last line can lack its newline
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise EvalError(f"{path}: line {n} is not valid JSON (and it is not a torn last line); "
                                    f"fix or delete the file") from None
            good_end += len(line)
    if good_end < os.path.getsize(path):
        os.truncate(path, good_end)
    return records


def append_records(path, records):
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def leftover_rank_files(bench_dir):
    """The rank files a sharded run killed before its gather left behind (any world size)."""
    return sorted(os.path.join(bench_dir, n) for n in os.listdir(bench_dir) if n.startswith("predictions.rank"))


@dataclass
class Predictions:
    """What the predictions file of a benchmark holds (rank 0's view)."""
    records: dict  # id -> record; a later line of an id (a retried failure) wins
    n_lines: int


def absorb_rank_files(bench_dir, known: Predictions, order, paths):
    """Append the ranks' files (paths) to predictions.jsonl (only lines not already there, in item
    order), then remove them. Safe to repeat after a crash between the append and the removal."""
    new = []
    for path in paths:
        new += [r for r in read_predictions(path) if known.records.get(r["id"]) != r]
    new.sort(key=lambda r: order.get(r["id"], len(order)))
    if new:
        append_records(os.path.join(bench_dir, "predictions.jsonl"), new)
    for path in paths:
        os.remove(path)
    known.records.update((r["id"], r) for r in new)
    known.n_lines += len(new)


def compact(bench_dir, known: Predictions, order):
    """Rewrite predictions.jsonl with one line per id (only after --retry-failed replaced lines)."""
    path = os.path.join(bench_dir, "predictions.jsonl")
    records = sorted(known.records.values(), key=lambda r: order.get(r["id"], len(order)))
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)
    known.n_lines = len(records)


# -----------------------------------------------------------------------------
# one benchmark: generate what is missing, gather, score

@dataclass
class RunSignature:
    """Everything the predictions of <out>/<bench> depend on (run.json)."""
    model: dict  # ModelSource
    bench: str
    world: str | None  # classification only
    closed_k: int | None
    max_new_tokens: int


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_signature(bench_dir, signature: RunSignature):
    """Write run.json on the first run; refuse a rerun whose weights, dtype or settings differ."""
    path = os.path.join(bench_dir, "run.json")
    new = json.loads(json.dumps(asdict(signature)))
    if not os.path.exists(path):
        write_json_atomic(path, new)
        return
    with open(path) as f:
        old = json.load(f)
    a, b = flatten(old), flatten(new)
    # where the run folder lies is no setting: a moved run has the same weights digest
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "model.ckpt"]
    if diff:
        there = ", ".join(f"{k}={a.get(k)}" for k in diff)
        now = ", ".join(f"{k}={b.get(k)}" for k in diff)
        raise EvalError(f"{bench_dir} holds predictions from another setting ({there}); this run has ({now}). "
                        f"Use another --out, or delete {bench_dir} to start over.")


def generate_records(loaded: LoadedModel, batches, args, device, bench, out_file):
    """Greedy answers for each batch, appended to out_file and flushed per batch. -> the new records."""
    model, tokenizer = loaded.model, loaded.processor.tokenizer
    max_new = args.max_new_tokens or bench.max_new_tokens
    collate = BatchCollator(tokenizer, loaded.image_transform, n_image_tokens(loaded.processor), loaded.source.template)
    max_positions = model.llava.config.text_config.max_position_embeddings
    loader = DataLoader(batches, batch_size=1, collate_fn=collate, num_workers=args.workers)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    names = expert_names(model)
    new = []
    with open(out_file, "a") as f:
        for batch, items in zip(tqdm(loader, desc=bench.name, disable=int(os.environ.get("RANK", 0)) != 0), batches):
            records = {r["id"]: r for r in batch.failed}
            if batch.items:
                check_length(batch, max_new, max_positions, bench.group == "cls" and args.world == "closed")
                out = model.generate(batch.input_ids.to(device), batch.attention_mask.to(device),
                                     to_device(batch.pixel_values, device, dtype), max_new_tokens=max_new,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     return_dict=True)
                answers = tokenizer.batch_decode(out.sequences[:, batch.input_ids.size(1):], skip_special_tokens=True)
                weights = out.context_weights.float().cpu().tolist() if out.context_weights is not None else None
                routes = out.route.cpu().tolist() if out.route is not None else None
                for b, item in enumerate(batch.items):
                    route = routes[b] if routes is not None and routes[b] >= 0 else None  # -1: no image
                    records[item.id] = dict(id=item.id, answer=answers[b].strip(), error=None,
                                            context_weights=weights[b] if weights else None,
                                            route=names[route] if route is not None else None,
                                            prompt=short_digest(item.question), **item.meta)
            ordered = [records[item.id] for item in items]  # the batch's item order, failures included
            f.writelines(json.dumps(r) + "\n" for r in ordered)
            f.flush()  # a crash loses at most this batch
            new += ordered
    return new


def summarize_weights(records):
    ws = [r["context_weights"] for r in records if r.get("context_weights") is not None]
    if not ws:
        return None
    return dict(vision=sum(w[0] for w in ws) / len(ws), language=sum(w[1] for w in ws) / len(ws))


def routing_histogram(records, names):
    """{expert name: number of items routed to it}, in the experts' order (None without experts)."""
    if not names:
        return None
    counts = {name: 0 for name in names}
    for r in records:
        if r.get("route") is not None:
            counts[r["route"]] += 1
    return counts


def load_items(bench, args):
    items = bench.read(args.data_root, world=args.world, closed_k=args.closed_k)
    if args.limit:
        items = items[:args.limit]
    if not items:
        raise EvalError(f"{bench.name}: no items were read from the benchmark's folder under {os.path.abspath(args.data_root)} "
                        f"(an empty benchmark scores nothing; check the data layout in benchmarks.py)")
    seen = set()
    for it in items:
        if it.id in seen:
            raise EvalError(f"{bench.name}: item id {it.id} appears twice in the data under {args.data_root}")
        seen.add(it.id)
    return items


def resume_state(bench_dir, items):
    """Rank 0: read the predictions once (cutting a torn tail, absorbing rank files of a crashed
    sharded run), check that finished items were asked the same prompts. -> Predictions."""
    order = {it.id: n for n, it in enumerate(items)}
    lines = read_predictions(os.path.join(bench_dir, "predictions.jsonl"))
    known = Predictions(records={r["id"]: r for r in lines}, n_lines=len(lines))
    absorb_rank_files(bench_dir, known, order, leftover_rank_files(bench_dir))
    prompts = {it.id: short_digest(it.question) for it in items}
    for r in known.records.values():
        if r["id"] in prompts and r.get("prompt") != prompts[r["id"]]:
            raise EvalError(f"{bench_dir}: item {r['id']} was answered for another prompt than the reader builds now "
                            f"(the data or the prompt code changed). Use another --out, or delete {bench_dir}.")
    return known


def lock_bench_dir(bench_dir):
    """An exclusive lock on <bench>/.lock for the life of the returned file (common.lock_folder),
    else an EvalError naming the holder's pid."""
    try:
        return lock_folder(bench_dir)
    except FolderInUseError as err:
        raise EvalError(f"{bench_dir} is being evaluated by another eval.py (pid {err.holder} holds {err.lock_path}); "
                        f"rerun once it is done (its finished items are kept, nothing is generated twice), "
                        f"or use another --out") from None


def lock_benchmarks(out, benches, rank, world):
    """Rank 0 locks every benchmark folder of this run before the model loads and holds them to
    the end. -> the lock files. A second eval.py on any of them is refused at once, on every rank,
    naming the pid: else it would generate every item again (the first's lines appear only as it
    goes). Disjoint benchmarks in one --out still run side by side."""
    locks, refusal = [], None
    if rank == 0:
        try:
            for bench in benches:
                locks.append(lock_bench_dir(os.path.join(out, bench.name)))
        except EvalError as e:
            refusal = str(e)
    shared = [refusal]
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0]:
        for f in locks:
            f.close()
        raise EvalError(shared[0])
    return locks


def rank_file(bench_dir, rank):
    return os.path.join(bench_dir, f"predictions.rank{rank}.jsonl")


def wait_for_files(paths, timeout_s):
    """Rank 0, after the barrier that follows every rank's write: wait until each expected file is
    seen by its name. A network file system may serve a cached directory listing for a while, so
    the files are never found by listing the folder."""
    deadline = time.monotonic() + timeout_s
    for path in paths:
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise EvalError(f"{path} is missing {timeout_s:g} s after every rank finished writing its "
                                f"predictions (a rank that died, or a file system that does not show it)")
            time.sleep(0.2)


def gather_rank_files(bench_dir, known: Predictions, order, world, timeout_s=None):
    """Rank 0: append every rank's predictions.rank<r>.jsonl, each waited for by its expected name."""
    paths = [rank_file(bench_dir, r) for r in range(world)]
    wait_for_files(paths, RANK_FILE_TIMEOUT_S if timeout_s is None else timeout_s)
    absorb_rank_files(bench_dir, known, order, paths)


def run_bench(bench, items, loaded: LoadedModel, args, device):
    """Generate what is missing (sharded), gather, score. -> metrics dict (rank 0) or None."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    bench_dir = os.path.join(args.out, bench.name)
    max_new = args.max_new_tokens or bench.max_new_tokens
    is_cls = bench.group == "cls"
    known, done, refusal = None, None, None
    if rank == 0:
        try:
            check_signature(bench_dir, RunSignature(asdict(loaded.source), bench.name, args.world if is_cls else None,
                                                    args.closed_k if is_cls else None, max_new))
            known = resume_state(bench_dir, items)
            done = {i for i, r in known.records.items() if not (args.retry_failed and r.get("error"))}
        except EvalError as e:
            refusal = str(e)
    shared = [done, refusal]
    if world > 1:
        dist.broadcast_object_list(shared, src=0)  # only rank 0 reads the file; the others get the finished ids
    if shared[1]:
        raise EvalError(shared[1])  # on every rank, so none waits in a collective for the others
    return generate_gather_score(bench, items, loaded, args, device, shared[0], known, rank, world)


def generate_gather_score(bench, items, loaded: LoadedModel, args, device, done, known, rank, world):
    """run_bench after rank 0's checks: every rank generates its share, rank 0 gathers and scores."""
    bench_dir = os.path.join(args.out, bench.name)
    max_new = args.max_new_tokens or bench.max_new_tokens
    todo = [it for it in items if it.id not in done]
    print0(f"{bench.name}: {len(items)} items, {len(items) - len(todo)} already done, {len(todo)} to generate")
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    out_file = os.path.join(bench_dir, "predictions.jsonl") if world == 1 else rank_file(bench_dir, rank)
    if batches[rank::world]:
        new = generate_records(loaded, batches[rank::world], args, device, bench, out_file)
    else:
        new = []
        open(out_file, "a").close()  # every rank's file exists: rank 0 waits for each by name
    barrier()  # every rank has flushed its file
    if rank != 0:
        barrier()
        return None
    order = {it.id: n for n, it in enumerate(items)}
    if world == 1:
        known.records.update((r["id"], r) for r in new)
        known.n_lines += len(new)
    else:
        gather_rank_files(bench_dir, known, order, world)
    if known.n_lines > len(known.records):
        compact(bench_dir, known, order)
    missing = [it.id for it in items if it.id not in known.records]
    if missing:
        raise EvalError(f"{bench.name}: {len(missing)} items have no prediction after generation (e.g. {missing[:3]})")
    metrics = score(bench, [known.records[it.id] for it in items], loaded, args, max_new)
    write_json_atomic(os.path.join(bench_dir, "metrics.json"), metrics)
    failed = f" ({metrics['n_failed']} failed items scored as empty answers)" if metrics["n_failed"] else ""
    print0(f"{bench.display}: {metrics['headline']:.2f}{failed}")
    barrier()
    return metrics


def score(bench, records, loaded: LoadedModel, args, max_new):
    """metrics.json: the official score of every item (failed ones as empty answers) and the rest."""
    failed = [r["id"] for r in records if r.get("error")]
    metrics = dict(bench=bench.name, **bench.score(records, match=args.match))
    metrics.update(n=len(records), n_failed=len(failed), failed_ids=failed,
                   context_weights=summarize_weights(records),
                   routing=routing_histogram(records, expert_names(loaded.model)), model=asdict(loaded.source),
                   settings=dict(world=args.world, closed_k=args.closed_k, match=args.match, limit=args.limit,
                                 max_new_tokens=max_new))
    return metrics


def write_summary(out_dir, name):
    """summary.md + summary.json of every benchmark in out_dir, under <out>/.summary.lock (eval.py
    processes on other benchmarks of one --out write them in turn, each from all the metrics there)."""
    with open(os.path.join(out_dir, ".summary.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        scores, weights = read_eval_dir(out_dir)
        text = markdown_tables([(name, scores, weights)])
        write_text_atomic(os.path.join(out_dir, "summary.md"), text)
        write_json_atomic(os.path.join(out_dir, "summary.json"),
                          dict(name=name, scores=scores, context_weights=weights, table2_average=table2_average(scores),
                               table3_average=table3_average(scores)))
    return text


# -----------------------------------------------------------------------------
# command line

def positive(flag):
    def parse(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate CARPE / CARPE-MoE / baselines on the paper's benchmarks.")
    p.add_argument("--bench", default=None, help="a benchmark (" + ", ".join(BENCHMARKS) + ") or a group (" +
                   ", ".join(BENCH_GROUPS) + "); comma-separated lists work too")
    p.add_argument("--ckpt", default=None, help="a train.py run folder (its final weights): CARPE, MoE or a baseline; "
                   "or one of its checkpoints, <run>/ckpt/step_N (then --out defaults to <run>/eval-step_N)")
    p.add_argument("--method", default=None, choices=["llava", "carpe", "imagenet-ft", "levi"],
                   help="without --ckpt: the model built around --base (llava = vanilla LLaVA, no CARPE modules; default llava)")
    p.add_argument("--base", default=None, help="base LLaVA: an HF id, an HF dir, or 'tiny' (the random tiny LLaVA); "
                   "default: the preset's (tiny: train.py's cached pre-stage base if present, else 'tiny')")
    p.add_argument("--template", default=None, choices=TEMPLATES, help="conversation template of the prompts for a "
                   "model built around --base (default vicuna_v1); a --ckpt run uses the template it was trained with")
    p.add_argument("--preset", default="llava-7b", choices=list(PRESETS), help="defaults for base, data root, batch size, dtype (tiny: the offline tiny world; small: small.py's SmolLM2 + Fashion-MNIST world, bench fashion-mnist; llava-7b: the paper's)")
    p.add_argument("--data-root", default=None, help="root of the benchmark folders (default: the preset's; tiny: "
                   "<--cache-dir>/tiny-eval-data, drawn on first use)")
    p.add_argument("--out", default=None, help="output folder (default <ckpt>/eval, <run>/eval-step_N for a checkpoint, "
                   "else runs/eval-<method>)")
    p.add_argument("--world", default="open", choices=["open", "closed"],
                   help="classification prompt: open, or closed with the candidate classes listed")
    p.add_argument("--closed-k", type=positive("--closed-k"), default=None,
                   help="closed world: list K candidates (the true class and K-1 others, shuffled per item, as "
                   "training does) instead of every class; needed when all names do not fit the model's positions")
    p.add_argument("--match", default="official", choices=MATCH_RULES, help="answer-matching rule: official (each "
                   "benchmark's own script; for classification the label as a substring of the answer), or a variant a "
                   "benchmark offers (exact: the answer equals the label); recorded in metrics.json")
    p.add_argument("--limit", type=positive("--limit"), default=None, help="evaluate only the first N items of each benchmark")
    p.add_argument("--batch-size", type=positive("--batch-size"), default=None, help="prompts per generate call, per rank")
    p.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), default=None,
                   help="generation length cap (default: the preset's, else each benchmark's)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers that decode images (0: in the main process)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="model dtype (auto: float16 on GPU, float32 on CPU); recorded in run.json")
    p.add_argument("--compile", action="store_true", help="torch.compile each repeated block (decoder layers, vision "
                   "layers, integrator blocks); the first batches pay the compile time")
    p.add_argument("--dist-timeout", type=float, default=60.0,
                   help="under torchrun: minutes any collective may wait before the run fails (NCCL's own default is "
                        "10): rank 0 alone loads, interpolates and writes --wise-ft's two 13.5 GB sides while the "
                        "other ranks wait")
    p.add_argument("--retry-failed", action="store_true",
                   help="generate again the items recorded as failed (unreadable image, ...) by an earlier run")
    p.add_argument("--integrator-heads", type=positive("--integrator-heads"), default=32,
                   help="CarpeConfig.integrator_heads for a model built without --ckpt")
    p.add_argument("--wise-ft", nargs=2, metavar=("A", "B"), default=None,
                   help="WiSE-FT: evaluate (1 - alpha) * A + alpha * B; A, B: two run dirs, two HF dirs with the "
                   "same tensors, or a base (HF id or dir) and a run dir trained from it")
    p.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT mixing coefficient (0 = A, 1 = B)")
    p.add_argument("--table", nargs="+", metavar="DIR", default=None,
                   help="only print one Markdown table (Tables 2-4) with a row per eval dir (or run dir with eval/)")
    p.add_argument("--table-out", default=None, help="also write the --table Markdown to this file")
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"),
                   help="where --preset tiny finds train.py's tiny base, keeps the untrained tiny LLaVA ('tiny') and "
                   "draws its benchmarks (default: the repository's .cache, whatever the working directory)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("base", "data_root", "batch_size", "workers", "dtype", "max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    given = argv if argv is not None else sys.argv[1:]
    base_given = any(a == "--base" or a.startswith("--base=") for a in given)
    args.cache_dir_given = any(a == "--cache-dir" or a.startswith("--cache-dir=") for a in given)  # else a run's own
    if args.preset == "tiny" and args.base == "tiny" and not base_given:
        args.base = tiny.tiny_default_base(args.cache_dir)
    elif args.base == "tiny":
        args.base = tiny.ensure_random_base(args.cache_dir)
    if args.preset == "tiny" and args.data_root is None:
        args.data_root = os.path.join(args.cache_dir, "tiny-eval-data")
    if args.preset == "small" and (args.base is None or args.data_root is None):
        world = small.ensure_small_world(args.cache_dir)
        args.base, args.data_root = args.base or world.base, args.data_root or world.eval_root
    if args.preset == "small" and not args.ckpt and args.template is None:
        args.template = small.EVAL_PRESET["template"]  # a bare small base speaks its own chat template
    if args.table is None:
        if args.bench is None:
            p.error("--bench is required (or --table DIR ...)")
        if args.ckpt and (args.method or args.template):
            p.error("--method and --template build a model around --base; a --ckpt run dir names its own")
        if args.ckpt and args.wise_ft:
            p.error("--wise-ft takes its two weight sets itself; drop --ckpt")
        if not 0.0 <= args.alpha <= 1.0:
            p.error(f"--alpha must be in [0, 1], got {args.alpha}")
        if args.workers < 0:
            p.error(f"--workers must be 0 or more, got {args.workers}")
        if args.closed_k and args.world != "closed":
            p.error("--closed-k applies to --world closed only")
        args.template = args.template or "vicuna_v1"
        if args.out is None:
            args.out = default_out(args)
    return args


def default_out(args):
    """<ckpt>/eval for a run folder; <run>/eval-step_N for a checkpoint <run>/ckpt/step_N (outside ckpt/,
    whose retention would delete it); else runs/eval-<method>."""
    if not args.ckpt:
        return f"runs/eval-{'wise-ft' if args.wise_ft else args.method or 'llava'}"
    ckpt = os.path.normpath(args.ckpt)
    parent, name = os.path.split(ckpt)
    if CHECKPOINT_NAME.fullmatch(name) and os.path.basename(parent) == "ckpt":
        return os.path.join(os.path.dirname(parent), f"eval-{name}")
    return os.path.join(ckpt, "eval")


def check_folders(args):
    """One-line refusals, before anything is created: an --out that is a file, a --ckpt that is not
    (yet) a run folder."""
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):  # the nearest part of the path that exists must be a folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(args.out) else f" ({existing} is)"
        raise EvalError(f"--out {args.out} is a file, not a folder{where}: give a folder for <out>/<bench>/...")
    if not args.ckpt:
        return
    if not os.path.isdir(args.ckpt):
        raise EvalError(f"--ckpt {args.ckpt}: no such folder")
    if is_run_dir(args.ckpt):
        return  # a finished run, or one of its checkpoints <run>/ckpt/step_N
    checkpoints = list_checkpoints(args.ckpt)
    if checkpoints:
        raise EvalError(f"--ckpt {args.ckpt} has no final weights yet (still training, or stopped before its end); "
                        f"its newest checkpoint is {checkpoints[-1]}: evaluate that with --ckpt {checkpoints[-1]}")
    raise EvalError(f"--ckpt {args.ckpt} is not a train.py run folder: no final weights (model.safetensors and its "
                    f"run config) and no checkpoint under {os.path.join(args.ckpt, 'ckpt')}")


def bench_list(spec):
    """--bench value -> the Benchmarks, registry order within a group, duplicates dropped."""
    names = []
    for name in spec.split(","):
        name = name.strip()
        if name in BENCH_GROUPS:
            names += BENCH_GROUPS[name]
        elif name in BENCHMARKS:
            names.append(name)
        else:
            raise EvalError(f"--bench: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)} "
                            f"or a group ({', '.join(BENCH_GROUPS)})")
    return [BENCHMARKS[n] for n in dict.fromkeys(names)]


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
    scored_officially = [b.name for b in benches if not b.group.startswith("cls")]
    if args.match != "official" and scored_officially:  # a VL score is its official script's or nothing
        raise EvalError(f"--match {args.match} is a classification variant; {', '.join(scored_officially)} are "
                        f"scored only by their official rules (drop --match or evaluate them separately)")
    check_folders(args)
    rank, world, local_rank, device = setup_distributed(timeout_s=args.dist_timeout * 60)
    if args.preset == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on a busy machine
    locks = []
    try:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            if args.preset == "tiny" and not os.path.isdir(args.data_root):
                print0(f"drawing the synthetic tiny benchmarks into {args.data_root}")
                tiny.build_tiny_benchmarks(args.data_root)  # atomic: complete, or absent and drawn again
        barrier()
        items = {bench.name: load_items(bench, args) for bench in benches}  # missing data fails before the model loads
        locks = lock_benchmarks(args.out, benches, rank, world)  # a second eval.py is refused before its model loads
        loaded = load_model(args, device)
        for bench in benches:
            run_bench(bench, items.pop(bench.name), loaded, args, device)
        if rank == 0:
            print0(write_summary(args.out, table_name(args.ckpt) if args.ckpt else table_name(args.out)))
    finally:
        for f in locks:
            f.close()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (EvalError, DiskFullError) as e:  # a full disk: the predictions so far are kept, nothing half-written
        sys.exit(f"eval.py: {e}")
