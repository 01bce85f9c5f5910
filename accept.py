"""
accept.py: the GPU acceptance run. Trains CARPE, then CARPE-MoE, for 20 steps each with train.py under
torchrun (one process) with FSDP2, bf16, gradient checkpointing and --compile, on a random-weight base
at LLaVA-1.5-7B's shapes with the paper's experts at their real shapes (no download: the tiny world's
tokenizer and drawn data, enough of it to reach epoch 2, where the context pass trains); then bench.py's
head, step and decode sections. One table: steps and epochs reached, step time, peak memory against the
meta-device estimate, finite loss, compile; exit 1 if a run fails.

    python accept.py --device cuda               # one GPU, est. 7-9 min on an H100 (not yet run on a GPU)
    python accept.py --device cpu --scale tiny   # the same path at tiny shapes on CPU (a test, ~5 min)

Estimated time on one H100: the 7B base built and saved once ~1 min; per method ~10 s start, ~20 s to
load 13.5 GB, ~20 s to draw the MoE towers, ~1-2 min of cold compiles, 20 steps of 16 samples at ~1.5 s,
~15 s to save; then ~1 min of sections. bench.py's flags set the sections' sizes (see --help).
"""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch
from transformers import AutoConfig, LlavaForConditionalGeneration

import bench
import carpe
import common
import moe
import tiny
from bench import ADAMW_BYTES, fmt_mib, fmt_ms, meta_models, print_table, train_dtype

HERE = os.path.dirname(os.path.abspath(__file__))

SCALES = {  # base shapes (None = LLaVA-1.5-7B), experts, data, steps, batch, extra train.py flags
    "7b": dict(tiny_llava=dict(image_size=336, patch_size=14, layers=1, vision_layers=1), experts=None,
               synthetic=dict(images_per_class=12, text_only=8), steps=20, batch=16, micro=8, flags=[]),
    "tiny": dict(tiny_llava=dict(layers=2, vision_layers=1), experts="tiny",
                 synthetic=dict(images_per_class=2, text_only=4), steps=6, batch=4, micro=2,
                 flags=["--num-workers", "0", "--integrator-heads", "4"]),
}


def random_llava(scale, device, meta=False):
    """A random-weight LLaVA and its processor: LLaVA-1.5-7B's shapes at scale 7b (on `device`, in
    the dtype train.py loads it in; meta=True: shapes only), tiny_llava's at scale tiny; the tiny
    world's tokenizer and a CLIP image processor at the tower's size."""
    llava, processor = tiny.tiny_llava(**SCALES[scale]["tiny_llava"])
    if scale == "7b":  # the 7B config with the tiny tokenizer's ids (<image>, pad, bos, eos)
        config, small = carpe.llava15_7b_config(), llava.config
        config.image_token_id = small.image_token_id
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(config.text_config, key, getattr(small.text_config, key))
        config.pad_token_id = small.text_config.pad_token_id
        with torch.device("meta" if meta else device):
            llava = LlavaForConditionalGeneration._from_config(config, dtype=train_dtype(device))
    return llava, processor


def base_folder(scale, root, device):
    """random_llava saved as a base folder (cached under root)."""
    path = os.path.join(root, f"base-{scale}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        llava, processor = random_llava(scale, device)
        tiny.build_folder_atomically(path, lambda tmp: tiny.save_tiny_base(llava, processor, tmp))
    return path


def train_command(method, scale, base, data_root, experts_json, out):
    """The train.py command of one acceptance run: the 7B preset's recipe (1:7 mix, learning rates,
    32 integrator heads) on the drawn data, under torchrun with one process."""
    s = SCALES[scale]
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
             os.path.join(HERE, "train.py"), "--preset", "llava-7b", "--base", base, "--out", out, "--overwrite",
             "--data", os.path.join(data_root, "conversations.json"), "--image-root", data_root, "--imagenet", data_root,
             "--imagenet-classes", os.path.join(data_root, "classnames.txt"), "--cache-dir", os.path.dirname(data_root),
             "--fsdp", "--gradient-checkpointing", "--compile", "--max-steps", str(s["steps"]),
             "--batch-size", str(s["batch"]), "--micro-batch-size", str(s["micro"])] + s["flags"]
            + (["--moe", "--experts", experts_json] if method == "moe" else []))


def timed_train(cmd, out, log_path):
    """Run one acceptance command (its output to log_path); stamps each line of <out>/log.jsonl as
    it arrives (train.py writes a step's line when the step ends: the gaps are step times)."""
    lines, arrivals, t0 = os.path.join(out, "log.jsonl"), [], time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
        while proc.poll() is None:
            time.sleep(0.02)
            n = sum(1 for _ in open(lines)) if os.path.isfile(lines) else 0
            arrivals += [time.perf_counter()] * (n - len(arrivals))
    records = [json.loads(line) for line in open(lines)] if os.path.isfile(lines) else []
    losses = [r["loss"] for r in records]
    gaps = [b - a for a, b in zip(arrivals[2:], arrivals[3:])]  # after the two steps that compile the most
    with open(log_path) as f:
        tail = f.read()[-2000:]
    return dict(rc=proc.returncode, steps=len(records), wall_s=time.perf_counter() - t0,
                step_s=statistics.median(gaps) if gaps else None, losses=losses,
                loss_finite=bool(losses) and all(math.isfinite(x) for x in losses) and not records[-1]["skipped_steps"],
                epochs_seen=sorted({r["epoch"] for r in records}),
                peak_gib=max((r["peak_mem_gb"] for r in records), default=None), tail=tail)


