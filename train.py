"""
train.py: train CARPE (or a baseline) on the LLaVA-Instruct + ImageNet mix (paper section 4.1).

    python train.py --preset tiny --out runs/tiny                          # CPU, a few minutes
    torchrun --nproc_per_node 2 train.py --preset tiny --out runs/tiny     # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 train.py --data llava_v1_5_mix665k.json --image-root data \\
        --imagenet imagenet --out runs/carpe --fsdp                         # the paper's run

The recipe: global batch 64 (micro batch x grad accumulation x world size), AdamW with weight
decay 0, cosine schedule with 3% linear warmup, lr 2e-5 for the adapter (projector) and 2e-4 for
the rest, the context prompt and encoder frozen for epoch 1, 2 epochs (3 with --moe).

Choices where the paper is silent (also in the README):
 - Gradient clipping at 1.0 (LLaVA's HF Trainer default), the loss of a step = mean over its
   micro-batches of each micro-batch's mean token loss (as HF Trainer / LLaVA do).
 - --max-steps stops training and sets the schedule length (HF semantics); without it the
   schedule spans --epochs. The tail of an epoch that does not fill a global batch is dropped.
 - Distributed: DDP (find_unused_parameters, since a micro-batch without images leaves the
   projector and integrator without gradient) or FSDP2 (fully_shard per LM decoder layer, then
   the rest as one unit; the vision tower is not a unit of its own, since HF's hidden-state
   recording breaks under an FSDP-wrapped CLIP tower). The context prompt and encoder are kept out of both: they are
   tiny, their requires_grad flips after epoch 1, and their gradients are averaged by hand.
 - GPU: the frozen base in bf16, trainable tensors in fp32, bf16 autocast; under FSDP a
   MixedPrecisionPolicy(bf16 params, fp32 reduce). CPU: fp32 throughout.
 - --preset tiny: draws the synthetic data (data.py), then builds a tiny base in a cached
   "pre-stage" (under --cache-dir, in a folder keyed by its settings): (1) the tiny CLIP tower
   (patch 16: 9 image tokens) is pre-trained with linear heads on shape / colour / count of
   4000 scenes drawn in memory, standing in for CLIP's pre-training, since CARPE's integrator
   reads the raw tower features; (2) vanilla LLaVA on the synthetic *conversations* with the
   tower frozen (as LLaVA does) and the projector re-initialised small, centred and frozen (a
   trained or uncentred projector collapses the image tokens into one shared vector), the LM
   trained for 150 steps. The base never sees a classification prompt, as LLaVA-1.5 never saw
   ImageNet prompts, so it cannot name the shapes; the classification share is what CARPE's
   training adds. The method then trains on a 1:1 mix for 3 epochs (the paper's 1:7 over 2
   epochs holds too few classification samples at this size) with learning rates 30x the
   paper's (6e-4 / 6e-3).
 - Checkpoints: <out>/ckpt/step_XXXXXXX/ with model.safetensors (trainable tensors, gathered
   under FSDP), optimizer.pt (optimizer + scheduler, full state), rng_rank{r}.pt (python,
   numpy, torch, cuda RNG per rank), trainer_state.json (step, epoch, data position, counters)
   and config.json; written in a temp folder and renamed. Resuming needs the same world size
   only for the RNG files; the data position is global. The final weights go to
   <out>/config.json + <out>/model.safetensors (what carpe.load_run / eval.py --ckpt read).
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import carpe
import data
import moe
import tiny
from common import (all_reduce_sum, barrier, cosine_schedule, peak_memory_gb, print0, save_safetensors_atomic,
                    setup_distributed, write_json_atomic)

PRESETS = {
    # tiny: a 1:1 mix and 3 epochs so that the few hundred synthetic samples hold enough
    # classification prompts; learning rates 30x the paper's so that 150 steps show the effect
    "tiny": dict(base=None, batch_size=16, micro_batch_size=8, lr_adapter=6e-4, lr=6e-3, integrator_heads=4,
                 num_workers=0, gradient_checkpointing=False, mix="1:1", epochs=3),
    "llava-7b": dict(base="llava-hf/llava-1.5-7b-hf", batch_size=64, micro_batch_size=8, lr_adapter=2e-5, lr=2e-4,
                     integrator_heads=32, num_workers=4, gradient_checkpointing=True, mix="1:7", epochs=None),
}
# per-method exceptions to a preset: on the tiny preset, LEVI's five fresh blocks at CARPE's 1:1 mix
# and 6e-3 forget the conversations (their loss rises over the first steps), so LEVI keeps the
# paper's 1:7 mix and the lower rates there
PRESET_METHOD_OVERRIDES = {("tiny", "levi"): dict(mix="1:7", lr_adapter=2e-4, lr=2e-3)}
# train args that must match to resume a run
RESUME_KEYS = ("batch_size", "seed", "mix", "epochs", "max_steps", "closed_k", "model_max_length", "warmup_ratio")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train CARPE (or a baseline) on LLaVA-Instruct + ImageNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llava-7b",
                   help="tiny: offline tiny LLaVA + synthetic data on CPU; llava-7b: the paper's setting")
    p.add_argument("--base", default=None, help="base LLaVA: HF id or folder (default: the preset's)")
    p.add_argument("--method", choices=["carpe", "imagenet-ft", "levi"], default="carpe",
                   help="what to train: CARPE, the ImageNet fine-tune baseline (projector, ImageNet only) or LEVI")
    p.add_argument("--data", default=None, help="LLaVA-Instruct json (llava_v1_5_mix665k.json)")
    p.add_argument("--image-root", default=None, help="folder the json's image paths are relative to")
    p.add_argument("--imagenet", default=None, help="ImageNet root holding train/<wnid>/*.JPEG")
    p.add_argument("--imagenet-classes", default=None,
                   help="class-name file: one per line in sorted dir order, or wnid<TAB>name (default <imagenet>/classnames.txt)")
    p.add_argument("--mix", default=None, help="ImageNet : LLaVA samples per epoch (default: preset's; paper 1:7)")
    p.add_argument("--closed-k", type=int, default=10, help="candidates listed in a closed-world ImageNet prompt")
    p.add_argument("--model-max-length", type=int, default=2048, help="longer samples are cut (and counted)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="drop and count bad LLaVA entries (missing image, malformed conversation) instead of failing")
    p.add_argument("--out", required=True, help="run folder: log.jsonl, ckpt/, final config.json + model.safetensors")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 2, 3 with --moe; tiny preset 3)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (also the schedule length)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: preset's; paper 64)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-device batch; grad accumulation fills the global batch")
    p.add_argument("--lr-adapter", type=float, default=None, help="lr of the projector / MoE adapters (paper 2e-5)")
    p.add_argument("--lr", type=float, default=None, help="lr of the other trainable tensors (paper 2e-4)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup as a fraction of the steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard the model per LM decoder layer")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep (0 = all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from <out>/ckpt's latest checkpoint, or from the checkpoint folder given")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order")
    p.add_argument("--moe", action="store_true", help="CARPE-MoE: route each sample to one of several vision experts")
    p.add_argument("--balance-weight", type=float, default=None, help="MoE load-balancing loss weight (default 0.01)")
    p.add_argument("--fixed-weights", type=float, nargs=2, metavar=("V", "L"), default=None,
                   help="ablation: fixed (vision, language) weights instead of the context encoder")
    p.add_argument("--no-integrator-self-attn", action="store_true", help="ablation: integrator without self-attention")
    p.add_argument("--query-layer", type=int, default=-2, help="LM layer whose output queries the integrator (-2 = paper)")
    p.add_argument("--integrator-heads", type=int, default=None, help="integrator attention heads (default: preset's)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="checkpoint the frozen LM's layers (default: on for llava-7b, off for tiny)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank (default: preset's)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"),
                   help="where --preset tiny keeps its synthetic data and pre-trained tiny base")
    return p.parse_args(argv)


def resolve_args(args):
    """Fill the preset's defaults into the flags left unset; check the combinations."""
    preset = dict(PRESETS[args.preset], **PRESET_METHOD_OVERRIDES.get((args.preset, args.method), {}))
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None:
        args.epochs = 3 if args.moe else 2
    try:
        a, b = (float(x) for x in args.mix.split(":"))
        args.mix_ratio = (a, b)
    except ValueError:
        raise SystemExit(f"--mix {args.mix!r}: expected IMAGENET:LLAVA, e.g. 1:7")
    if args.moe and args.method != "carpe":
        raise SystemExit("--moe only applies to --method carpe")
    if args.preset != "tiny":
        if args.method != "imagenet-ft" and not args.data:
            raise SystemExit(f"--preset {args.preset} needs --data (LLaVA-Instruct json) and --image-root")
        if not args.imagenet:
            raise SystemExit(f"--preset {args.preset} needs --imagenet (ImageFolder root with train/)")
    return args


