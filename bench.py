"""
bench.py: how much CARPE costs over vanilla LLaVA, and how close our fused paths come to the
hardware's limit. Flat script in the spirit of nanoGPT's bench.py; sections by flag:

    python bench.py                      # sections paper, head, step, decode (~6 min of CPU time at 1 thread)
    python bench.py --sections head      # one section
    python bench.py --sections compile   # torch.compile vs eager on the training step (slow to compile)
    python bench.py --out bench_out      # JSON per section lands in bench_out/<section>.json

Sections
 paper   FLOPs and memory of CARPE's additions over LLaVA-1.5-7B per training step, worked out
         analytically (no model is run).
 head    Mix + loss with a trainable head, forward + backward: kernels.fused_mixed_cross_entropy
         against the paper's form (kernels.reference_mixed_cross_entropy), and the floor: three
         bare N x d x V matmuls (logits, dL/dH, dL/dW), the FLOPs any trainable-head CE needs.
 step    One training step (forward, backward, AdamW) of CARPE against vanilla LLaVA (HF
         LlavaForConditionalGeneration with labels) with the same frozen set, on a 32-layer
         LLaVA with 7B proportions; the overhead is broken into context pass, integrator, head.
 decode  Prefill and per-token decode latency of CARPE.generate against HF generate (greedy,
         cached) at two prompt lengths.
 compile torch.compile against eager on the CARPE training step; compile time (wall: inductor
         compiles in worker processes) and graph breaks separately. Opt-in (--compile): CARPE's
         forward has data-dependent shapes (boolean masks, the context pass's length), so dynamo
         breaks the graph in several places and compiling the 32-layer model takes many minutes.

Choices (the issue is silent on these):
 - Timing: every path of a section is run in turn, `--repeats` times (interleaved, after one
   warm-up round), and the median is reported; ratios are ratios of medians. The machine is
   shared and noisy, so absolute times move, ratios much less.
 - CPU memory: each path runs in its own subprocess (`--worker`); peak RSS (VmHWM, reset through
   /proc/self/clear_refs after set-up) over the RSS after set-up. For the head we report that
   peak minus the gradients every path must return (dL/dW, dL/dH_vision, dL/dH_llm), i.e. what
   grows with N x V, as DESIGN.md section 3 asks. GPU: torch.cuda.max_memory_allocated.
 - The step/decode model: tiny_llava with 32 layers, d=256, 4 heads of 64, MLP 688 (LLaMA-7B's
   11008/4096 ratio), a 24-layer 64-wide CLIP at 336 px / patch 14 (576 image tokens, the
   tower's share of FLOPs close to 7B's), and the vocabulary scaled with the width
   (V = 32064 * 256 / 4096 = 2004) so that the head's share of the step is LLaVA-7B's.
   Batch 2, each sample 60 prompt text tokens (with <s>), 576 image tokens, 40 answer tokens.
 - The step is measured in epoch-2 mode (context prompt and encoder trainable, so the context
   pass also runs backward), the costlier of the two.
 - Decode: prefill = generate with 1 new token; per-token = (t(32 new) - t(1 new)) / 31; batch 1;
   no EOS stop (HF gets min_new_tokens).
 - MFU is printed on GPU only, against --peak-tflops (default: bf16 dense peak of the card).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import kernels
import tiny

IS_WORKER = "--worker" in sys.argv


def print0(*args, **kwargs):
    # bench.py runs as one process; workers stay quiet except for their JSON line
    if not IS_WORKER:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock in run()


def time_interleaved(fns, repeats, device, warmup=1):
    """fns: {name: callable}. Runs every fn in turn, `warmup` + `repeats` rounds; returns
    {name: [seconds of each timed round]}. Interleaving spreads the machine's noise evenly."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(clock() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def read_status_bytes(key):
    """VmRSS / VmHWM of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status: peak-RSS measurement needs Linux")


class PeakRSS:
    """Peak resident memory of the block over the resident memory at its start (CPU)."""

    def __enter__(self):
        self.baseline = read_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        self.peak = read_status_bytes("VmHWM") - self.baseline


class PeakCUDA:
    def __enter__(self):
        torch.cuda.synchronize()
        self.baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.baseline


def peak_meter(device):
    return PeakCUDA() if device.type == "cuda" else PeakRSS()


def run_worker(spec):
    """Run one path of a section in a fresh Python process; returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    # glibc keeps freed small blocks in the process (and its mmap threshold grows up to 32 MiB),
    # so RSS would remember memory already given back; a fixed 64 KiB threshold makes every
    # larger tensor its own mapping, unmapped when freed, and RSS then follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def default_peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print0(f"\n{title}")
    print0("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print0("  ".join("-" * w for w in widths))
    for row in rows:
        print0("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def fmt_ms(s):
    return f"{s * 1e3:.1f} ms"


def fmt_mib(b):
    return f"{b / 2**20:.0f} MiB"


def autocast_ctx(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# -----------------------------------------------------------------------------
# section paper: CARPE's additions over LLaVA-1.5-7B, on paper

def paper_cost(d=4096, layers=32, ffn=11008, vocab=32064, d_vision=1024, image_tokens=576,
               prompt_text=60, answer=40, batch=64, mlp_ratio=4.0, chunk=1024):
    """FLOPs per training step (global batch) and memory of CARPE's additions to LLaVA-1.5-7B.
    Counting: a matmul of (m, k) x (k, n) is 2mkn FLOPs. A trainable layer costs 3x its
    forward (forward, input grad, weight grad); a frozen layer the gradient flows through
    costs 2x (forward, input grad). Attention scores and values count 4 T_q T_k d per forward."""
    T = prompt_text + image_tokens + answer
    S = prompt_text + 1  # context pass: prompt text + the context prompt
    P = image_tokens
    N = answer  # supervised tokens
    lm_layer_params = 4 * d * d + 3 * d * ffn  # attention (MHA) + SwiGLU MLP
    lm_params = layers * lm_layer_params

    def lm_forward(tokens):
        # causal self-attention: on average tokens/2 keys per query
        return 2 * lm_params * tokens + layers * 4 * tokens * (tokens / 2) * d

    vanilla = {
        "LM (frozen, grads flow to projector): fwd + input-grad bwd": 2 * lm_forward(T),
        "head over all T tokens (HF): logits + dL/dH + dL/dW": 3 * 2 * T * d * vocab,
        "projector (trainable) 1024->4096->4096 on P tokens": 3 * 2 * P * (d_vision * d + d * d),
    }
    mlp = int(mlp_ratio * d)
    integrator_params = (2 * d * d) * 2 + 4 * d * d + 2 * d * mlp  # cross q,o,k,v; self q,k,v,o; MLP
    adapter_params = d_vision * d + d * d
    integrator_fwd = (2 * T * (2 * d * d)  # cross-attn q, o on T queries
                      + 2 * P * (2 * d * d)  # cross-attn k, v on P image tokens
                      + 4 * T * P * d  # cross-attn scores + values
                      + 2 * T * (4 * d * d) + 4 * T * (T / 2) * d  # causal self-attention
                      + 2 * T * (2 * d * mlp))  # MLP
    carpe_add = {
        "context pass (frozen LM on S=prompt+1 tokens, fwd + bwd to ctx)": 2 * lm_forward(S),
        "raw adapter 1024->4096->4096 on P tokens (trainable)": 3 * 2 * P * adapter_params,
        "integrator block on T tokens (trainable)": 3 * integrator_fwd,
        "head: fused on N supervised minus HF's over T": 3 * 2 * N * d * vocab - 3 * 2 * T * d * vocab,
    }
    vanilla_total = sum(vanilla.values())
    carpe_total = vanilla_total + sum(carpe_add.values())
    bytes_bf16 = 2
    new_params = integrator_params + adapter_params + d + 2 * d + 2  # + ctx + W_ctx
    memory = {
        "new trainable params": new_params,
        "their weights+grads (bf16) + AdamW m, v and fp32 master (4+4+4 B)": new_params * (2 + 2 + 12),
        "integrator activations per sample (bf16, ~14 (T, d) + 2 (T, 4d) tensors)": (14 * T * d + 2 * T * mlp) * bytes_bf16,
        "context pass activations per sample (vs main pass: S/T of it)": S / T,
        "HF head logits per sample, fp32 (T x V) + grad, not needed by CARPE": 2 * T * vocab * 4,
        "CARPE loss: one fp32 (chunk x V) buffer per device": chunk * vocab * 4,
    }
    return dict(tokens_per_sample=T, batch=batch,
                vanilla_flops_per_sample=vanilla, carpe_added_flops_per_sample=carpe_add,
                vanilla_flops_per_step=vanilla_total * batch, carpe_flops_per_step=carpe_total * batch,
                flops_ratio=carpe_total / vanilla_total, memory=memory,
                integrator_params=integrator_params, adapter_params=adapter_params)


def section_paper(args, device):
    r = paper_cost(prompt_text=args.prompt_text, answer=args.answer)
    rows = [[k, f"{v / 1e12:.3f} TFLOP"] for k, v in r["vanilla_flops_per_sample"].items()]
    rows += [["+ " + k, f"{v / 1e12:+.3f} TFLOP"] for k, v in r["carpe_added_flops_per_sample"].items()]
    rows += [["CARPE / vanilla FLOPs per step", f"{r['flops_ratio']:.3f}x"]]
    print_table(f"paper: LLaVA-1.5-7B, per sample of {r['tokens_per_sample']} tokens "
                f"(step = {r['batch']} samples: vanilla {r['vanilla_flops_per_step'] / 1e15:.2f} PFLOP, "
                f"CARPE {r['carpe_flops_per_step'] / 1e15:.2f} PFLOP)", ["term", "FLOPs"], rows)
    rows = []
    for k, v in r["memory"].items():
        if k.startswith("new trainable"):
            rows.append([k, f"{v / 1e6:.0f} M"])
        elif k.startswith("context pass"):
            rows.append([k, f"{v:.2f}"])
        else:
            rows.append([k, f"{v / 2**20:.0f} MiB"])
    print_table("paper: memory of CARPE's additions", ["term", "size"], rows)
    return r


# -----------------------------------------------------------------------------
# section head: fused mix + chunked linear CE vs the paper's form vs the bare-matmul floor

def head_inputs(N, d, V, device, seed=0, batch=2):
    """N supervised tokens over `batch` samples (every position after the first supervised)."""
    g = torch.Generator().manual_seed(seed)
    T = N // batch + 1
    h_vision = torch.randn(batch, T, d, generator=g).to(device).requires_grad_()  # (B, T, d)
    h_llm = torch.randn(batch, T, d, generator=g).to(device).requires_grad_()  # (B, T, d)
    weights = torch.softmax(torch.randn(batch, 2, generator=g), -1).to(device)  # (B, 2)
    head_weight = (torch.randn(V, d, generator=g) * d ** -0.5).to(device).requires_grad_()  # (V, d)
    labels = torch.randint(0, V, (batch, T), generator=g).to(device)  # (B, T)
    labels[:, 0] = kernels.IGNORE_INDEX  # position 0 is never a target: N = batch * (T - 1)
    return dict(h_vision=h_vision, h_llm=h_llm, weights=weights, labels=labels, head_weight=head_weight)


def head_step(path, x, chunk_size, dtype):
    """One forward + backward of `path` on head_inputs x; gradients land in .grad."""
    device = x["h_llm"].device
    with autocast_ctx(device, dtype):
        if path == "fused":
            loss = kernels.fused_mixed_cross_entropy(x["h_vision"], x["h_llm"], x["weights"], x["labels"],
                                                     x["head_weight"], chunk_size=chunk_size)
        elif path == "naive":
            loss = kernels.reference_mixed_cross_entropy(x["h_vision"], x["h_llm"], x["weights"], x["labels"],
                                                         x["head_weight"])
        elif path == "floor":
            # 3 bare matmuls: logits, dL/dH, dL/dW (no softmax, no mix)
            with torch.no_grad():
                h = x["h_llm"][:, :-1].reshape(-1, x["h_llm"].size(-1)).to(dtype)  # (N, d)
                w = x["head_weight"].to(dtype)  # (V, d)
                logits = h @ w.t()  # (N, V)
                logits @ w  # (N, d)
                logits.t() @ h  # (V, d)
            return None
        else:
            raise ValueError(f"unknown head path {path!r}")
    loss.backward()
    return loss.detach()


def zero_grads(tensors):
    for t in tensors:
        t.grad = None


def head_check(N, d, V, device, chunk_size):
    """Loss and gradients of fused vs naive on the same inputs, in fp32: max abs differences."""
    x = head_inputs(N, d, V, device)
    leaves = [x["h_vision"], x["h_llm"], x["head_weight"]]
    results = {}
    for path in ["naive", "fused"]:
        zero_grads(leaves)
        loss = head_step(path, x, chunk_size, torch.float32)
        results[path] = [loss] + [t.grad.clone() for t in leaves]
    diffs = [(a - b).abs().max().item() for a, b in zip(results["naive"], results["fused"])]
    scale = [b.abs().max().item() for b in results["naive"]]
    return dict(loss_naive=results["naive"][0].item(), loss_fused=results["fused"][0].item(),
                max_abs_diff=dict(zip(["loss", "grad_h_vision", "grad_h_llm", "grad_head_weight"], diffs)),
                max_abs=dict(zip(["loss", "grad_h_vision", "grad_h_llm", "grad_head_weight"], scale)))


def head_memory_worker(spec):
    device = torch.device(spec["device"])
    x = head_inputs(spec["N"], spec["d"], spec["V"], device)
    # touch the matmul library once so its one-off allocations stay out of the measurement
    with torch.no_grad():
        x["h_llm"][0, :8] @ x["head_weight"].t()
    grad_bytes = sum(x[k].numel() * x[k].element_size() for k in ["h_vision", "h_llm", "head_weight"])
    meter = peak_meter(device)
    t0 = time.perf_counter()
    with meter:
        head_step(spec["path"], x, spec["chunk_size"], getattr(torch, spec["dtype"]))
        sync(device)
    return dict(peak_bytes=meter.peak, grad_bytes=grad_bytes, seconds=time.perf_counter() - t0)


def section_head(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(n, args.head_d) for n in args.head_n]
    if device.type == "cuda":
        shapes.append((2048, 4096))  # LLaVA-7B's true width
    check = head_check(64, 32, 1000, device, chunk_size=24)  # chunked over 3 chunks
    print0(f"head check (fp32, N=64, d=32, V=1000, 3 chunks): max |fused - naive| = "
           + ", ".join(f"{k} {v:.2e}" for k, v in check["max_abs_diff"].items()))
    peak_tflops = args.peak_tflops or default_peak_tflops(device)
    results = []
    for N, d in shapes:
        V = args.vocab
        x = head_inputs(N, d, V, device)
        leaves = [x["h_vision"], x["h_llm"], x["head_weight"]]

        def run(path):
            def fn():
                zero_grads(leaves)
                head_step(path, x, args.chunk_size, dtype)
            return fn
        times = time_interleaved({p: run(p) for p in ["naive", "fused", "floor"]}, args.repeats, device)
        del x, leaves
        t = {p: median(v) for p, v in times.items()}
        r = dict(N=N, d=d, V=V, dtype=str(dtype), times=times, median_s=t,
                 speedup_fused_over_naive=t["naive"] / t["fused"], fused_over_floor=t["fused"] / t["floor"])
        if not args.no_memory:
            mem = {}
            for path in ["naive", "fused"]:
                spec = dict(section="head", path=path, N=N, d=d, V=V, chunk_size=args.chunk_size,
                            dtype=str(dtype).replace("torch.", ""), device=str(device))
                mem[path] = run_worker(spec) if device.type == "cpu" else head_memory_worker(spec)
            r["memory"] = mem
            r["peak_ratio_total"] = mem["naive"]["peak_bytes"] / mem["fused"]["peak_bytes"]
            nv = {p: mem[p]["peak_bytes"] - mem[p]["grad_bytes"] for p in mem}  # what grows with N x V
            r["peak_over_grads"] = nv
            r["peak_ratio_NV"] = nv["naive"] / max(nv["fused"], 1)
        if peak_tflops:
            r["mfu_fused"] = 3 * 2 * N * d * V / t["fused"] / (peak_tflops * 1e12)
        results.append(r)
        print0(f"  head N={N} d={d}: naive {fmt_ms(t['naive'])}, fused {fmt_ms(t['fused'])}, floor {fmt_ms(t['floor'])}")
    rows = []
    for r in results:
        t = r["median_s"]
        row = [r["N"], r["d"], fmt_ms(t["naive"]), fmt_ms(t["fused"]), fmt_ms(t["floor"]),
               f"{r['speedup_fused_over_naive']:.2f}x", f"{r['fused_over_floor']:.2f}x"]
        if "memory" in r:
            m = r["memory"]
            row += [fmt_mib(m["naive"]["peak_bytes"]), fmt_mib(m["fused"]["peak_bytes"]),
                    f"{r['peak_ratio_total']:.1f}x", f"{r['peak_ratio_NV']:.1f}x"]
        if "mfu_fused" in r:
            row.append(f"{100 * r['mfu_fused']:.0f}%")
        rows.append(row)
    header = ["N", "d", "naive", "fused", "floor", "naive/fused", "fused/floor"]
    if not args.no_memory:
        header += ["peak naive", "peak fused", "ratio", "ratio (N x V part)"]
    if peak_tflops:
        header.append("MFU fused")
    print_table(f"head: mix + CE, fwd + bwd, trainable head, V={args.vocab}, chunk {args.chunk_size}, "
                f"median of {args.repeats}, {args.clock} time (targets at N=2048, d=1024: naive/fused >= 1.7x, "
                f"memory >= 4x, fused/floor <= 1.3x)", header, rows)
    return dict(check=check, results=results, chunk_size=args.chunk_size)


# -----------------------------------------------------------------------------
# the 32-layer model with LLaVA-7B proportions (sections step, decode, compile)

def bench_llava(args, device):
    """tiny_llava with LLaVA-7B's depth and proportions (see the module docstring)."""
    import carpe
    llava, processor = tiny.tiny_llava(
        seed=0, image_size=args.image_size, patch_size=14, layers=args.layers, hidden=args.hidden,
        heads=args.hidden // 64, kv_heads=args.hidden // 64, intermediate=round(args.hidden * 11008 / 4096),
        vision_hidden=args.hidden // 4, vision_layers=args.vision_layers, vision_heads=max(args.hidden // 256, 1),
        max_positions=2048)
    if args.model_vocab and args.model_vocab != llava.config.text_config.vocab_size:
        llava.resize_token_embeddings(args.model_vocab, mean_resizing=False)
    return llava.to(device), processor


def bench_carpe(llava, args, fixed_weights=None):
    import carpe
    config = carpe.CarpeConfig(integrator_heads=max(args.hidden // 64, 1), fixed_weights=fixed_weights,
                               chunk_size=args.chunk_size)
    model = carpe.CARPE(llava, config)
    model.set_context_trainable(True)  # epoch-2 mode: the context pass also runs backward
    return model


def image_tokens(llava):
    vc = llava.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def make_batch(llava, batch, prompt_text, answer, device, seed=0, text_vocab=512):
    """Token ids like a vicuna_v1 sample: <s> + text, the image tokens after the first third of
    the prompt text, the rest of the prompt, then the answer (supervised). Random token ids
    (the model is random too); the vocabulary's first 5 ids are the special tokens."""
    g = torch.Generator().manual_seed(seed)
    P = image_tokens(llava)
    image_id = llava.config.image_token_id
    before = max(prompt_text // 3, 1)
    after = prompt_text - before
    rows, labels = [], []
    for _ in range(batch):
        text = torch.randint(5, text_vocab, (prompt_text + answer,), generator=g)
        text[0] = 1  # <s>
        ids = torch.cat([text[:before], torch.full((P,), image_id), text[before:]])  # (T,)
        lab = torch.full_like(ids, kernels.IGNORE_INDEX)
        lab[-answer:] = ids[-answer:]
        rows.append(ids)
        labels.append(lab)
    vc = llava.config.vision_config
    pixel_values = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    input_ids = torch.stack(rows)
    return dict(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                pixel_values=pixel_values.to(device), labels=torch.stack(labels).to(device))


def vanilla_param_groups(llava, lr_adapter=2e-5, lr=2e-4):
    """Vanilla LLaVA with CARPE's frozen set: projector (adapter lr) and head trainable."""
    return [dict(params=list(llava.model.multi_modal_projector.parameters()), lr=lr_adapter),
            dict(params=list(llava.lm_head.parameters()), lr=lr)]


def make_step(model, optimizer, batch, dtype, vanilla):
    device = batch["input_ids"].device

    def step():
        with autocast_ctx(device, dtype):
            if vanilla:
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            else:
                loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def step_check(args, device):
    """CARPE with fixed_weights=(0, 1) is vanilla LLaVA: same loss, same projector and head grads."""
    llava, _ = bench_llava(args, device)
    model = bench_carpe(llava, args, fixed_weights=(0.0, 1.0))
    batch = make_batch(llava, args.step_batch, args.prompt_text, args.answer, device)
    shared = {n: p for n, p in llava.named_parameters() if p.requires_grad}
    grads = {}
    for name, run in [("vanilla", lambda: llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                 pixel_values=batch["pixel_values"], labels=batch["labels"]).loss),
                      ("carpe", lambda: model(**batch).loss)]:
        for p in shared.values():
            p.grad = None
        loss = run()
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in shared.items()})
    loss_diff = (grads["vanilla"][0] - grads["carpe"][0]).abs().item()
    grad_diff = max((grads["vanilla"][1][n] - grads["carpe"][1][n]).abs().max().item() for n in shared)
    grad_scale = max(grads["vanilla"][1][n].abs().max().item() for n in shared)
    return dict(loss_vanilla=grads["vanilla"][0].item(), loss_carpe_fixed_0_1=grads["carpe"][0].item(),
                loss_abs_diff=loss_diff, grad_max_abs_diff=grad_diff, grad_max_abs=grad_scale,
                trainable_shared=sorted(shared))


def step_breakdown(model, llava, batch, args, device, dtype):
    """Time CARPE's additions on their own, forward + backward each (medians):
    the context pass, the integrator (raw adapter + block), and the head (fused loss on the
    supervised tokens vs HF's logits over every token + CE)."""
    import torch.nn.functional as F
    import carpe
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, T = ids.shape
    d = llava.config.text_config.hidden_size
    with torch.no_grad():
        feats = carpe.raw_vision_features(llava, batch["pixel_values"])  # (B, P, Dv), frozen tower
    has_image = torch.ones(B, dtype=torch.bool, device=device)
    h_query = torch.randn(B, T, d, device=device, requires_grad=True)  # (B, T, d)
    h_vision = torch.randn(B, T, d, device=device, requires_grad=True)
    h_llm = torch.randn(B, T, d, device=device, requires_grad=True)
    weights = torch.full((B, 2), 0.5, device=device)
    head = llava.lm_head

    def context():
        with autocast_ctx(device, dtype):
            w, _ = model.context(ids, mask, labels)
        w[:, 0].sum().backward()

    def integrator():
        with autocast_ctx(device, dtype):
            memory = model.vision_integrator.raw_adapter(feats)  # (B, P, d)
            out = model.integrate(h_query, model.memory_kv(memory), has_image)  # (B, T, d)
        out.float().square().mean().backward()

    def head_carpe():
        with autocast_ctx(device, dtype):
            loss = kernels.fused_mixed_cross_entropy(h_vision, h_llm, weights, labels, head.weight, head.bias,
                                                     chunk_size=args.chunk_size)
        loss.backward()

    def head_vanilla():
        with autocast_ctx(device, dtype):
            logits = head(h_llm)  # (B, T, V), as HF computes them
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=kernels.IGNORE_INDEX)
        loss.backward()

    fns = dict(context=context, integrator=integrator, head_carpe=head_carpe, head_vanilla=head_vanilla)

    def clear():
        for p in list(model.parameters()) + [h_query, h_vision, h_llm]:
            p.grad = None
    wrapped = {k: (lambda fn=fn: (fn(), clear())) for k, fn in fns.items()}
    times = time_interleaved(wrapped, args.repeats, device)
    return {k: median(v) for k, v in times.items()}


def step_memory_worker(spec):
    args = argparse.Namespace(**spec["args"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    llava, _ = bench_llava(args, device)
    model = bench_carpe(llava, args)  # sets CARPE's frozen set on the shared llava, also for vanilla
    batch = make_batch(llava, args.step_batch, args.prompt_text, args.answer, device)
    if spec["path"] == "vanilla":
        model = llava
        optimizer = torch.optim.AdamW(vanilla_param_groups(llava), weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(model.param_groups(), weight_decay=0.0)
    step = make_step(model, optimizer, batch, dtype, vanilla=spec["path"] == "vanilla")
    step()  # AdamW's state exists from here on: the measured step is a steady-state one
    meter = peak_meter(device)
    with meter:
        step()
    return dict(peak_bytes=meter.peak)


def step_flops(llava, batch, carpe_model=None):
    """Analytic FLOPs of one step (for MFU on GPU): frozen LM fwd + input-grad bwd, trainable
    head and projector 3x; CARPE adds its context pass, integrator and fused head."""
    tc = llava.config.text_config
    d, L, ffn, V = tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size, tc.vocab_size
    B, T = batch["input_ids"].shape
    N = int((batch["labels"][:, 1:] != kernels.IGNORE_INDEX).sum())
    lm = lambda t: 2 * L * (4 * d * d + 3 * d * ffn) * t + L * 2 * t * t * d
    flops = 2 * lm(T) * B
    if carpe_model is None:
        return flops + 6 * B * T * d * V
    S = int(carpe_model.prompt_mask(batch["input_ids"], batch["attention_mask"], batch["labels"]).sum(1).max()) + 1
    P = image_tokens(llava)
    integ = 2 * T * 16 * d * d + 2 * P * 2 * d * d + 4 * T * P * d + 2 * T * T * d
    return flops + 2 * lm(S) * B + 3 * integ * B + 6 * N * d * V


def section_step(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check = step_check(args, device)
    print0(f"step check: CARPE fixed_weights=(0,1) vs vanilla: |loss diff| {check['loss_abs_diff']:.2e}, "
           f"max |grad diff| {check['grad_max_abs_diff']:.2e} (max |grad| {check['grad_max_abs']:.2e})")
    llava, _ = bench_llava(args, device)
    model = bench_carpe(llava, args)
    batch = make_batch(llava, args.step_batch, args.prompt_text, args.answer, device)
    # two optimizers over the shared llava: steps move the shared weights, which timing ignores
    carpe_step = make_step(model, torch.optim.AdamW(model.param_groups(), weight_decay=0.0), batch, dtype, False)
    vanilla_step = make_step(llava, torch.optim.AdamW(vanilla_param_groups(llava), weight_decay=0.0), batch,
                             dtype, True)
    times = time_interleaved(dict(vanilla=vanilla_step, carpe=carpe_step), args.repeats, device)
    t = {k: median(v) for k, v in times.items()}
    parts = step_breakdown(model, llava, batch, args, device, dtype)
    r = dict(check=check, times=times, median_s=t, time_ratio=t["carpe"] / t["vanilla"], parts_s=parts,
             T=batch["input_ids"].shape[1], batch=args.step_batch, layers=args.layers, hidden=args.hidden,
             vocab=llava.config.text_config.vocab_size)
    overhead = t["carpe"] - t["vanilla"]
    explained = parts["context"] + parts["integrator"] + parts["head_carpe"] - parts["head_vanilla"]
    r["overhead_s"] = overhead
    r["overhead_other_s"] = overhead - explained
    if not args.no_memory:
        mem = {}
        for path in ["vanilla", "carpe"]:
            spec = dict(section="step", path=path, args=vars(args), device=str(device),
                        dtype=str(dtype).replace("torch.", ""))
            mem[path] = run_worker(spec) if device.type == "cpu" else step_memory_worker(spec)
        r["memory"] = mem
        r["memory_ratio"] = mem["carpe"]["peak_bytes"] / mem["vanilla"]["peak_bytes"]
    peak_tflops = args.peak_tflops or default_peak_tflops(device)
    if peak_tflops:
        r["mfu_vanilla"] = step_flops(llava, batch) / t["vanilla"] / (peak_tflops * 1e12)
        r["mfu_carpe"] = step_flops(llava, batch, model) / t["carpe"] / (peak_tflops * 1e12)
    rows = [["vanilla step", fmt_ms(t["vanilla"]), ""], ["CARPE step", fmt_ms(t["carpe"]), f"{r['time_ratio']:.3f}x"]]
    if "memory" in r:
        rows[0].append(fmt_mib(r["memory"]["vanilla"]["peak_bytes"]))
        rows[1].append(fmt_mib(r["memory"]["carpe"]["peak_bytes"]) + f" ({r['memory_ratio']:.3f}x)")
    if peak_tflops:
        rows[0].append(f"{100 * r['mfu_vanilla']:.1f}%")
        rows[1].append(f"{100 * r['mfu_carpe']:.1f}%")
    header = ["", "time", "CARPE/vanilla"] + (["peak memory"] if "memory" in r else []) + (["MFU"] if peak_tflops else [])
    print_table(f"step: B={args.step_batch}, T={r['T']} ({args.prompt_text} prompt text + {image_tokens(llava)} image "
                f"+ {args.answer} answer), {args.layers} layers, d={args.hidden}, V={r['vocab']}, median of "
                f"{args.repeats}, {args.clock} time (targets: time <= 1.25x, memory <= 1.15x)", header, rows)
    rows = [["context pass (fwd + bwd)", fmt_ms(parts["context"])],
            ["integrator: raw adapter + block (fwd + bwd)", fmt_ms(parts["integrator"])],
            ["head: CARPE fused CE on supervised tokens", fmt_ms(parts["head_carpe"])],
            ["head: vanilla HF logits on all tokens + CE", fmt_ms(parts["head_vanilla"])],
            ["sum of CARPE's additions (context + integrator + head difference)", fmt_ms(explained)],
            ["measured step difference (CARPE - vanilla)", fmt_ms(overhead)]]
    print_table("step: where CARPE's overhead goes", ["piece", "time"], rows)
    return r


# -----------------------------------------------------------------------------
# section decode: CARPE.generate vs HF generate

def decode_prompt(llava, length, device, seed=0, text_vocab=512):
    g = torch.Generator().manual_seed(seed)
    P = image_tokens(llava)
    if length < P + 2:
        raise ValueError(f"--decode-lengths: {length} is too short for {P} image tokens")
    text = torch.randint(5, text_vocab, (length - P,), generator=g)
    text[0] = 1
    ids = torch.cat([text[:20], torch.full((P,), llava.config.image_token_id), text[20:]])[None]  # (1, L)
    vc = llava.config.vision_config
    pixel_values = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pixel_values.to(device)


class TokenClock:
    """Timestamps (of `clock`) each time a token is produced. For HF generate it is a
    StoppingCriteria (called once per new token); for CARPE it wraps generation_step. The
    first stamp minus the start is the prefill; the gaps between stamps are decode steps, so
    one slow round does not leak into the per-token figure through a subtraction."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):  # StoppingCriteria protocol: never stop
        self.stamps.append(clock())
        return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)

    def wrap(self, fn):
        def timed(*a, **k):
            out = fn(*a, **k)
            sync(out.device)
            self.stamps.append(clock())
            return out
        return timed


def generate_timed(kind, llava, model, ids, mask, pix, new):
    """One generate call of `kind` (hf / carpe): (prefill seconds, [decode step seconds])."""
    from transformers import StoppingCriteriaList
    stamps = TokenClock()
    sync(ids.device)
    t0 = clock()
    if kind == "hf":
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, num_beams=1,
                             stopping_criteria=StoppingCriteriaList([stamps]))
    else:
        model.generation_step = stamps.wrap(type(model).generation_step.__get__(model))
        try:
            out = model.generate(ids, mask, pix, max_new_tokens=new, eos_token_id=None)
        finally:
            del model.generation_step
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"{kind} generate returned {out.shape[1] - ids.shape[1]} new tokens, asked {new}")
    # HF stamps after each token (the first = prefill); CARPE after each generation_step (the
    # first = prefill, then one per further token): both give `new` stamps
    steps = [b - a for a, b in zip(stamps.stamps, stamps.stamps[1:])]
    return stamps.stamps[0] - t0, steps


def section_decode(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llava, _ = bench_llava(args, device)
    model = bench_carpe(llava, args)
    if device.type == "cuda":
        llava.to(dtype)
        model.to(dtype)
    new = args.new_tokens
    results = []
    for L in args.decode_lengths:
        ids, mask, pix = decode_prompt(llava, L, device)
        pix = pix.to(llava.dtype)
        prefill = {"hf": [], "carpe": []}
        steps = {"hf": [], "carpe": []}
        with torch.no_grad():
            for round_ in range(1 + args.repeats):  # one warm-up round, then interleaved rounds
                for kind in ["hf", "carpe"]:
                    p, s = generate_timed(kind, llava, model, ids, mask, pix, new)
                    if round_ > 0:
                        prefill[kind].append(p)
                        steps[kind].extend(s)
        context_tokens = int(model.prompt_mask(ids, mask).sum()) + 1
        per_token = {k: median(v) for k, v in steps.items()}
        pre = {k: median(v) for k, v in prefill.items()}
        results.append(dict(prompt_length=L, new_tokens=new, prefill_s=pre, per_token_s=per_token,
                            prefill_rounds_s=prefill, decode_steps_s=steps,
                            context_pass_tokens=context_tokens,
                            prefill_ratio=pre["carpe"] / pre["hf"], per_token_ratio=per_token["carpe"] / per_token["hf"]))
        print0(f"  decode prompt {L}: prefill HF {fmt_ms(pre['hf'])} CARPE {fmt_ms(pre['carpe'])}; "
               f"per token HF {fmt_ms(per_token['hf'])} CARPE {fmt_ms(per_token['carpe'])}")
    rows = [[r["prompt_length"], r["context_pass_tokens"], fmt_ms(r["prefill_s"]["hf"]), fmt_ms(r["prefill_s"]["carpe"]),
             f"{r['prefill_ratio']:.3f}x", fmt_ms(r["per_token_s"]["hf"]), fmt_ms(r["per_token_s"]["carpe"]),
             f"{r['per_token_ratio']:.3f}x", fmt_ms(r["per_token_s"]["carpe"] - r["per_token_s"]["hf"])] for r in results]
    print_table(f"decode: batch 1, greedy, {new} new tokens, {args.layers} layers, d={args.hidden}, medians over "
                f"{args.repeats} rounds, {args.clock} time (targets: prefill <= 1.2x, per token <= 1.15x, "
                f"per token flat in prompt length)",
                ["prompt", "context pass tokens", "HF prefill", "CARPE prefill", "ratio", "HF per token",
                 "CARPE per token", "ratio", "CARPE - HF per token"], rows)
    growth = None
    if len(results) > 1:
        growth = {k: results[-1]["per_token_s"][k] / results[0]["per_token_s"][k] for k in ["hf", "carpe"]}
        print0(f"per-token cost at prompt {results[-1]['prompt_length']} over prompt {results[0]['prompt_length']}: "
               f"HF {growth['hf']:.3f}x, CARPE {growth['carpe']:.3f}x")
    return dict(results=results, per_token_growth=growth)


# -----------------------------------------------------------------------------
# section compile: torch.compile vs eager on the CARPE training step

def section_compile(args, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llava, _ = bench_llava(args, device)
    model = bench_carpe(llava, args)
    batch = make_batch(llava, args.step_batch, args.prompt_text, args.answer, device)
    compiled = torch.compile(model, backend=args.compile_backend)
    eager_step = make_step(model, torch.optim.AdamW(model.param_groups(), weight_decay=0.0), batch, dtype, False)
    compiled_step = make_step(compiled, torch.optim.AdamW(model.param_groups(), weight_decay=0.0), batch, dtype, False)
    with torch.no_grad(), autocast_ctx(device, dtype):
        eager_first_loss = model(**batch).loss.item()  # what the first compiled step must give
    sync(device)
    t0 = time.perf_counter()  # wall time: inductor compiles in worker processes
    loss_first = compiled_step()  # compiles forward and backward
    sync(device)
    compile_s = time.perf_counter() - t0
    from torch._dynamo.utils import counters
    graph_breaks = sum(counters["graph_break"].values())  # data-dependent shapes, .item(), python loops
    times = time_interleaved(dict(eager=eager_step, compiled=compiled_step), args.repeats, device)
    t = {k: median(v) for k, v in times.items()}
    r = dict(backend=args.compile_backend, compile_s=compile_s, times=times, median_s=t, graph_breaks=graph_breaks,
             speedup=t["eager"] / t["compiled"], first_loss=loss_first.item(),
             eager_first_loss=eager_first_loss)
    print_table(f"compile: CARPE training step, backend {args.compile_backend}, median of {args.repeats}, {args.clock} time (report only)",
                ["", "time"], [["first compiled call (compile, wall time)", f"{compile_s:.1f} s"],
                               ["graph breaks", str(graph_breaks)],
                               ["eager step", fmt_ms(t["eager"])], ["compiled step", fmt_ms(t["compiled"])],
                               ["eager / compiled", f"{r['speedup']:.2f}x"]])
    return r


# -----------------------------------------------------------------------------

SECTIONS = dict(paper=section_paper, head=section_head, step=section_step, decode=section_decode,
                compile=section_compile)
DEFAULT_SECTIONS = ["paper", "head", "step", "decode"]


def get_parser():
    p = argparse.ArgumentParser(description="CARPE benchmarks: fused head vs paper form, step and decode cost over "
                                            "vanilla LLaVA, torch.compile.")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated sections out of {','.join(SECTIONS)} (compile is opt-in: it takes minutes)")
    p.add_argument("--compile", action="store_true", help="also run the compile section")
    p.add_argument("--out", default="bench_out", help="folder for <section>.json results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per path (after one warm-up); medians reported")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (subprocesses on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="accelerator peak TFLOP/s for MFU (default: bf16 dense peak of known GPUs; no MFU on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="wall: elapsed time; cpu: this process's CPU time (robust on a shared machine, "
                        "best with --threads 1). Default: cpu on CPU, wall on GPU")
    # head
    p.add_argument("--head-n", default="512,2048", help="comma-separated supervised token counts N")
    p.add_argument("--head-d", type=int, default=1024, help="hidden width d of the head section (7B: 4096)")
    p.add_argument("--vocab", type=int, default=32064, help="vocabulary V of the head section (LLaVA-1.5: 32064)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the fused linear CE")
    # model for step / decode / compile
    p.add_argument("--layers", type=int, default=32, help="LM decoder layers (LLaVA-7B: 32)")
    p.add_argument("--hidden", type=int, default=256, help="LM width d (multiple of 64; heads of 64)")
    p.add_argument("--vision-layers", type=int, default=24, help="CLIP tower layers (ViT-L: 24); width is hidden/4")
    p.add_argument("--image-size", type=int, default=336, help="image side in px; patch 14 (336 -> 576 image tokens)")
    p.add_argument("--model-vocab", type=int, default=2004,
                   help="LM vocabulary (default 32064 * 256 / 4096: the head's share of a step as at 7B; 0 = tokenizer's)")
    p.add_argument("--step-batch", type=int, default=2, help="samples per training step")
    p.add_argument("--prompt-text", type=int, default=60, help="prompt text tokens per sample (with <s>)")
    p.add_argument("--answer", type=int, default=40, help="supervised answer tokens per sample")
    p.add_argument("--decode-lengths", default="600,1200", help="comma-separated prompt lengths for decode")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measured path per process
    return p


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    args.head_n = [int(x) for x in str(args.head_n).split(",")] if not isinstance(args.head_n, list) else args.head_n
    args.decode_lengths = ([int(x) for x in str(args.decode_lengths).split(",")]
                           if not isinstance(args.decode_lengths, list) else args.decode_lengths)
    sections = [s for s in args.sections.split(",") if s] if isinstance(args.sections, str) else list(args.sections)
    if args.compile and "compile" not in sections:
        sections.append("compile")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {list(SECTIONS)}")
    args.sections = sections
    if args.hidden % 64:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of 64 (heads of 64)")
    return args


def worker_main(spec):
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fn = dict(head=head_memory_worker, step=step_memory_worker)[spec["section"]]
    print(json.dumps(fn(spec)), flush=True)


def run(args):
    """Run the selected sections; returns {section: result} and writes <out>/<section>.json."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global clock
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    clock = CLOCK[args.clock]
    os.makedirs(args.out, exist_ok=True)
    cpu = "?"
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else "?"
    machine = dict(device=str(device), cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), clock=args.clock,
                   torch=torch.__version__,
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    print0(f"machine: {machine}")
    results = {}
    for name in args.sections:
        t0 = time.perf_counter()
        r = SECTIONS[name](args, device)
        r = dict(section=name, machine=machine, seconds=time.perf_counter() - t0, result=r)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
        print0(f"[{name}: {r['seconds']:.0f} s, {os.path.join(args.out, name + '.json')}]")
        results[name] = r
    return results


if __name__ == "__main__":
    if IS_WORKER:
        worker_main(json.loads(get_parser().parse_args().worker))
    else:
        run(parse_args())