def section_accept(args, device):
    """Both train.py runs, then bench's head, step and decode sections -> the judged result; prints the table."""
    scale, root = args.scale, os.path.abspath(args.dir)
    s = SCALES[scale]
    os.makedirs(root, exist_ok=True)
    base = base_folder(scale, root, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the base built here: its memory goes back before train.py runs
    data_root = tiny.ensure_synthetic(root, tiny.SyntheticConfig(**s["synthetic"]))
    experts = tiny.tiny_moe_config().experts if s["experts"] == "tiny" else moe.paper_scale_experts()
    experts_json = os.path.join(root, f"experts-{scale}.json")  # train.py --experts: random towers built from configs
    common.write_json_atomic(experts_json, [asdict(e) for e in experts])
    # the static memory a rank holds, counted on the meta device: frozen weights in the base's
    # dtype, trainable fp32 weights + gradients + AdamW moments (activations come on top)
    frozen_bytes = torch.finfo(train_dtype(device)).bits // 8
    estimate = {name: (c.frozen * frozen_bytes + c.trainable * ADAMW_BYTES) / 2**30 for name, c in
                ((n, carpe.count_parameters(m)) for n, m in meta_models(AutoConfig.from_pretrained(base), experts).items())}
    results = {}
    for method in ["carpe", "moe"]:
        out = tempfile.mkdtemp(prefix=f"accept-{method}-", dir=root)
        try:
            cmd = train_command(method, scale, base, data_root, experts_json, out)
            r = results[method] = timed_train(cmd, out, os.path.join(root, f"train-{method}.log"))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        r.update(estimate_gib=estimate[method], ok=r["rc"] == 0 and r["steps"] == s["steps"] and r["loss_finite"])
        print(f"  accept {method}: exit {r['rc']}, {r['steps']} steps in {r['wall_s']:.0f} s"
              + ("" if r["ok"] else f"; the end of {root}/train-{method}.log:\n{r['tail']}"))
    sections = {name: bench.SECTIONS[name](args, device) for name in ["head", "step", "decode"]}
    rows = []
    for method, r in results.items():
        name = dict(carpe="CARPE", moe="CARPE-MoE")[method]
        peak = f"{fmt_mib(r['peak_gib'] * 2**30)} / {fmt_mib(r['estimate_gib'] * 2**30)} " \
            f"({r['peak_gib'] / r['estimate_gib']:.2f}x)" if r["peak_gib"] else "-"
        loss = f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" if r["losses"] else "-"
        rows += [[f"{name}: steps (epochs)", f"{r['steps']} of {s['steps']} ({r['epochs_seen']})", "ok" if r["ok"] else "FAILED"],
                 [f"{name}: step time (median after 2)", fmt_ms(r["step_s"]) if r["step_s"] else "-", ""],
                 [f"{name}: peak memory / static estimate (meta device)", peak, "activations, FSDP's bf16 copies on top"],
                 [f"{name}: loss finite (first -> last)", loss, "ok" if r["loss_finite"] else "FAILED"],
                 [f"{name}: compile (fullgraph, no eager fallback)", "ok" if r["rc"] == 0 else "FAILED" if any(
                     k in r["tail"] for k in ("torch._dynamo", "torch._inductor", "compile_blocks")) else "not reached", ""]]
    head = sections["head"]["results"][-1]
    rows += [[f"head: fused vs naive, N={head['N']}, d={head['d']}", f"{head['speedup_fused_over_naive']:.2f}x", ">= 1.7x"],
             ["head: fused vs the 3-matmul floor", f"{head['fused_over_floor']:.2f}x", "<= 1.3x"],
             ["step: CARPE / vanilla time", f"{sections['step']['time_ratio']:.2f}x", "<= 1.25x"]]
    rows += [[f"decode at prompt {d['prompt_length']}: prefill / per token", f"{d['prefill_ratio']:.2f}x / "
              f"{d['per_token_ratio']:.2f}x", "<= 1.2x / 1.15x"] for d in sections["decode"]["results"]]
    if "memory_ratio" in sections["step"]:
        rows.insert(-len(sections["decode"]["results"]), ["step: CARPE / vanilla peak memory",
                                                         f"{sections['step']['memory_ratio']:.2f}x", "<= 1.15x"])
    ok = all(r["ok"] for r in results.values())
    print_table(f"accept: {scale} shapes, torchrun x1, FSDP2, gradient checkpointing, compile, {s['steps']} steps of "
                f"{s['batch']} (micro {s['micro']}), {train_dtype(device)} on {device}: {'PASSED' if ok else 'FAILED'}",
                ["check", "measured", "target"], rows)
    return dict(ok=ok, scale=scale, runs=results, sections=sections)


def get_parser():
    p = bench.get_parser(description="GPU acceptance: 20 train.py steps of CARPE and of CARPE-MoE at LLaVA-1.5-7B's "
                                     "shapes (random weights, no download), then bench.py's head, step and decode "
                                     "sections; one table, exit 1 if a run fails.", sections=False)
    p.add_argument("--scale", choices=list(SCALES), default="7b",
                   help="7b = LLaVA-1.5-7B's shapes and the paper's experts, random weights (one GPU); "
                        "tiny = the same path at tiny shapes (CPU, a test)")
    p.add_argument("--dir", default=os.path.join(HERE, ".cache", "accept"),
                   help="where the random bases, the drawn data and the train.py logs go")
    return p


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    args.sections = ["accept"]
    if args.hidden % 64:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of 64 (heads of 64)")
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    if args.scale == "7b" and not args.device.startswith("cuda"):
        raise SystemExit("accept.py at --scale 7b needs a GPU (--device cuda); on CPU: --scale tiny")
    return args


def run(args):
    """The acceptance through bench.run (machine line, <out>/accept.json) -> its result."""
    return bench.run(args, dict(accept=section_accept))["accept"]["result"]


if __name__ == "__main__":
    sys.exit(int(not run(parse_args())["ok"]))  # a failed acceptance fails