# -----------------------------------------------------------------------------
# distributed helpers


# -----------------------------------------------------------------------------
# the tiny preset: synthetic data and a pre-trained tiny base


def use_tiny_world(args):
    """--preset tiny: the flags left unset point at the tiny world's base and synthetic data."""
    world_dirs = tiny.tiny_world(args.cache_dir)
    args.base = args.base or world_dirs.base
    args.data = args.data or os.path.join(world_dirs.synthetic, "conversations.json")
    args.image_root = args.image_root or world_dirs.synthetic
    args.imagenet = args.imagenet or world_dirs.synthetic
    args.imagenet_classes = args.imagenet_classes or os.path.join(world_dirs.synthetic, "classnames.txt")


# -----------------------------------------------------------------------------
# model, optimizer, schedule

def carpe_config_from_args(args):
    return carpe.CarpeConfig(integrator_heads=args.integrator_heads,
                             fixed_weights=tuple(args.fixed_weights) if args.fixed_weights else None,
                             query_layer=args.query_layer, integrator_self_attn=not args.no_integrator_self_attn,
                             gradient_checkpointing=args.gradient_checkpointing)


def create_model(args, llava, processor, device):
    """-> (model, image_transform, moe_config or None). Seeded: the same args give the same init."""
    torch.manual_seed(args.seed)
    vision_moe, moe_config = None, None
    if args.moe:
        moe_config = tiny.tiny_moe_config() if args.preset == "tiny" else moe.MoEConfig()
        if args.balance_weight is not None:
            moe_config.balance_weight = args.balance_weight
        vision_moe = moe.build_vision_moe(llava, moe_config, device=device)
    model = carpe.build_model(args.method, llava, carpe_config_from_args(args), vision_moe)
    model.to(device)
    for name, p in model.named_parameters():  # trainable tensors in fp32 (the frozen base may be bf16)
        if model.is_trainable_name(name) and p.dtype != torch.float32:
            p.data = p.data.float()
    image_transform = vision_moe.preprocess if vision_moe is not None else carpe.make_image_transform(processor)
    return model, image_transform, moe_config


