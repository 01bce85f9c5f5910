"""
bench.py: what CARPE costs over vanilla LLaVA, how close the fused head comes to the hardware, what
regional torch.compile buys, and what reading the LLaVA json costs per rank. One section per name:

    python bench.py                          # paper, head, step, decode (~6 min of CPU time at 1 thread)
    python bench.py --sections compile,json  # the slow ones (compile: tens of minutes on CPU)

 paper    the paper's runs at LLaVA-1.5-7B's shapes, counted on the meta-device models (no memory): trainable
          parameters and AdamW state, FLOPs per sample over vanilla LLaVA, gradient checkpointing's recompute,
          FLOPs and GPU-hours per run (CARPE 2 epochs, CARPE-MoE 3, of mix665k + 1/7 as much ImageNet).
 head     mix + loss with a trainable head, forward + backward: kernels.fused_mixed_cross_entropy vs the
          paper's form (kernels.reference_mixed_cross_entropy) vs three bare N x d x V matmuls; peak memory.
 step     one training step (forward, backward, AdamW) of CARPE vs vanilla LLaVA (HF with labels), the
          same frozen set; CARPE's overhead split into context pass, integrator, head.
 decode   prefill and per-token latency of CARPE.generate vs HF generate (batch 1, greedy, cached, no EOS).
 compile  kernels.compile_blocks (regional) vs eager on the training step of vanilla LLaVA and CARPE per
          --compile-layers: cold compile (fresh process, empty inductor cache), speed-up, graphs, loss, and
          the bound on the speed-up: the eager step's share of time in GEMM and attention kernels, which
          inductor calls unchanged (profiled), caps eager/compiled at 1 / share.
 json     a generated LLaVA json: per-rank time and peak memory of parsing and checking it in every rank,
          of the one-off pack per node (data.ensure_llava_cache), of mapping the pack (TrainDataset.from_config).

Timing: the paths of a section run in turn, one warm-up round then --repeats rounds; medians and ratios of
medians (a shared machine is noisy; ratios move much less than times). Memory: on CPU one process per path,
peak RSS over the RSS after set-up; on GPU max_memory_allocated. The step/decode/compile model is tiny_llava
with LLaVA-7B's proportions at d=256: 32 layers, heads of 64, MLP 688 (11008/4096 of d), a 24-layer CLIP of
width 64 at 336 px / patch 14 (576 image tokens), V = 32064 * 256 / 4096 = 2004 (the head's share of a step
as at 7B); samples of 60 prompt text tokens (with <s>), 576 image tokens, 40 answer tokens; CARPE in epoch-2
mode (the context pass runs backward too), the costlier epoch.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import StoppingCriteriaList

import carpe
import data
import kernels
import moe
import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
CLOCKS = dict(wall=time.perf_counter, cpu=time.process_time)
# glibc keeps freed blocks below its (growing, up to 32 MiB) mmap threshold in the process, so RSS
# would remember memory already given back; a fixed 64 KiB threshold unmaps every larger tensor on free
MEMORY_ENV = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")


# -----------------------------------------------------------------------------
# measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device, clock=time.perf_counter):
    """The clock once `device` has finished the work queued so far: CUDA kernels run
    asynchronously, so a bare clock read on GPU times the launches, not the work."""
    sync(device)
    return clock()


def time_interleaved(fns, repeats, device, clock, warmup=1):
    """fns {name: callable}, run in turn for warmup + repeats rounds -> {name: [seconds per timed round]}."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():  # in turn: a slow spell of the machine hits every path alike
            t0 = now(device, clock)
            fn()
            if round_ >= warmup:
                times[name].append(now(device, clock) - t0)
    return times


def medians(times):
    return {k: statistics.median(v) for k, v in times.items()}


class PeakMemory:
    """Peak memory of the block over the memory at its start (.peak) and what it still holds at the
    end (.held): RSS on CPU (Linux: VmRSS, and VmHWM reset through /proc/self/clear_refs), allocated
    memory on GPU."""

    def __init__(self, device):
        self.device = device

    def read(self, key):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() if key == "VmHWM" else torch.cuda.memory_allocated()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))  # kB

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        self.baseline = self.read("VmRSS")
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.peak, self.held = self.read("VmHWM") - self.baseline, self.read("VmRSS") - self.baseline