def is_context_name(name):
    return name == "context_prompt" or name.startswith("context_encoder.")


def optimizer_groups(args, model):
    """The model's two lr groups. Under FSDP2 the context prompt and encoder stay plain tensors
    (outside the sharded units) while the rest become DTensors, and AdamW's multi-tensor path
    (the CUDA default) refuses a group that mixes the two: there they get a group of their own,
    at the same lr."""
    groups = model.param_groups(args.lr_adapter, args.lr)
    if not args.fsdp:
        return groups
    context = {id(p) for name, p in model.named_parameters() if is_context_name(name)}
    split = []
    for g in groups:
        split.append(dict(g, params=[p for p in g["params"] if id(p) not in context]))
        own = [p for p in g["params"] if id(p) in context]
        if own:
            split.append(dict(g, params=own, name="context"))
    return split


def wrap_model(args, model, device, world):
    """DDP / FSDP2 / compile. -> the module to call forward on. `model` stays the raw module
    (its parameters are what the optimizer and the checkpoints see)."""
    context_params = {p for name, p in model.named_parameters() if is_context_name(name)}
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
            else MixedPrecisionPolicy()
        for layer in model.llava.model.language_model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        ignored = set(context_params)
        if getattr(model, "vision_moe", None) is not None:
            # the frozen expert towers stay whole on every rank: a rank runs only the experts its
            # samples chose, and gathering ~1.6B frozen parameters every step would buy nothing
            ignored |= set(model.vision_moe.encoders.parameters())
        fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
        forward_model = model
    else:
        forward_model = model
    if args.compile:
        forward_model = torch.compile(forward_model)
    if world > 1 and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ignore = [name for name, p in forward_model.named_parameters() if p in context_params]
        DDP._set_params_and_buffers_to_ignore_for_model(forward_model, ignore)
        forward_model = DDP(forward_model, device_ids=[device.index] if device.type == "cuda" else None,
                            find_unused_parameters=True)
    return forward_model, [p for name, p in model.named_parameters() if is_context_name(name)]