def run_worker(spec, env=MEMORY_ENV):
    """Run one measured path (spec["section"], spec["path"]) in a fresh Python process -> its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                          env=dict(os.environ, **env))
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec['section']}/{spec.get('path')} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(spec, paths, device):
    """Peak memory of each path -> {path: worker result}. On CPU each path runs in its own process (a
    process's peak RSS covers everything before it); on GPU the peak counter resets, so they run here."""
    measure = run_worker if device.type == "cpu" else WORKERS[spec["section"]]
    return {p: measure(dict(spec, path=p)) for p in paths}


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def fmt_ms(s):
    return f"{s * 1e3:.1f} ms"


def fmt_mib(b):
    return f"{b / 2**20:.0f} MiB"


def train_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast_ctx(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def zero_grads(tensors):
    for t in tensors:
        t.grad = None


# -----------------------------------------------------------------------------
# section paper: the paper's two runs at LLaVA-1.5-7B's shapes, counted on the meta-device models

PAPER_LLAVA_SAMPLES = 665_298  # entries of llava_v1_5_mix665k.json; ImageNet adds 1/7 of that per epoch (--mix 1:7)
PAPER_EPOCHS = dict(carpe=2, moe=3)
PEAK_BF16 = dict(A100=312e12, H100=989e12)  # dense bf16 FLOP/s of one GPU
ADAMW_BYTES = 16  # per trainable parameter: fp32 weight, gradient and AdamW's two moments


def meta_models(config=None, experts=None):
    """CARPE and CARPE-MoE around a LLaVA of `config` (default LLaVA-1.5-7B's) on the meta device:
    every shape, no memory. experts: the MoE's ExpertConfigs (default the paper's four at their
    real shapes) -> {"carpe": CARPE, "moe": CARPE with a VisionMoE}."""
    experts = experts or moe.paper_scale_experts()
    with torch.device("meta"):
        models = dict(carpe=carpe.CARPE(carpe.meta_llava(config), carpe.CarpeConfig()))
        llava = carpe.meta_llava(config)
        vision_moe = moe.build_vision_moe(llava, moe.MoEConfig(experts), device="meta")
        models["moe"] = carpe.CARPE(llava, carpe.CarpeConfig(), vision_moe=vision_moe)
    return models


paper_models = meta_models  # the paper's: LLaVA-1.5-7B and the four experts


def token_weights(module):
    """The weights one token is multiplied by in a forward of `module`: its Linear weights; of a
    sparse MoE MLP only the gate and top-k experts'."""
    if isinstance(module, moe.CLIPSparseMoE):
        return module.gate.weight.numel() + module.top_k * token_weights(module.experts[0])
    if isinstance(module, nn.Linear):
        return module.weight.numel()
    return sum(token_weights(m) for m in module.children())


def attention_flops(layers, t, width, causal):
    """Scores and weighted sum of one forward: 4 t^2 w per layer, half of it when causal."""
    return layers * (2 if causal else 4) * t * t * width


def paper_cost(models, prompt_text=60, answer=40, llava_samples=PAPER_LLAVA_SAMPLES, mix=(1, 7)):
    """FLOPs per sample of one training step of vanilla LLaVA-1.5-7B (projector and head trained)
    and what CARPE adds, per epoch kind; gradient checkpointing's recompute; per run totals.
    A (m, k) x (k, n) matmul is 2mkn FLOPs. A trainable layer costs 3x its forward (forward,
    input and weight gradients), a frozen one that a gradient passes 2x (its attention 3x: the
    backward of the scores and of the weighted sum is two products each). The frozen vision
    towers run forward only. Under checkpointing (the 7B preset) every frozen LM layer of a pass
    that runs backward is run forward again: the main pass always, the context pass in epoch 2+
    (in epoch 1 it runs without grad, so nothing is kept or recomputed). The integrator, the
    adapters and the fused head (its gradients are made in the forward) are not checkpointed."""
    m = models["carpe"]
    tc = m.llava.config.text_config
    d, V, layers = tc.hidden_size, tc.vocab_size, carpe.decoder_layers(m.language_model)
    P = image_tokens(m.llava)
    T, S, N = prompt_text + P + answer, prompt_text + 1, answer  # sample, context pass (+ ctx token), supervised
    lm = lambda t: 2 * token_weights(layers) * t + attention_flops(len(layers), t, d, True)  # noqa: E731 (fwd)
    lm_backward = lambda t: 2 * token_weights(layers) * t + 2 * attention_flops(len(layers), t, d, True)  # noqa: E731

    def vision(model):  # per image: frozen tower forward, then the LLM and raw adapters (trainable), mean over experts
        if model.vision_moe is None:
            towers = [(model.llava.model.vision_tower, model.llava.model.multi_modal_projector,
                       model.vision_integrator.raw_adapter, P + 1)]
        else:
            vm = model.vision_moe
            towers = [(vm.encoders[e.name], vm.llm_adapters[e.name], vm.raw_adapters[e.name],
                       vm.expert_grids[e.name] ** 2 + int(e.has_cls)) for e in vm.config.experts]
        costs = [2 * token_weights(carpe.encoder_layers(enc)) * t
                 + attention_flops(len(carpe.encoder_layers(enc)), t, enc.config.hidden_size, False)
                 + 3 * 2 * P * (token_weights(llm_adapter) + token_weights(raw_adapter))
                 for enc, llm_adapter, raw_adapter, t in towers]
        return sum(costs) / len(costs)  # the router's balance loss aims at a uniform route

    block = m.vision_integrator.block
    memory_side = token_weights(block.cross_attn.k) + token_weights(block.cross_attn.v)  # on the P image tokens
    integrator = 3 * (2 * (token_weights(block) - memory_side) * T + 2 * memory_side * P  # x3: trainable
                      + attention_flops(1, T, d, False) * P / T + attention_flops(1, T, d, True))
    vanilla = {"vision tower (fwd) + projector (trainable)": vision(m),
               "LM fwd + bwd to the projector (frozen)": lm(T) + lm_backward(T),
               "head over all T tokens (HF)": 3 * 2 * T * d * V}
    added = {"context pass fwd (epoch 1: no grad)": lm(S), "context pass bwd (epoch 2+)": lm_backward(S),
             "raw adapter on P tokens (trainable)": 3 * 2 * P * token_weights(m.vision_integrator.raw_adapter),
             "integrator block on T queries, P memory tokens (trainable)": integrator,
             "head: fused on N supervised minus HF's over T": 3 * 2 * (N - T) * d * V}
    recompute = {"main pass LM fwd, every epoch": lm(T), "context pass LM fwd, epoch 2+": lm(S)}
    vanilla_sum, added_sum = sum(vanilla.values()), sum(added.values())
    epoch1 = vanilla_sum + added_sum - added["context pass bwd (epoch 2+)"]
    per_sample = {}  # (method, epoch kind) -> (model FLOPs, executed FLOPs with the recompute)
    for name, model in models.items():
        extra = vision(model) - vision(m)  # CARPE-MoE: its experts instead of the base tower
        for kind, model_flops in [("epoch 1", epoch1), ("epoch 2+", vanilla_sum + added_sum)]:
            rec = sum(recompute.values()) if kind == "epoch 2+" else recompute["main pass LM fwd, every epoch"]
            per_sample[name, kind] = (model_flops + extra, model_flops + extra + rec)
    samples = llava_samples + int(round(llava_samples * mix[0] / mix[1]))  # per epoch, as data.MixPlan
    runs = {}
    for name, epochs in PAPER_EPOCHS.items():
        flops = [sum(per_sample[name, "epoch 1" if e == 0 else "epoch 2+"][i] * samples for e in range(epochs))
                 for i in (0, 1)]
        runs[name] = dict(epochs=epochs, samples=samples * epochs, model_flops=flops[0], executed_flops=flops[1])
    counts = {name: carpe.count_parameters(model) for name, model in models.items()}
    return dict(tokens_per_sample=T, context_tokens=S, supervised=N, vanilla_flops_per_sample=vanilla,
                carpe_added_flops_per_sample=added, recompute_flops_per_sample=recompute,
                flops_ratio=(vanilla_sum + added_sum) / vanilla_sum,
                recompute_ratio=per_sample["carpe", "epoch 2+"][1] / per_sample["carpe", "epoch 2+"][0],
                per_sample={f"{k[0]} {k[1]}": v for k, v in per_sample.items()}, samples_per_epoch=samples, runs=runs,
                trainable={n: c.trainable for n, c in counts.items()}, frozen={n: c.frozen for n, c in counts.items()},
                parts={n: c.parts for n, c in counts.items()},
                adamw_gib={n: c.trainable * ADAMW_BYTES / 2**30 for n, c in counts.items()})


def gpu_hours(flops, mfu, gpu="A100"):
    return flops / (mfu * PEAK_BF16[gpu]) / 3600


def paper_sentence(r, mfu):
    """The README's paper figures, worded as tests/test_bench.py reads them back from README.md."""
    p, M = r["parts"]["carpe"], lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
    rec, runs = r["recompute_flops_per_sample"], r["runs"]
    hours = lambda k: gpu_hours(runs[k]["executed_flops"], mfu)  # noqa: E731
    run = lambda k: (f"{runs[k]['executed_flops']:.1e}".replace("e+", "e") + f" FLOPs, {hours(k):.0f} A100-hours "  # noqa: E731
                     f"({hours(k) / 8:.0f} h on 8)")
    return (f"CARPE trains {M(r['trainable']['carpe'])} parameters (projector {M(p['projector'])}, head {M(p['head'])}, "
            f"integrator {M(p['integrator'])}, context {p['context'] / 1e6:.2f}M), {r['adamw_gib']['carpe']:.2f} GiB "
            f"with AdamW; CARPE-MoE {M(r['trainable']['moe'])} ({r['adamw_gib']['moe']:.2f} GiB). Per sample of "
            f"{r['tokens_per_sample']} tokens CARPE costs {r['flops_ratio']:.2f}x LLaVA-1.5-7B's step FLOPs; gradient "
            f"checkpointing recomputes the frozen LM's forward of the main pass (every epoch) and of the context pass "
            f"(epoch 2 on), +{sum(rec.values()) / 1e12:.2f} TFLOP per sample in epoch 2 ({r['recompute_ratio']:.2f}x "
            f"the step). One CARPE run ({runs['carpe']['epochs']} epochs of {r['samples_per_epoch']:,} samples) "
            f"executes {run('carpe')}; CARPE-MoE ({runs['moe']['epochs']} epochs) {run('moe')}, at {mfu:.0%} of the "
            f"bf16 peak.")


def section_paper(args, device):
    r = paper_cost(paper_models(), prompt_text=args.prompt_text, answer=args.answer)
    tf = lambda v, sign="": f"{v / 1e12:{sign}.3f} TFLOP"  # noqa: E731
    rows = [[k, tf(v)] for k, v in r["vanilla_flops_per_sample"].items()]
    rows += [["+ " + k, tf(v, "+")] for k, v in r["carpe_added_flops_per_sample"].items()]
    rows += [["+ recompute: " + k, tf(v, "+")] for k, v in r["recompute_flops_per_sample"].items()]
    rows += [[f"{k}: model / executed", f"{tf(a)} / {tf(b)}"] for k, (a, b) in r["per_sample"].items()]
    rows += [["CARPE / vanilla FLOPs (epoch 2, no recompute)", f"{r['flops_ratio']:.3f}x"],
             ["executed / model FLOPs (CARPE epoch 2)", f"{r['recompute_ratio']:.3f}x"]]
    print_table(f"paper: LLaVA-1.5-7B, per sample of {r['tokens_per_sample']} tokens ({args.prompt_text} prompt text, "
                f"{r['tokens_per_sample'] - args.prompt_text - args.answer} image, {args.answer} answer)",
                ["term", "FLOPs"], rows)
    rows = [[name, f"{r['trainable'][name] / 1e6:.1f}M", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in r["parts"][name].items()),
             f"{r['adamw_gib'][name]:.2f} GiB", f"{r['frozen'][name] * 2 / 2**30:.2f} GiB", f"{run['samples']:,}",
             f"{run['model_flops']:.2e}", f"{run['executed_flops']:.2e}",
             f"{gpu_hours(run['executed_flops'], args.mfu):.0f} / {gpu_hours(run['executed_flops'], args.mfu, 'H100'):.0f}"]
            for name, run in r["runs"].items()]
    print_table(f"paper: the runs, {r['samples_per_epoch']:,} samples per epoch, GPU-hours at {args.mfu:.0%} of the "
                f"bf16 peak on the executed FLOPs", ["run", "trainable", "parts", "AdamW state", "frozen (bf16)",
                                                     "samples", "model FLOPs", "executed FLOPs", "A100 / H100 hours"], rows)
    r["readme"] = paper_sentence(r, args.mfu)
    print("README: " + r["readme"])
    return r


# -----------------------------------------------------------------------------
# section head: fused mix + chunked linear CE vs the paper's form vs the bare-matmul floor

def head_inputs(N, d, V, device, seed=0, batch=2):
    """N supervised tokens over `batch` samples (every position but the first is a target)."""
    g = torch.Generator().manual_seed(seed)
    T = N // batch + 1
    labels = torch.randint(0, V, (batch, T), generator=g)  # (B, T)
    labels[:, 0] = kernels.IGNORE_INDEX
    return dict(h_vision=torch.randn(batch, T, d, generator=g).to(device).requires_grad_(),  # (B, T, d)
                h_llm=torch.randn(batch, T, d, generator=g).to(device).requires_grad_(),  # (B, T, d)
                weights=torch.softmax(torch.randn(batch, 2, generator=g), -1).to(device),  # (B, 2)
                head_weight=(torch.randn(V, d, generator=g) * d ** -0.5).to(device).requires_grad_(),  # (V, d)
                labels=labels.to(device))


HEAD_LEAVES = ["h_vision", "h_llm", "head_weight"]  # the head inputs that get gradients


def head_step(path, x, chunk_size, dtype):
    """One forward + backward of `path` (naive / fused / floor) on head_inputs x."""
    with autocast_ctx(x["h_llm"].device, dtype):
        if path == "floor":  # 3 bare matmuls: logits, dL/dH, dL/dW (no softmax, no mix)
            with torch.no_grad():
                h = x["h_llm"][:, :-1].reshape(-1, x["h_llm"].size(-1)).to(dtype)  # (N, d)
                w = x["head_weight"].to(dtype)  # (V, d)
                logits = h @ w.t()  # (N, V)
                logits @ w, logits.t() @ h  # (N, d), (V, d)
            return None
        fn = dict(fused=kernels.fused_mixed_cross_entropy, naive=kernels.reference_mixed_cross_entropy)[path]
        extra = dict(chunk_size=chunk_size) if path == "fused" else {}
        loss = fn(x["h_vision"], x["h_llm"], x["weights"], x["labels"], x["head_weight"], **extra)
    loss.backward()
    return loss.detach()


def head_check(N, d, V, device, chunk_size):
    """Loss and gradients of fused vs naive on the same inputs, fp32: max abs differences and scales."""
    x = head_inputs(N, d, V, device)
    names = ["loss"] + ["grad_" + k for k in HEAD_LEAVES]
    out = {}
    for path in ["naive", "fused"]:
        zero_grads(x[k] for k in HEAD_LEAVES)
        out[path] = [head_step(path, x, chunk_size, torch.float32)] + [x[k].grad.clone() for k in HEAD_LEAVES]
    return dict(loss_naive=out["naive"][0].item(), loss_fused=out["fused"][0].item(),
                max_abs_diff={n: (a - b).abs().max().item() for n, a, b in zip(names, out["naive"], out["fused"])},
                max_abs={n: a.abs().max().item() for n, a in zip(names, out["naive"])})


def head_memory_worker(spec):
    device = torch.device(spec["device"])
    x = head_inputs(spec["N"], spec["d"], spec["V"], device)
    with torch.no_grad():
        x["h_llm"][0, :8] @ x["head_weight"].t()  # the matmul library's one-off allocations happen before
    grad_bytes = sum(x[k].numel() * x[k].element_size() for k in HEAD_LEAVES)
    with PeakMemory(device) as meter:
        head_step(spec["path"], x, spec["chunk_size"], train_dtype(device))
    return dict(peak_bytes=meter.peak, grad_bytes=grad_bytes)


def section_head(args, device):
    dtype = train_dtype(device)
    shapes = [(n, args.head_d) for n in args.head_n] + ([(2048, 4096)] if device.type == "cuda" else [])
    check = head_check(64, 32, 1000, device, chunk_size=24)  # three chunks
    print("head check (fp32, N=64, d=32, V=1000, 3 chunks): max |fused - naive| = "
          + ", ".join(f"{k} {v:.2e}" for k, v in check["max_abs_diff"].items()))
    results, rows = [], []
    for N, d in shapes:
        x = head_inputs(N, d, args.vocab, device)
        fns = {p: (lambda p=p: (zero_grads(x[k] for k in HEAD_LEAVES), head_step(p, x, args.chunk_size, dtype)))
               for p in ["naive", "fused", "floor"]}
        times = time_interleaved(fns, args.repeats, device, CLOCKS[args.clock])
        t = medians(times)
        r = dict(N=N, d=d, V=args.vocab, times=times, median_s=t, speedup_fused_over_naive=t["naive"] / t["fused"],
                 fused_over_floor=t["fused"] / t["floor"])
        row = [N, d, fmt_ms(t["naive"]), fmt_ms(t["fused"]), fmt_ms(t["floor"]),
               f"{r['speedup_fused_over_naive']:.2f}x", f"{r['fused_over_floor']:.2f}x"]
        if not args.no_memory:
            spec = dict(section="head", N=N, d=d, V=args.vocab, chunk_size=args.chunk_size, device=str(device))
            mem = measure_memory(spec, ["naive", "fused"], device)
            over_grads = {p: m["peak_bytes"] - m["grad_bytes"] for p, m in mem.items()}  # what grows with N x V
            r.update(memory=mem, peak_over_grads=over_grads, peak_ratio_NV=over_grads["naive"] / max(over_grads["fused"], 1))
            row += [fmt_mib(mem["naive"]["peak_bytes"]), fmt_mib(mem["fused"]["peak_bytes"]), f"{r['peak_ratio_NV']:.1f}x"]
        results.append(r)
        rows.append(row)
    header = (["N", "d", "naive", "fused", "floor", "naive/fused", "fused/floor"]
              + (["peak naive", "peak fused", "ratio over grads"] if not args.no_memory else []))
    print_table(f"head: mix + CE, fwd + bwd, trainable head, V={args.vocab}, chunk {args.chunk_size}, median of "
                f"{args.repeats}, {args.clock} time (targets at N=2048, d=1024: naive/fused >= 1.7x, memory >= 4x, "
                f"fused/floor <= 1.3x)", header, rows)
    return dict(check=check, results=results, chunk_size=args.chunk_size)


# -----------------------------------------------------------------------------
# the model with LLaVA-7B proportions (sections step, decode, compile)

def bench_models(args, device, fixed_weights=None):
    """The LLaVA with 7B's proportions at width args.hidden (see the module docstring), CARPE around it
    in epoch-2 mode, and a training batch -> (llava, CARPE, batch)."""
    h = args.hidden
    llava, _ = tiny.tiny_llava(
        seed=0, image_size=args.image_size, patch_size=14, layers=args.layers, hidden=h, heads=h // 64,
        kv_heads=h // 64, intermediate=round(h * 11008 / 4096), vision_hidden=h // 4,
        vision_layers=args.vision_layers, vision_heads=max(h // 256, 1), max_positions=2048)
    if args.model_vocab and args.model_vocab != llava.config.text_config.vocab_size:
        llava.resize_token_embeddings(args.model_vocab, mean_resizing=False)
    llava.to(device)
    config = carpe.CarpeConfig(integrator_heads=max(h // 64, 1), fixed_weights=fixed_weights, chunk_size=args.chunk_size)
    model = carpe.CARPE(llava, config)  # also sets CARPE's frozen set on llava, which vanilla then shares
    model.set_context_trainable(True)  # epoch-2 mode: the context pass also runs backward
    return llava, model, make_batch(llava, args.step_batch, args.prompt_text, args.answer, device)


def image_tokens(llava):
    vc = llava.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def make_batch(llava, batch, prompt_text, answer, device, seed=0, text_vocab=512):
    """vicuna_v1-like samples of random ids: <s>, a third of the prompt text, the image tokens, the rest
    of the prompt, the (supervised) answer; answer=0 gives a generation prompt. Ids below 5 are special."""
    g = torch.Generator().manual_seed(seed)
    P, before = image_tokens(llava), max(prompt_text // 3, 1)
    rows = []
    for _ in range(batch):
        text = torch.randint(5, text_vocab, (prompt_text + answer,), generator=g)
        text[0] = 1  # <s>
        rows.append(torch.cat([text[:before], torch.full((P,), llava.config.image_token_id), text[before:]]))  # (T,)
    input_ids = torch.stack(rows)  # (B, T)
    labels = torch.full_like(input_ids, kernels.IGNORE_INDEX)
    labels[:, input_ids.size(1) - answer:] = input_ids[:, input_ids.size(1) - answer:]
    vc = llava.config.vision_config
    pixel_values = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                pixel_values=pixel_values.to(device), labels=labels.to(device))


def step_loss(model, batch, vanilla):
    if vanilla:  # HF's own loss: logits over every token
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False).loss
    return model(**batch).loss


def vanilla_loss_by_parts(llava, batch):
    """HF's vanilla loss with the image features taken as CARPE takes them (a forward hook on the
    tower layer): the same work, but HF never installs its output-capturing hooks, which sit
    inside the CLIP layers and read a ContextVar that dynamo cannot trace (a graph break)."""
    image_embeds = llava.model.multi_modal_projector(carpe.raw_vision_features(llava, batch["pixel_values"]))
    inputs_embeds = carpe.embed_inputs(llava, batch["input_ids"], image_embeds)  # (B, T, d)
    return llava(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss


def make_step(model, batch, dtype, vanilla, loss_fn=None):
    """-> step(): forward, backward, AdamW over the trainable set; returns the loss. Vanilla LLaVA
    trains CARPE's shared set: the projector (at the adapter lr) and the head."""
    params = ([dict(params=list(model.model.multi_modal_projector.parameters()), lr=2e-5),
               dict(params=list(model.lm_head.parameters()), lr=2e-4)] if vanilla else model.param_groups())
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    loss_fn = loss_fn or (lambda: step_loss(model, batch, vanilla))
    device = batch["input_ids"].device

    def step():
        with autocast_ctx(device, dtype):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def worker_setup(spec):
    """A step/compile worker's model from its spec: the section's args, at spec["layers"] if given."""
    args, device = argparse.Namespace(**spec["args"]), torch.device(spec["device"])
    args.layers = spec.get("layers", args.layers)
    return (args, device, train_dtype(device)) + bench_models(args, device)


# -----------------------------------------------------------------------------
# section step: one training step, CARPE vs vanilla LLaVA

def step_check(args, device):
    """CARPE with fixed_weights=(0, 1) is vanilla LLaVA: same loss, same projector and head grads."""
    llava, model, batch = bench_models(args, device, fixed_weights=(0.0, 1.0))
    shared = {n: p for n, p in llava.named_parameters() if p.requires_grad}
    out = {}
    for name, net in [("vanilla", llava), ("carpe", model)]:
        zero_grads(shared.values())
        loss = step_loss(net, batch, vanilla=name == "vanilla")
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in shared.items()})
    (loss_v, grads_v), (loss_c, grads_c) = out["vanilla"], out["carpe"]
    return dict(loss_vanilla=loss_v.item(), loss_carpe_fixed_0_1=loss_c.item(), loss_abs_diff=(loss_v - loss_c).abs().item(),
                grad_max_abs_diff=max((grads_v[n] - grads_c[n]).abs().max().item() for n in shared),
                grad_max_abs=max(g.abs().max().item() for g in grads_v.values()), trainable_shared=sorted(shared))


def step_breakdown(model, llava, batch, args, device, dtype):
    """CARPE's additions timed on their own, forward + backward each: the context pass, the integrator
    (raw adapter + block), the head (fused CE on the supervised tokens vs HF's logits over every token)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    (B, T), d, head = ids.shape, llava.config.text_config.hidden_size, llava.lm_head
    with torch.no_grad():
        feats = carpe.raw_vision_features(llava, batch["pixel_values"])  # (B, P, Dv), frozen tower
    has_image = torch.ones(B, dtype=torch.bool, device=device)
    h_query, h_vision, h_llm = (torch.randn(B, T, d, device=device, requires_grad=True) for _ in range(3))  # (B, T, d)
    weights = torch.full((B, 2), 0.5, device=device)
    parts = dict(  # each a scalar of its output, backward from it
        context=lambda: model.context(ids, mask, labels)[0][:, 0].sum(),
        integrator=lambda: model.integrate(h_query, model.memory_kv(model.vision_integrator.raw_adapter(feats)),
                                           has_image).float().square().mean(),
        head_carpe=lambda: kernels.fused_mixed_cross_entropy(h_vision, h_llm, weights, labels, head.weight, head.bias,
                                                             chunk_size=args.chunk_size),
        head_vanilla=lambda: F.cross_entropy(head(h_llm)[:, :-1].flatten(0, 1).float(),  # (B, T, V) as HF has them
                                             labels[:, 1:].flatten(), ignore_index=kernels.IGNORE_INDEX))

    def timed(fn):
        def run():
            with autocast_ctx(device, dtype):
                out = fn()
            out.backward()
            zero_grads(list(model.parameters()) + [h_query, h_vision, h_llm])
        return run
    return medians(time_interleaved({k: timed(fn) for k, fn in parts.items()}, args.repeats, device, CLOCKS[args.clock]))


def step_memory_worker(spec):
    args, device, dtype, llava, model, batch = worker_setup(spec)
    vanilla = spec["path"] == "vanilla"
    step = make_step(llava if vanilla else model, batch, dtype, vanilla)
    step()  # AdamW's state exists from here on: the measured step is a steady-state one
    with PeakMemory(device) as meter:
        step()
    return dict(peak_bytes=meter.peak)


def section_step(args, device):
    dtype = train_dtype(device)
    check = step_check(args, device)
    print(f"step check: CARPE fixed_weights=(0,1) vs vanilla: |loss diff| {check['loss_abs_diff']:.2e}, "
          f"max |grad diff| {check['grad_max_abs_diff']:.2e} (max |grad| {check['grad_max_abs']:.2e})")
    llava, model, batch = bench_models(args, device)
    steps = dict(vanilla=make_step(llava, batch, dtype, True), carpe=make_step(model, batch, dtype, False))
    times = time_interleaved(steps, args.repeats, device, CLOCKS[args.clock])
    t, parts = medians(times), step_breakdown(model, llava, batch, args, device, dtype)
    overhead = t["carpe"] - t["vanilla"]
    explained = parts["context"] + parts["integrator"] + parts["head_carpe"] - parts["head_vanilla"]
    r = dict(check=check, times=times, median_s=t, time_ratio=t["carpe"] / t["vanilla"], parts_s=parts,
             overhead_s=overhead, overhead_other_s=overhead - explained, T=batch["input_ids"].shape[1],
             vocab=llava.config.text_config.vocab_size)
    rows = [["vanilla step", fmt_ms(t["vanilla"]), ""], ["CARPE step", fmt_ms(t["carpe"]), f"{r['time_ratio']:.3f}x"]]
    if not args.no_memory:
        spec = dict(section="step", args=vars(args), device=str(device))
        r["memory"] = measure_memory(spec, ["vanilla", "carpe"], device)
        r["memory_ratio"] = r["memory"]["carpe"]["peak_bytes"] / r["memory"]["vanilla"]["peak_bytes"]
        rows[0].append(fmt_mib(r["memory"]["vanilla"]["peak_bytes"]))
        rows[1].append(fmt_mib(r["memory"]["carpe"]["peak_bytes"]) + f" ({r['memory_ratio']:.3f}x)")
    print_table(f"step: B={args.step_batch}, T={r['T']} ({args.prompt_text} prompt text + {image_tokens(llava)} image "
                f"+ {args.answer} answer), {args.layers} layers, d={args.hidden}, V={r['vocab']}, median of "
                f"{args.repeats}, {args.clock} time (targets: time <= 1.25x, memory <= 1.15x)",
                ["", "time", "CARPE/vanilla"] + (["peak memory"] if "memory" in r else []), rows)
    rows = [[f"{k} (fwd + bwd)", fmt_ms(v)] for k, v in parts.items()]
    rows += [["CARPE's additions (context + integrator + head_carpe - head_vanilla)", fmt_ms(explained)],
             ["measured step difference (CARPE - vanilla)", fmt_ms(overhead)]]
    print_table("step: where CARPE's overhead goes", ["piece", "time"], rows)
    return r


# -----------------------------------------------------------------------------
# section decode: CARPE.generate vs HF generate

def generate_timed(kind, llava, model, prompt, new, clock):
    """One generate call of `kind` (hf / carpe) on a make_batch prompt -> (prefill s, [decode step s]).
    The clock is stamped as each token comes out: first stamp minus the start = prefill, the gaps
    between stamps = decode steps."""
    ids, mask, pix = prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"]
    stamps = []

    def stamp_hf(input_ids, scores, **kwargs):  # a stopping criterion: HF calls it once per new token
        stamps.append(now(input_ids.device, clock))
        return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)  # never stop

    def stamp_carpe(*a, **k):  # CARPE.generation_step: the prefill, then one call per new token
        logits = type(model).generation_step(model, *a, **k)
        stamps.append(now(logits.device, clock))
        return logits
    t0 = now(ids.device, clock)
    if kind == "hf":
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, num_beams=1,
                             stopping_criteria=StoppingCriteriaList([stamp_hf]))
    else:
        model.generation_step = stamp_carpe  # an instance attribute shadows the method for this call
        try:
            out = model.generate(ids, mask, pix, max_new_tokens=new, eos_token_id=None)
        finally:
            del model.generation_step
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"{kind} generate returned {out.shape[1] - ids.shape[1]} new tokens, asked {new}")
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def section_decode(args, device):
    llava, model, _ = bench_models(args, device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    results = []
    for L in args.decode_lengths:
        if L < image_tokens(llava) + 2:
            raise SystemExit(f"--decode-lengths: {L} is too short for {image_tokens(llava)} image tokens")
        prompt = make_batch(llava, 1, L - image_tokens(llava), 0, device)  # (1, L), nothing supervised
        prompt["pixel_values"] = prompt["pixel_values"].to(llava.dtype)
        prefill, steps = {"hf": [], "carpe": []}, {"hf": [], "carpe": []}
        with torch.no_grad():
            for round_ in range(1 + args.repeats):  # one warm-up round, then interleaved rounds
                for kind in ["hf", "carpe"]:
                    p, s = generate_timed(kind, llava, model, prompt, args.new_tokens, CLOCKS[args.clock])
                    if round_ > 0:
                        prefill[kind].append(p)
                        steps[kind].extend(s)
        pre, per_token = medians(prefill), medians(steps)
        results.append(dict(prompt_length=L, new_tokens=args.new_tokens, prefill_s=pre, per_token_s=per_token,
                            context_pass_tokens=int(model.prompt_mask(prompt["input_ids"], prompt["attention_mask"]).sum()) + 1,
                            prefill_ratio=pre["carpe"] / pre["hf"], per_token_ratio=per_token["carpe"] / per_token["hf"]))
    rows = [[r["prompt_length"], r["context_pass_tokens"], fmt_ms(r["prefill_s"]["hf"]), fmt_ms(r["prefill_s"]["carpe"]),
             f"{r['prefill_ratio']:.3f}x", fmt_ms(r["per_token_s"]["hf"]), fmt_ms(r["per_token_s"]["carpe"]),
             f"{r['per_token_ratio']:.3f}x"] for r in results]
    print_table(f"decode: batch 1, greedy, {args.new_tokens} new tokens, {args.layers} layers, d={args.hidden}, "
                f"medians of {args.repeats} rounds, {args.clock} time (targets: prefill <= 1.2x, per token <= 1.15x "
                f"and flat in prompt length)", ["prompt", "context pass tokens", "HF prefill", "CARPE prefill", "ratio",
                                                "HF per token", "CARPE per token", "ratio"], rows)
    growth = None
    if len(results) > 1:
        growth = {k: results[-1]["per_token_s"][k] / results[0]["per_token_s"][k] for k in ["hf", "carpe"]}
        print(f"per-token cost at prompt {results[-1]['prompt_length']} over {results[0]['prompt_length']}: "
              f"HF {growth['hf']:.3f}x, CARPE {growth['carpe']:.3f}x")
    return dict(results=results, per_token_growth=growth)


# -----------------------------------------------------------------------------
# section compile: regional torch.compile vs eager on the training step

KEPT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")  # GEMMs


def is_kept_kernel(op_name):
    """Ops whose kernels inductor calls as they are (a library GEMM, an attention or convolution kernel)
    rather than generating code for: compiling cannot make them faster."""
    return op_name in KEPT_OPS or "scaled_dot_product" in op_name or "convolution" in op_name


def kept_kernel_share(step, device):
    """Share of one profiled call of step() spent in is_kept_kernel ops (self time: a parent op such
    as aten::linear counts only its own overhead, its GEMM once). A compiled step cannot beat
    eager by more than 1 / share if it keeps those kernels: Amdahl's bound on what compile buys."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    # the ops only: on GPU the kernels are listed too, and an op's self device time already holds its kernels'
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    own = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in ops)
    return sum(own(e) for e in ops if is_kept_kernel(e.key)) / total if total else 0.0


def compile_worker(spec):
    """One model (vanilla / carpe) at one depth, in a fresh process whose inductor cache is empty:
    the first compiled step's wall time (cold compile + one step), then eager and compiled steps
    interleaved. Eager is the same model under torch.compiler.set_stance("force_eager")."""
    args, device, dtype, llava, model, batch = worker_setup(spec)
    vanilla = spec["path"] == "vanilla"
    net = llava if vanilla else model
    loss_fn = (lambda: vanilla_loss_by_parts(llava, batch)) if vanilla else (lambda: model(**batch).loss)
    with torch.no_grad(), autocast_ctx(device, dtype):
        eager_loss = loss_fn().item()  # what the first compiled step must give
    kernels.reset_compile_counts()
    kernels.compile_blocks(carpe.repeated_blocks(net), backend=args.compile_backend)
    step = make_step(net, batch, dtype, vanilla, loss_fn)
    t0 = now(device)  # wall time: inductor compiles in worker processes too
    compiled_loss = step().item()
    compile_s = now(device) - t0
    counts = kernels.compile_counts()

    def eager_step():
        with torch.compiler.set_stance("force_eager"):
            step()
    t = medians(time_interleaved(dict(eager=eager_step, compiled=step), args.repeats, device, CLOCKS[args.clock]))
    share = kept_kernel_share(eager_step, device)
    return dict(first_step_s=compile_s, unique_graphs=counts.unique_graphs, graph_breaks=counts.graph_breaks,
                kept_share=share, speedup_bound=1 / share if share else float("inf"),
                eager_calls=counts.eager_calls, blocks=len(carpe.repeated_blocks(net)), median_s=t,
                speedup=t["eager"] / t["compiled"], eager_loss=eager_loss, compiled_loss=compiled_loss,
                loss_rel_diff=abs(compiled_loss - eager_loss) / abs(eager_loss))


def section_compile(args, device):
    spec = dict(section="compile", args=vars(args), device=str(device))
    results = []
    for layers in args.compile_layers:
        for path in ["vanilla", "carpe"]:
            cache = tempfile.mkdtemp(prefix="bench-inductor-")  # empty: the compile is cold
            try:
                r = run_worker(dict(spec, path=path, layers=layers), env=dict(TORCHINDUCTOR_CACHE_DIR=cache))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            results.append(dict(r, path=path, layers=layers))
            print(f"  compile {path} {layers} layers: first step {r['first_step_s']:.1f} s, {r['speedup']:.2f}x")
    rows = [[r["path"], r["layers"], r["blocks"], r["unique_graphs"], r["graph_breaks"] + r["eager_calls"],
             f"{r['first_step_s']:.1f} s", fmt_ms(r["median_s"]["eager"]), fmt_ms(r["median_s"]["compiled"]),
             f"{r['speedup']:.2f}x", f"{r['kept_share']:.0%}", f"{r['speedup_bound']:.2f}x", f"{r['loss_rel_diff']:.1e}"]
            for r in results]
    print_table(f"compile: kernels.compile_blocks, backend {args.compile_backend}, training step, median of "
                f"{args.repeats}, {args.clock} time (targets: CARPE's deepest first step <= 2x its shallowest, "
                f"CARPE eager/compiled >= 1.3x, 0 graph breaks, loss rel. diff <= 1e-5)",
                ["model", "layers", "blocks", "graphs", "graph breaks + eager calls", "first compiled step (cold, wall)",
                 "eager", "compiled", "eager/compiled", "eager in GEMM+attention kernels", "bound (1/share)",
                 "loss rel. diff"], rows)
    carpe_runs = [r for r in results if r["path"] == "carpe"]
    growth = carpe_runs[-1]["first_step_s"] / carpe_runs[0]["first_step_s"]
    print(f"CARPE cold compile at {carpe_runs[-1]['layers']} layers over {carpe_runs[0]['layers']}: {growth:.2f}x")
    return dict(backend=args.compile_backend, results=results, carpe_compile_growth=growth)


# -----------------------------------------------------------------------------
# section json: loading the LLaVA json per rank, before and after the packed cache

def write_llava_json(path, image_root, entries, chars, n_images=64, seed=0):
    """A LLaVA-Instruct-like json: entries alternating human/gpt turns (about `chars` characters
    each), 9 in 10 with an image out of n_images small files under image_root."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(image_root, exist_ok=True)
    for i in range(n_images):
        Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(os.path.join(image_root, f"{i:03d}.png"))
    words = [f"w{int(x)}" for x in torch.randint(0, 5000, (4096,), generator=g)]
    with open(path, "w") as f:
        f.write("[")
        for i in range(entries):
            n_turns = 2 * (1 + i % 3)
            text = " ".join(words[(i * 7 + k) % 4096] for k in range(max(chars // (6 * n_turns), 1)))
            conv = [dict(**{"from": "human" if t % 2 == 0 else "gpt"}, value=f"{text} {t}") for t in range(n_turns)]
            entry = dict(id=f"{i:06d}", conversations=conv)
            if i % 10:
                entry["image"] = f"{i % n_images:03d}.png"
                conv[0]["value"] = data.IMAGE_TAG + "\n" + conv[0]["value"]
            f.write(("," if i else "") + json.dumps(entry))
        f.write("]")


def json_worker(spec):
    """One way of getting the LLaVA records into a rank: `parse` (json.load and check every entry
    in every rank), `pack` (data.ensure_llava_cache: once per node), `map` (TrainDataset.from_config
    from the cache: every rank, every resume)."""
    config = data.DataConfig(llava_json=spec["json"], image_root=spec["image_root"], cache_dir=spec["cache_dir"])
    processor = tiny.tiny_llava()[1] if spec["path"] == "map" else None
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as meter:
        if spec["path"] == "parse":
            with open(spec["json"]) as f:
                n = sum(data.check_entry(e, config.image_root)[1] is not None for e in json.load(f))
        elif spec["path"] == "pack":
            data.ensure_llava_cache(config, progress=False)
            n = None
        else:
            n = len(data.TrainDataset.from_config(config, processor)[0].llava)
    return dict(seconds=time.perf_counter() - t0, peak_bytes=meter.peak, held_bytes=meter.held, records=n,
                cache=data.llava_cache_dir(config))


def section_json(args, device):
    root = tempfile.mkdtemp(prefix="bench-json-")
    try:
        spec = dict(section="json", json=os.path.join(root, "llava.json"), image_root=os.path.join(root, "images"),
                    cache_dir=os.path.join(root, "cache"))
        write_llava_json(spec["json"], spec["image_root"], args.json_entries, args.json_chars)
        # the default allocator here: what a rank really holds, freed memory included
        r = {p: run_worker(dict(spec, path=p), env={}) for p in ["parse", "pack", "map"]}
        r["file_bytes"] = os.path.getsize(spec["json"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [[what, f"{r[p]['seconds']:.2f} s", fmt_mib(r[p]["peak_bytes"]), fmt_mib(r[p]["held_bytes"])]
            for what, p in [("before, every rank: json.load + check", "parse"),
                            ("after, once per node: check + pack (ensure_llava_cache)", "pack"),
                            ("after, every rank and resume: map the cache (from_config)", "map")]]
    print_table(f"json: {args.json_entries} entries, {fmt_mib(r['file_bytes'])}, one process each",
                ["", "time", "peak memory", "held after"], rows)
    return dict(r, entries=args.json_entries)


# -----------------------------------------------------------------------------

SECTIONS = dict(paper=section_paper, head=section_head, step=section_step, decode=section_decode,
                compile=section_compile, json=section_json)
WORKERS = dict(head=head_memory_worker, step=step_memory_worker, compile=compile_worker, json=json_worker)


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def get_parser(description="CARPE benchmarks: fused head vs the paper's form, step and decode cost over vanilla "
                           "LLaVA, regional torch.compile, LLaVA json loading.", sections=True):
    """bench.py's flags; sections=False leaves out --sections and --worker (accept.py runs fixed sections)."""
    p = argparse.ArgumentParser(description=description)
    if sections:
        p.add_argument("--sections", default="paper,head,step,decode",
                       help=f"comma-separated sections out of {','.join(SECTIONS)} (compile and json are slow: ask for them)")
    p.add_argument("--out", default="bench_out", help="folder for <section>.json results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per path (after one warm-up); medians reported")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (subprocesses on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=list(CLOCKS), default=None,
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine, best with "
                        "--threads 1). Default: cpu on CPU, wall on GPU")
    p.add_argument("--head-n", type=int_list, default="512,2048", help="head: comma-separated supervised token counts N")
    p.add_argument("--head-d", type=int, default=1024, help="head: hidden width d (7B: 4096)")
    p.add_argument("--vocab", type=int, default=32064, help="head: vocabulary V (LLaVA-1.5: 32064)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the fused linear CE")
    p.add_argument("--layers", type=int, default=32, help="step/decode: LM decoder layers (LLaVA-7B: 32)")
    p.add_argument("--hidden", type=int, default=256, help="LM width d (multiple of 64; heads of 64)")
    p.add_argument("--vision-layers", type=int, default=24, help="CLIP tower layers (ViT-L: 24); width is hidden/4")
    p.add_argument("--image-size", type=int, default=336, help="image side in px; patch 14 (336 -> 576 image tokens)")
    p.add_argument("--model-vocab", type=int, default=2004,
                   help="LM vocabulary (default 32064 * 256 / 4096: the head's share of a step as at 7B; 0 = tokenizer's)")
    p.add_argument("--step-batch", type=int, default=2, help="samples per training step")
    p.add_argument("--prompt-text", type=int, default=60, help="prompt text tokens per sample (with <s>)")
    p.add_argument("--answer", type=int, default=40, help="supervised answer tokens per sample")
    p.add_argument("--mfu", type=float, default=0.4, help="paper: share of the bf16 peak the GPU-hours assume")
    p.add_argument("--decode-lengths", type=int_list, default="600,1200", help="decode: comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="decode: tokens to generate")
    p.add_argument("--compile-layers", type=int_list, default="4,32", help="compile: LM depths to compile")
    p.add_argument("--compile-backend", default="inductor", help="compile: torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--json-entries", type=int, default=665_000, help="json: entries of the generated LLaVA json")
    p.add_argument("--json-chars", type=int, default=1500, help="json: characters of text per entry (mix665k: ~1.5K)")
    if sections:
        p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measured path per process
    return p


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {list(SECTIONS)}")
    if args.hidden % 64:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of 64 (heads of 64)")
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    return args


def run(args, sections=SECTIONS):
    """Run args.sections, each looked up in `sections` -> {section: result}; writes <out>/<section>.json."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    cpus = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else []
    machine = dict(device=str(device), cpu=cpus[0] if cpus else "?", cores=os.cpu_count(), threads=torch.get_num_threads(),
                   load_average=os.getloadavg(), torch=torch.__version__,
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    print(f"machine: {machine}, clock: {args.clock}")
    results = {}
    for name in args.sections:
        t0 = time.perf_counter()
        r = dict(section=name, machine=machine, result=sections[name](args, device))
        r.update(seconds=time.perf_counter() - t0, load_average_after=os.getloadavg())
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
        print(f"[{name}: {r['seconds']:.0f} s, {os.path.join(args.out, name + '.json')}]")
        results[name] = r
    return results


if __name__ == "__main__":
    worker = get_parser().parse_args().worker
    if worker:  # one measured path: its JSON result is the last line printed
        spec = json.loads(worker)
        if spec.get("args", {}).get("threads"):
            torch.set_num_threads(spec["args"]["threads"])
        print(json.dumps(WORKERS[spec["section"]](spec)), flush=True)
    else:
        run(parse_args())