def full_tensor(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params, max_norm):
    """Global grad norm over plain and FSDP (DTensor) gradients; clip in place. -> norm."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if not isinstance(grads[0], DTensor)
                        else grads[0].to_local().device)
    for g in grads:
        sq = g.float().pow(2).sum()
        total += full_tensor(sq)
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype) if not isinstance(g, DTensor) else coef.item())
    return norm.item()


# -----------------------------------------------------------------------------
# checkpoints

def rng_state(device):
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=dict(keys=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                            has_gauss=int(np_state[3]), cached_gaussian=float(np_state[4])))
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_trainable(model):
    """Full trainable tensors on CPU (gathered from the FSDP shards; every rank must call this)."""
    return {name: full_tensor(t).detach().cpu().contiguous() for name, t in model.trainable_state_dict().items()}


def optimizer_state(args, model, optimizer):
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, StateDictOptions
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(args, model, optimizer, state):
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        optimizer.load_state_dict(state)


def save_checkpoint(args, model, optimizer, scheduler, run_config, trainer_state, rank, device):
    """<out>/ckpt/step_XXXXXXX, written in a temp folder then renamed. Collective."""
    weights = gather_trainable(model)
    opt_state = optimizer_state(args, model, optimizer)
    final = os.path.join(args.out, "ckpt", f"step_{trainer_state['step']:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_safetensors_atomic(weights, os.path.join(tmp, "model.safetensors"))
        torch.save(dict(optimizer=opt_state, scheduler=scheduler.state_dict()), os.path.join(tmp, "optimizer.pt"))
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), trainer_state)
        write_json_atomic(os.path.join(tmp, "config.json"), run_config)
    barrier()
    torch.save(rng_state(device), os.path.join(tmp, f"rng_rank{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if args.keep_checkpoints > 0:
            for old in list_checkpoints(args.out)[:-args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(out):
    folder = os.path.join(out, "ckpt")
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if d.startswith("step_") and not d.endswith(".tmp")]


def check_resume_config(ckpt, saved, current):
    """Refuse a checkpoint of another base, method or config, naming what differs."""
    diffs = []
    for key in ("method", "base", "carpe", "moe"):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}")
    for key in RESUME_KEYS:
        if saved["train"].get(key) != current["train"].get(key):
            diffs.append(f"--{key.replace('_', '-')}: checkpoint {saved['train'].get(key)!r} vs now {current['train'].get(key)!r}")
    if diffs:
        raise ValueError(f"checkpoint {ckpt} was made for another run and cannot be resumed here:\n  " + "\n  ".join(diffs))


def load_checkpoint(args, ckpt, model, run_config, rank, device):
    """Loads the weights and RNG; returns (trainer_state, optimizer+scheduler state)."""
    from safetensors.torch import load_file
    for f in ("config.json", "trainer_state.json", "model.safetensors", "optimizer.pt"):
        if not os.path.isfile(os.path.join(ckpt, f)):
            raise FileNotFoundError(f"--resume {ckpt}: not a complete checkpoint ({f} missing)")
    with open(os.path.join(ckpt, "config.json")) as f:
        check_resume_config(ckpt, json.load(f), run_config)
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        trainer_state = json.load(f)
    model.load_trainable_state_dict(load_file(os.path.join(ckpt, "model.safetensors"), device=str(device)))
    opt = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True)
    rng_file = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True), device)
    else:
        print0(f"warning: {rng_file} missing (different world size?); RNG not restored")
    return trainer_state, opt


# -----------------------------------------------------------------------------
# training

def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = resolve_args(parse_args(argv))
    rank, world, local_rank, device = setup_distributed()
    if args.preset == "tiny":
        if rank == 0:  # draw the synthetic data and pre-train the tiny base on first use
            tiny.ensure_tiny_world(args.cache_dir)
        barrier()
        use_tiny_world(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    accum, rest = divmod(args.batch_size, args.micro_batch_size * world)
    if rest or accum == 0:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size} "
                         f"x world size {world}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llava, processor = carpe.load_base(args.base, device=device, dtype=dtype)
    model, image_transform, moe_config = create_model(args, llava, processor, device)
    run_config = dict(method=args.method, base=args.base,
                      carpe=model.config.to_dict() if hasattr(model.config, "to_dict") else None,
                      moe=moe_config.to_dict() if moe_config is not None else None,
                      train={k: v for k, v in vars(args).items() if k not in ("out", "resume", "mix_ratio")})

    # data
    data_config = data.DataConfig(llava_json=args.data if args.method != "imagenet-ft" else None,
                                  image_root=args.image_root, imagenet=args.imagenet,
                                  imagenet_classes=args.imagenet_classes, mix=args.mix_ratio, closed_k=args.closed_k,
                                  model_max_length=args.model_max_length, skip_bad_samples=args.skip_bad_samples,
                                  seed=args.seed)
    dataset, n_skipped = data.TrainDataset.from_config(data_config, processor)
    if n_skipped:
        print0(f"warning: skipped {n_skipped} bad LLaVA entries (--skip-bad-samples)")
    collator = data.Collator(processor.tokenizer.pad_token_id, image_transform)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"an epoch has {len(dataset)} samples, fewer than --batch-size {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    # resume: weights before wrapping, optimizer after
    trainer_state = dict(step=0, epoch=0, position=0, truncated=0, skipped=n_skipped, tokens=0)
    resume_opt = None
    if args.resume:
        ckpts = list_checkpoints(args.out) if args.resume == "latest" else [args.resume]
        if not ckpts:
            raise SystemExit(f"--resume: no checkpoint in {os.path.join(args.out, 'ckpt')}")
        trainer_state, resume_opt = load_checkpoint(args, ckpts[-1], model, run_config, rank, device)
        if trainer_state["epoch_length"] != len(dataset):
            raise SystemExit(f"--resume {ckpts[-1]}: the checkpoint's epoch has {trainer_state['epoch_length']} samples, "
                             f"the data now gives {len(dataset)} (other --data / --imagenet?)")
        print0(f"resuming from {ckpts[-1]} at step {trainer_state['step']}")
    trainer_state["epoch_length"] = len(dataset)

    forward_model, context_params = wrap_model(args, model, device, world)
    optimizer = torch.optim.AdamW(optimizer_groups(args, model), weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, math.ceil(args.warmup_ratio * total_steps)))
    if resume_opt is not None:
        load_optimizer_state(args, model, optimizer, resume_opt["optimizer"])
        scheduler.load_state_dict(resume_opt["scheduler"])
    trainable = [p for name, p in model.named_parameters() if model.is_trainable_name(name)]

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    print0(f"{args.method} on {args.base}: {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable params; "
           f"{len(dataset)} samples/epoch ({dataset.plan.imagenet_per_epoch} ImageNet), {steps_per_epoch} steps/epoch, "
           f"{total_steps} steps, world {world} x micro {args.micro_batch_size} x accum {accum}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=trainer_state["step"], disable=rank != 0, desc="train")
    step = trainer_state["step"]
    last_ckpt, loss = None, None
    model.train()
    for epoch in range(step // steps_per_epoch, n_epochs):
        model.set_context_trainable(epoch > 0)  # the context prompt and encoder are frozen for epoch 1
        start_position = (step - epoch * steps_per_epoch) * args.batch_size
        loader = data.make_loader(dataset, collator, args.micro_batch_size, args.batch_size, rank, world, epoch,
                                  start_position, args.num_workers)
        batches = iter(loader)
        while step < min(total_steps, (epoch + 1) * steps_per_epoch):
            t0 = time.time()
            sums = torch.zeros(6, dtype=torch.float64)  # loss, vision weight, samples, tokens, truncated, balance
            route_hist = None
            for micro in range(accum):
                batch = next(batches)
                sync = micro == accum - 1 or not hasattr(forward_model, "no_sync")
                with (nullcontext() if sync else forward_model.no_sync()), autocast:
                    pixel_values = batch["pixel_values"]
                    if pixel_values is not None:
                        pixel_values = {k: v.to(device) for k, v in pixel_values.items()} if isinstance(pixel_values, dict) \
                            else pixel_values.to(device, dtype=dtype)
                    out = forward_model(input_ids=batch["input_ids"].to(device),
                                        attention_mask=batch["attention_mask"].to(device),
                                        pixel_values=pixel_values, labels=batch["labels"].to(device))
                    (out.loss / accum).backward()
                sums[0] += out.loss.item()
                sums[1] += out.context_weights[:, 0].float().sum().item()
                sums[2] += len(batch["ids"])
                sums[3] += int(batch["attention_mask"].sum())
                sums[4] += batch["n_truncated"]
                if out.balance_loss is not None:
                    sums[5] += out.balance_loss.item()
                if out.route is not None:
                    n_experts = len(model.vision_moe.experts) if hasattr(model.vision_moe, "experts") else int(out.route.max()) + 1
                    hist = torch.bincount(out.route[out.route >= 0].cpu(), minlength=n_experts)
                    route_hist = hist if route_hist is None else route_hist + hist
            # the context parameters sit outside DDP/FSDP: average their gradients by hand
            if world > 1:
                for p in context_params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
            all_reduce_sum(sums)
            if route_hist is not None:
                all_reduce_sum(route_hist)
            loss = sums[0].item() / (accum * world)
            if not math.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss} at step {step + 1} (epoch {epoch + 1}); stopping. "
                                   f"The last good checkpoint is {last_ckpt or (list_checkpoints(args.out) or ['none'])[-1]} "
                                   f"(resume it with --resume, maybe with a lower --lr)")
            grad_norm = clip_grad_norm(trainable, args.grad_clip)
            lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trainer_state.update(step=step, epoch=step // steps_per_epoch,
                                 position=(step % steps_per_epoch) * args.batch_size,
                                 truncated=trainer_state["truncated"] + int(sums[4]),
                                 tokens=trainer_state["tokens"] + int(sums[3]))
            dt = time.time() - t0
            record = dict(step=step, epoch=epoch + 1, loss=loss, **lrs, grad_norm=grad_norm,
                          vision_weight=sums[1].item() / sums[2].item(), tokens_per_s=sums[3].item() / dt,
                          peak_mem_gb=peak_memory_gb(device), truncated=trainer_state["truncated"],
                          skipped=trainer_state["skipped"], context_trainable=epoch > 0)
            if args.moe:
                record["balance_loss"] = sums[5].item() / (accum * world)
                record["route_hist"] = route_hist.tolist() if route_hist is not None else []
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if sums[4] and trainer_state["truncated"] == int(sums[4]):
                    print0(f"warning: samples longer than --model-max-length {args.model_max_length} are being cut "
                           f"(counted as 'truncated' in {log_path})")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", alpha=f"{record['vision_weight']:.3f}")
            if (args.save_every and step % args.save_every == 0) or step == total_steps:
                last_ckpt = save_checkpoint(args, model, optimizer, scheduler, run_config, dict(trainer_state), rank, device)
    bar.close()

    # the final weights, in the run-folder format carpe.load_run / eval.py --ckpt read
    weights = gather_trainable(model)
    if rank == 0:
        save_safetensors_atomic(weights, os.path.join(args.out, "model.safetensors"))
        write_json_atomic(os.path.join(args.out, "config.json"), run_config)
    # a cheap cross-rank check that training kept the replicas identical
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].float().numpy().tobytes())
    checksum = float(int(digest.hexdigest()[:12], 16))  # 48 bits: exact in float64
    checksums = torch.zeros(world, dtype=torch.float64)
    checksums[rank] = checksum
    all_reduce_sum(checksums)
    if rank == 0:
        write_json_atomic(os.path.join(args.out, "summary.json"),
                          dict(steps=step, world=world, final_loss=loss,
                               rank_checksums=checksums.tolist(), truncated=trainer_state["truncated"],
                               skipped=trainer_state["skipped"]))
        print0(f"done: {step} steps; final weights in {args.out}/model.safetensors")
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
