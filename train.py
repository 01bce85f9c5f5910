"""
train.py: train CARPE (or a baseline) on the LLaVA-Instruct + ImageNet mix (paper section 4.1).

    python train.py --preset tiny --out runs/tiny                          # CPU, a few minutes
    torchrun --nproc_per_node 2 train.py --preset tiny --out runs/tiny     # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 train.py --data llava_v1_5_mix665k.json --image-root data \\
        --imagenet imagenet --out runs/carpe --fsdp                         # the paper's run
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id carpe train.py ... --fsdp                                 # 2 nodes: HSDP, batch still 64

The recipe: global batch 64 at any world size dividing it (batch_layout), AdamW with weight decay 0,
cosine schedule with 3% linear warmup, lr 2e-5 for the adapter (projector) and 2e-4 for the rest,
the context prompt and encoder frozen for epoch 1, 2 epochs (3 with --moe).

Choices where the paper is silent:
 - Gradient clipping at 1.0 (LLaVA's HF Trainer default); the loss of a step = mean over its
   micro-batches of each micro-batch's mean token loss (as HF Trainer / LLaVA do).
 - --max-steps stops training and sets the schedule length (HF semantics); without it the
   schedule spans --epochs. The tail of an epoch that does not fill a global batch is dropped.
 - Distributed: DDP (find_unused_parameters: a micro-batch without images leaves the projector and
   integrator without gradient) or FSDP2 (wrap_model; HSDP on several nodes). The context prompt
   and encoder stay out of both (their requires_grad flips after epoch 1): gradients averaged by hand.
 - GPU: the frozen base in bf16, trainable tensors in fp32, bf16 autocast; under FSDP a
   MixedPrecisionPolicy(bf16 params, fp32 reduce). CPU: fp32 throughout.
 - Finite or nothing: a non-finite (or, with --max-loss-ratio, spiking) step is skipped and counted;
   --max-skipped-steps in a row stop the run (stop_run). Weights are checked finite before a save.
 - Preemption (StopRequest): SIGTERM / SIGINT ends the run after the step in progress, with a
   checkpoint, exit code 75. Under torchrun set --shutdown-timeout (default 30 s) above a step plus
   a checkpoint save, or torchrun's SIGKILL comes first (torchrun itself then exits 1).
 - The run folder is locked; a used one needs --resume or --overwrite. --resume falls back past a
   damaged checkpoint, applies APPLIED_ON_RESUME and refuses a change of FIXED_ON_RESUME.
 - The final weights go to <out>/run_config.json + <out>/model.safetensors (pretrained.load and
   common.load_run read them), with the base as given (a Hub id or a folder) or "preset:tiny" /
   "preset:small", so a moved run folder still finds it.
"""
import argparse
import gc
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import baselines
import carpe
import common
import data
import kernels
import moe
import small
import tiny
from common import (StopRequest, all_reduce_sum, barrier, clip_grad_norm, cosine_schedule, fsdp_mesh, gather_trainable,
                    peak_memory_gb, print0, setup_distributed, weights_checksum)

PRESETS = {
    # tiny: a 1:1 mix and 3 epochs so that the few hundred synthetic samples hold enough
    # classification prompts; learning rates 30x the paper's so that 150 steps show the effect
    "tiny": dict(base=None, batch_size=16, micro_batch_size=8, lr_adapter=6e-4, lr=6e-3, integrator_heads=4,
                 num_workers=0, gradient_checkpointing=False, mix="1:1", epochs=3, template="vicuna_v1"),
    "llava-7b": dict(base="llava-hf/llava-1.5-7b-hf", batch_size=64, micro_batch_size=8, lr_adapter=2e-5, lr=2e-4,
                     integrator_heads=32, num_workers=4, gradient_checkpointing=True, mix="1:7", epochs=None,
                     template="vicuna_v1"),
    # small: SmolLM2-135M-Instruct + Fashion-MNIST on CPU (small.py), its own chat template
    "small": dict(small.TRAIN_PRESET),
}
# per-method exceptions to a preset: on tiny, LEVI's five fresh blocks at CARPE's 1:1 mix and 6e-3 forget
# the conversations (their loss rises over the first steps), so LEVI keeps the paper's 1:7 and lower rates
PRESET_METHOD_OVERRIDES = {("tiny", "levi"): dict(mix="1:7", lr_adapter=2e-4, lr=2e-3)}
DEFAULT_MODEL_MAX_LENGTH = 2048  # LLaVA-1.5's

# What a resume does with each flag. FIXED (data order, schedule, optimizer layout): a change is refused.
# APPLIED: the new value is used (and recorded). The model flags are checked through the model's config.
FIXED_ON_RESUME = ("preset", "batch_size", "seed", "mix", "epochs", "max_steps", "closed_k", "model_max_length",
                   "warmup_ratio", "skip_bad_samples", "template", "fsdp")
APPLIED_ON_RESUME = ("data", "image_root", "imagenet", "imagenet_classes", "micro_batch_size", "lr_adapter", "lr",
                     "grad_clip", "compile", "save_every", "keep_checkpoints", "num_workers", "cache_dir",
                     "gradient_checkpointing", "max_loss_ratio", "max_skipped_steps", "dist_timeout",
                     "compile_backend", "tensorboard", "wandb")
MODEL_FLAGS = ("base", "method", "moe", "experts", "balance_weight", "fixed_weights", "no_integrator_self_attn", "query_layer",
               "integrator_heads")
RUN_FLAGS = ("out", "resume", "overwrite")  # where the run goes, not what it computes

# The exit code of a run stopped by SIGTERM / SIGINT after a checkpoint: sysexits.h's EX_TEMPFAIL, so a job
# script tells "run again with --resume" from a crash (1) or a process the signal killed (143: nothing saved).
PREEMPTED_EXIT_CODE = 75


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train CARPE (or a baseline) on LLaVA-Instruct + ImageNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llava-7b",
                   help="tiny: offline tiny LLaVA + synthetic data on CPU; small: SmolLM2-135M + Fashion-MNIST on CPU (small.py; needs requirements-small.txt); llava-7b: the paper's setting")
    p.add_argument("--base", default=None, help="base LLaVA: HF id or folder (default: the preset's)")
    p.add_argument("--method", choices=["carpe", "imagenet-ft", "levi"], default="carpe",
                   help="what to train: CARPE, the ImageNet fine-tune baseline (projector, ImageNet only) or LEVI")
    p.add_argument("--data", default=None, help="LLaVA-Instruct json (llava_v1_5_mix665k.json)")
    p.add_argument("--image-root", default=None, help="folder the json's image paths are relative to")
    p.add_argument("--imagenet", default=None, help="ImageNet root holding train/<wnid>/*.JPEG")
    p.add_argument("--imagenet-classes", default=None,
                   help="class-name file: one per line in sorted dir order, or wnid<TAB>name (default <imagenet>/classnames.txt)")
    p.add_argument("--mix", default=None, help="ImageNet : LLaVA samples per epoch (default: preset's; paper 1:7)")
    p.add_argument("--template", choices=data.TEMPLATES, default=None,
                   help="conversation template: vicuna_v1 (LLaVA-1.5 bases) or chat (the tokenizer's own chat "
                        "template); default: the preset's (chat for small, else vicuna_v1)")
    p.add_argument("--closed-k", type=int, default=10, help="candidates listed in a closed-world ImageNet prompt")
    p.add_argument("--model-max-length", type=int, default=None,
                   help=f"longer samples are cut (and counted); default {DEFAULT_MODEL_MAX_LENGTH}, or the base's "
                        f"max_position_embeddings when smaller; a value above it is refused")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="drop and count bad LLaVA entries (missing image, malformed conversation) instead of failing")
    p.add_argument("--out", required=True, help="run folder: log.jsonl, ckpt/, final run_config.json + model.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a used --out: delete the earlier run's log, checkpoints and weights "
                        "(without it a used --out needs --resume)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 2, 3 with --moe; tiny preset 3)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (also the schedule length)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: preset's; paper 64), the same at any world size that divides it")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-device batch (at most batch / world); grad accumulation fills the global batch")
    p.add_argument("--lr-adapter", type=float, default=None, help="lr of the projector / MoE adapters (paper 2e-5)")
    p.add_argument("--lr", type=float, default=None, help="lr of the other trainable tensors (paper 2e-4)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup as a fraction of the steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    p.add_argument("--max-skipped-steps", type=int, default=3,
                   help="a step with a non-finite loss or gradient norm (or a --max-loss-ratio spike) is skipped: "
                        "no update, counted in log.jsonl; this many skipped in a row stop the run, naming the last "
                        "good checkpoint (1 = stop at the first)")
    p.add_argument("--max-loss-ratio", type=float, default=0.0,
                   help="skip a step whose loss exceeds this multiple of the mean of the last 20 updated steps' "
                        "losses (0 = off; e.g. 10)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard the model per LM decoder layer")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each repeated block (LM and vision layers, integrator) in place; the glue stays eager")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager"], default="inductor",
                   help="with --compile: inductor (generated kernels), or aot_eager (the same tracing, forward and "
                        "backward graphs, run with eager kernels: a quick check that a run compiles, as the tests do)")
    p.add_argument("--dist-timeout", type=float, default=60.0,
                   help="minutes any collective may wait before the run fails (NCCL's own default kills it after 10): "
                        "the first launch's local-rank-0-only work, checking a cold LLaVA json of ~624K images, "
                        "takes 5-10 minutes while the other ranks wait at a barrier; a dead rank still fails the "
                        "run within this time")
    p.add_argument("--tensorboard", action="store_true",
                   help="mirror each log.jsonl record to TensorBoard (<out>/tensorboard/); log.jsonl stays the record "
                        "(needs pip install -r requirements-logging.txt)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="mirror each log.jsonl record to this Weights & Biases project (a resume continues the same "
                        "W&B run); log.jsonl stays the record. Needs pip install -r requirements-logging.txt; "
                        "WANDB_MODE=offline works without a network (wandb sync uploads later)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="how many recent checkpoints to keep (0 = all); the one resumed from is always kept")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from <out>/ckpt's newest intact checkpoint (falling back past damaged ones), or from "
                        "the checkpoint folder given; checkpoints and log lines after the resumed step are moved to "
                        "<out>/superseded/ (nothing is deleted). Changed learning rates, clipping, --save-every, "
                        "--keep-checkpoints, workers, skip guards apply; a changed model, batch, seed, mix, schedule "
                        "length, --closed-k, --model-max-length, --template or --fsdp is refused")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the data order")
    p.add_argument("--moe", action="store_true", help="CARPE-MoE: route each sample to one of several vision experts")
    p.add_argument("--experts", default=None,
                   help="with --moe: the experts, as a JSON file or a comma list NAME[:FAMILY]=SOURCE[@LAYER] (SOURCE a "
                        "local folder or a Hub id), e.g. clip,siglip=/models/siglip,dinov2=facebook/dinov2-large@-2 "
                        "(default: the paper's four; tiny preset: four tiny random experts)")
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
                   help="where --preset tiny keeps its synthetic data and pre-trained tiny base, and where the checked "
                        "LLaVA json is packed (once per node, reused by every rank and resume)")
    return p.parse_args(argv)


def check_ranges(args):
    """Counts and sizes must be positive, rates and ratios in range; the message names the flag."""
    positive = ("batch_size", "micro_batch_size", "epochs", "max_steps", "closed_k", "model_max_length",
                "integrator_heads", "max_skipped_steps", "lr", "lr_adapter", "dist_timeout")
    non_negative = ("save_every", "keep_checkpoints", "num_workers", "grad_clip", "max_loss_ratio")
    for key in positive + non_negative:
        value = getattr(args, key)
        if value is not None and not (value > 0 if key in positive else value >= 0):  # also refuses NaN
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"{flag} must be {'positive' if key in positive else '>= 0'} (got {value})")
    if not 0 <= args.warmup_ratio < 1:
        raise SystemExit(f"--warmup-ratio must be in [0, 1) (got {args.warmup_ratio})")
    if 0 < args.max_loss_ratio <= 1:
        raise SystemExit(f"--max-loss-ratio must be 0 (off) or above 1 (got {args.max_loss_ratio})")


def resolve_args(args):
    """Fill the preset's defaults into the flags left unset; check the values and combinations."""
    preset = dict(PRESETS[args.preset], **PRESET_METHOD_OVERRIDES.get((args.preset, args.method), {}))
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None:
        args.epochs = 3 if args.moe else 2
    check_ranges(args)
    try:
        args.mix_ratio = tuple(float(x) for x in args.mix.split(":"))
        if len(args.mix_ratio) != 2 or min(args.mix_ratio) < 0 or max(args.mix_ratio) == 0:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--mix {args.mix!r}: expected IMAGENET:LLAVA with non-negative numbers, e.g. 1:7") from None
    if args.moe and args.method != "carpe":
        raise SystemExit("--moe only applies to --method carpe")
    if args.experts and not args.moe:
        raise SystemExit("--experts only applies with --moe")
    if args.preset not in ("tiny", "small"):
        if args.method != "imagenet-ft" and not args.data:
            raise SystemExit(f"--preset {args.preset} needs --data (LLaVA-Instruct json) and --image-root")
        if not args.imagenet:
            raise SystemExit(f"--preset {args.preset} needs --imagenet (ImageFolder root with train/)")
    return args


def use_small_world(args):
    """--preset small: the flags left unset point at small.py's cached world (its class names only
    with its own classification folder: a user's --imagenet brings <imagenet>/classnames.txt)."""
    world = small.ensure_small_world(args.cache_dir)
    if args.imagenet is None and args.imagenet_classes is None:
        args.imagenet_classes = world.imagenet_classes
    for key in ("base", "data", "image_root", "imagenet"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(world, key))
    if args.method == "imagenet-ft" and args.max_steps is None:  # as many steps as CARPE makes
        args.max_steps = small.carpe_steps(world)


def use_tiny_world(args):
    """--preset tiny: the flags left unset point at the tiny world's base and synthetic data."""
    world_dirs = tiny.tiny_world(args.cache_dir)
    args.base = args.base or world_dirs.base
    args.data = args.data or os.path.join(world_dirs.synthetic, "conversations.json")
    args.image_root = args.image_root or world_dirs.synthetic
    if args.imagenet is None:  # the synthetic classification folder with its names; a user's folder brings its own
        args.imagenet = world_dirs.synthetic
        args.imagenet_classes = args.imagenet_classes or os.path.join(world_dirs.synthetic, "classnames.txt")


def batch_layout(batch_size, micro_batch_size, world):
    """Each rank takes batch / world samples per step in micro-batches of min(--micro-batch-size,
    batch / world) (64 over 16 ranks: 4, not 8). -> (micro-batch size, micro-batches per rank per step)."""
    per_rank, rest = divmod(batch_size, world)
    if rest or per_rank == 0:
        raise SystemExit(f"--batch-size {batch_size} cannot be split evenly over {world} ranks: "
                         f"give a global batch that is a multiple of the world size {world}")
    micro = min(micro_batch_size, per_rank)
    accum, rest = divmod(per_rank, micro)
    if rest:
        raise SystemExit(f"--batch-size {batch_size} over {world} ranks gives {per_rank} samples per rank, not a "
                         f"multiple of --micro-batch-size {micro_batch_size}")
    return micro, accum


def fit_model_max_length(args, llava):
    """Samples cannot be longer than the base has positions (the tiny base has 1024)."""
    positions = getattr(llava.config.text_config, "max_position_embeddings", None) or DEFAULT_MODEL_MAX_LENGTH
    if args.model_max_length is None:
        args.model_max_length = min(DEFAULT_MODEL_MAX_LENGTH, positions)
        if positions < DEFAULT_MODEL_MAX_LENGTH:
            print0(f"--model-max-length {positions}: the base has {positions} positions")
    elif args.model_max_length > positions:
        raise SystemExit(f"--model-max-length {args.model_max_length} exceeds the base's max_position_embeddings "
                         f"{positions} ({args.base})")


# -----------------------------------------------------------------------------
# model, optimizer, distributed wrapping

def moe_config_from_args(args):
    """--experts (default: the paper's four; on the tiny preset four tiny random experts) and
    --balance-weight -> MoEConfig, recorded in the run config so that eval.py rebuilds the same."""
    try:
        experts = moe.parse_experts(args.experts) if args.experts else None
    except (ValueError, OSError) as e:
        raise SystemExit(f"--experts: {e}") from None
    config = moe.MoEConfig(experts=experts) if experts else tiny.tiny_moe_config() if args.preset == "tiny" \
        else moe.MoEConfig()
    if args.balance_weight is not None:
        config.balance_weight = args.balance_weight
    return config


def create_model(args, llava, processor, device):
    """-> (model, image_transform, moe_config or None). Seeded: the same args give the same init."""
    torch.manual_seed(args.seed)
    vision_moe, moe_config = None, None
    if args.moe:
        moe_config = moe_config_from_args(args)
        vision_moe = moe.build_vision_moe(llava, moe_config, device=device, image_processor=processor.image_processor)
    carpe_config = carpe.CarpeConfig(integrator_heads=args.integrator_heads,
                                     fixed_weights=tuple(args.fixed_weights) if args.fixed_weights else None,
                                     query_layer=args.query_layer, integrator_self_attn=not args.no_integrator_self_attn,
                                     gradient_checkpointing=args.gradient_checkpointing)
    model = baselines.build_model(args.method, llava, carpe_config, vision_moe)
    model.to(device)
    for name, p in model.named_parameters():  # trainable tensors in fp32 (the frozen base may be bf16)
        if model.is_trainable_name(name) and p.dtype != torch.float32:
            p.data = p.data.float()
    image_transform = vision_moe.preprocess if vision_moe is not None else carpe.make_image_transform(processor)
    return model, image_transform, moe_config


def optimizer_groups(args, model):
    """The model's two lr groups. Under FSDP2 the context tensors (plain, not DTensors) get a group of
    their own at the same lr: AdamW's multi-tensor path (the CUDA default) refuses a mixed group."""
    groups = model.param_groups(args.lr_adapter, args.lr)
    if not args.fsdp:
        return groups
    context = {id(p) for name, p in model.named_parameters() if carpe.is_context_name(name)}
    split = []
    for g in groups:
        split.append(dict(g, params=[p for p in g["params"] if id(p) not in context]))
        own = [p for p in g["params"] if id(p) in context]
        if own:
            split.append(dict(g, params=own, name="context"))
    return split


def make_optimizer(args, model, total_steps):
    """AdamW (weight decay 0) and the warmup + cosine schedule over total_steps."""
    optimizer = torch.optim.AdamW(optimizer_groups(args, model), weight_decay=0.0, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, math.ceil(args.warmup_ratio * total_steps)))
    return optimizer, scheduler


def wrap_model(args, model, device, world):
    """FSDP2 (one unit per LM decoder layer, then the rest; not the vision tower, whose HF hidden-state
    recording breaks under FSDP) / compile / DDP. -> (the module to call forward on, the context tensors).
    `model` stays the raw module: its parameters are what the optimizer and the checkpoints see."""
    context_params = [p for name, p in model.named_parameters() if carpe.is_context_name(name)]
    forward_model = model
    if args.fsdp:
        mesh = fsdp_mesh(device, world)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
            else MixedPrecisionPolicy()
        for layer in model.llava.model.language_model.layers:  # one unit per decoder layer: gathered one at a time
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        ignored = set(context_params)
        if getattr(model, "vision_moe", None) is not None:
            # the frozen expert towers stay whole on every rank: a rank runs only the experts its
            # samples chose, and gathering ~1.6B frozen parameters every step would buy nothing
            ignored |= set(model.vision_moe.encoders.parameters())
        fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
        # ranks may use different parameters in one step (a text-only micro-batch leaves LEVI's cross-attention
        # without a gradient; an MoE expert nobody on a rank chose, too): reduce-scatter zeros for the unused ones,
        # as DDP's find_unused_parameters does, so every rank joins the same collectives
        model.set_reduce_scatter_unused_params(True)
    if args.compile:  # per repeated block, in place (after fully_shard, as FSDP2 expects)
        kernels.compile_blocks(carpe.repeated_blocks(model), backend=args.compile_backend)
    if world > 1 and not args.fsdp:  # compile_blocks works in place, so the names are the model's
        ignore = [name for name, _ in model.named_parameters() if carpe.is_context_name(name)]
        DDP._set_params_and_buffers_to_ignore_for_model(forward_model, ignore)
        forward_model = DDP(forward_model, device_ids=[device.index] if device.type == "cuda" else None,
                            find_unused_parameters=True)
    return forward_model, context_params


# -----------------------------------------------------------------------------
# the state a checkpoint carries, and one step's numbers

@dataclass
class TrainerState:
    """What a checkpoint records beside the tensors (trainer_state.json)."""
    step: int = 0  # optimizer steps done, skipped ones included (their data is consumed)
    epoch_length: int = 0  # samples per epoch: a resume must see the same data
    tokens: int = 0  # non-pad tokens trained on
    truncated: int = 0  # samples cut at --model-max-length
    skipped_samples: int = 0  # bad LLaVA entries dropped by --skip-bad-samples
    skipped_steps: int = 0  # steps whose update was skipped (non-finite or spiking loss / gradient)
    consecutive_skips: int = 0
    last_update: int = 0  # the latest step whose update reached the weights
    recent_losses: list = field(default_factory=list)  # the losses of the last updated steps (spike guard)
    context_trainable: bool = False  # the epoch-1 freeze at the last step (set before loading the optimizer)


@dataclass
class StepStats:
    """Sums over the micro-batches of one optimizer step (then over ranks: reduce_stats)."""
    loss: float = 0.0  # of each micro-batch's mean token loss
    micro_batches: float = 0.0
    vision_weight: float = 0.0  # of each sample's vision weight alpha_v
    samples: float = 0.0
    tokens: float = 0.0  # non-pad tokens
    truncated: float = 0.0  # samples cut at --model-max-length
    balance_loss: float = 0.0  # CARPE-MoE's load-balancing loss
    replaced: float = 0.0  # bad samples the loader replaced (--skip-bad-samples)
    stop: float = 0.0  # ranks that had received SIGTERM / SIGINT when the step's numbers were summed
    replaced_ids: list = field(default_factory=list)  # their (id, reason)
    route_hist: list | None = None  # CARPE-MoE: images routed to each expert

    def add(self, out, batch):
        self.loss += out.loss.item()
        self.micro_batches += 1
        self.vision_weight += out.context_weights[:, 0].float().sum().item()
        self.samples += len(batch["ids"])
        self.tokens += int(batch["attention_mask"].sum())
        self.truncated += batch["n_truncated"]
        self.replaced += len(batch.skipped)
        self.replaced_ids += [list(item) for item in batch.skipped]
        if out.balance_loss is not None:
            self.balance_loss += out.balance_loss.item()
        if out.route is not None:
            hist = torch.bincount(out.route[out.route >= 0].cpu(), minlength=len(self.route_hist))
            self.route_hist = [a + int(b) for a, b in zip(self.route_hist, hist)]


SCALAR_STATS = [f.name for f in fields(StepStats) if f.type is float]


def reduce_stats(stats):
    """Sum every number over ranks with one all-reduce of a packed float64 tensor; the ids of
    replaced samples (rare) are gathered only when there are some."""
    hist = stats.route_hist or []
    packed = all_reduce_sum(torch.tensor([getattr(stats, k) for k in SCALAR_STATS] + hist, dtype=torch.float64))
    values = packed.tolist()
    total = StepStats(**dict(zip(SCALAR_STATS, values)), replaced_ids=stats.replaced_ids,
                      route_hist=[int(v) for v in values[len(SCALAR_STATS):]] if stats.route_hist is not None else None)
    if total.replaced and dist.is_initialized():  # every rank sees the same count, so all take part
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, stats.replaced_ids)
        total.replaced_ids = [item for ids in per_rank for item in ids]
    return total


# -----------------------------------------------------------------------------
# one run

@dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # of the frozen base (bf16 on GPU)
    model: torch.nn.Module  # the raw module: what the optimizer and the checkpoints see
    forward_model: torch.nn.Module  # what forward runs on (FSDP / DDP / compiled)
    context_params: list  # context prompt + encoder: outside DDP/FSDP, gradients averaged by hand
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dataset: data.TrainDataset
    collator: data.Collator
    config: dict  # the run config in effect (run_config.json, every checkpoint's config.json)
    state: TrainerState
    accum: int  # micro-batches per rank per optimizer step
    steps_per_epoch: int
    total_steps: int
    resumed_from: str | None = None
    stop: StopRequest = field(default_factory=StopRequest)  # SIGTERM / SIGINT noted since the loop began
    mirror: common.LogMirror | None = None  # TensorBoard / W&B copy of log.jsonl (rank 0)


def claim_run_folder(args, rank):
    """Rank 0 locks --out and refuses a used folder without --resume / --overwrite. -> the lock (rank 0) or None."""
    if rank != 0:
        return None
    lock = common.lock_run_folder(args.out)
    used = common.used_run_outputs(args.out)
    if used and not args.resume:
        if not args.overwrite:
            lock.close()
            raise SystemExit(f"--out {args.out} already holds a run ({', '.join(used)}): continue it with --resume "
                             f"or start afresh with --overwrite")
        common.clear_run_outputs(args.out)
    return lock


def build_dataset(args, processor, rank, local_rank):
    """-> (dataset, LLaVA entries dropped up front). The LLaVA json is checked and packed once per
    node (local rank 0); every rank then memory-maps the packed copy."""
    config = data.DataConfig(llava_json=args.data if args.method != "imagenet-ft" else None,
                             image_root=args.image_root, imagenet=args.imagenet,
                             imagenet_classes=args.imagenet_classes, mix=args.mix_ratio, closed_k=args.closed_k,
                             model_max_length=args.model_max_length, skip_bad_samples=args.skip_bad_samples,
                             seed=args.seed, template=args.template, cache_dir=args.cache_dir)
    try:
        if config.llava_json and local_rank == 0:
            data.ensure_llava_cache(config)
        barrier()
        dataset, n_skipped = data.TrainDataset.from_config(config, processor)
    except ValueError as e:  # data.BadSampleError or a template the tokenizer cannot render: named there
        raise SystemExit(str(e)) from None
    if n_skipped and rank == 0:  # the ids and reasons, for the record
        common.write_json_atomic(os.path.join(args.out, "skipped_entries.json"), dataset.skipped.items)
        print0(f"warning: --skip-bad-samples dropped {n_skipped} LLaVA entries (all in {args.out}/skipped_entries.json):"
               f"\n  {dataset.skipped.summary()}")
    return dataset, n_skipped


def find_checkpoint(args, rank, device):
    """--resume: the checkpoint to continue from (None without --resume)."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        ckpt = common.load_latest_checkpoint(args.out, rank, device)
        if ckpt is None:
            raise SystemExit(f"--resume: no checkpoint in {os.path.join(args.out, 'ckpt')}")
        return ckpt
    if not os.path.isdir(args.resume):
        raise SystemExit(f"--resume {args.resume}: no such checkpoint folder")
    try:
        return common.load_checkpoint(args.resume, rank, device)
    except common.DamagedFileError as e:
        raise SystemExit(f"--resume {args.resume}: {e}") from None


def check_resume_settings(ckpt, config, base_dir):
    """Refuse, in one line, a resume that changes the model or a FIXED_ON_RESUME setting.
    base_dir: the base folder loaded now (an older checkpoint records a preset's base as its
    folder). -> {flag: (checkpoint's value, now)} for the APPLIED_ON_RESUME settings that changed."""
    saved = ckpt.config
    config = json.loads(json.dumps(config))  # as a checkpoint holds it: tuples (an expert's image_mean) are lists
    same = dict(method=saved.get("method") == config["method"], base=saved.get("base") in (config["base"], base_dir))
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {config[key]!r}" for key in same if not same[key]]
    for section in ("carpe", "moe"):
        a, b = saved.get(section) or {}, config.get(section) or {}
        for key in sorted((set(a) | set(b)) - {"gradient_checkpointing"}):  # checkpointing does not change the math
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    flag = lambda key: "--" + key.replace("_", "-")
    for key in FIXED_ON_RESUME:
        if saved["train"].get(key) != config["train"][key]:
            diffs.append(f"{flag(key)}: checkpoint {saved['train'].get(key)!r}, now {config['train'][key]!r}")
    if diffs:
        raise SystemExit(f"--resume {ckpt.path}: that checkpoint was made for another run; a resume cannot change "
                         + "; ".join(diffs))
    return {flag(k): (saved["train"].get(k), config["train"][k]) for k in APPLIED_ON_RESUME
            if saved["train"].get(k) != config["train"][k]}


def restore(run, ckpt):
    """Resume: settings checked, weights and RNG loaded (before wrapping), the folder's later
    checkpoints and log lines set aside. The optimizer state follows in load_optimizer_state."""
    changed = check_resume_settings(ckpt, run.config, run.args.base)
    state = TrainerState(**ckpt.trainer_state)
    if state.epoch_length != len(run.dataset):
        raise SystemExit(f"--resume {ckpt.path}: the checkpoint's epoch has {state.epoch_length} samples, the data now "
                         f"gives {len(run.dataset)} (other --data / --imagenet / --skip-bad-samples?)")
    run.model.load_trainable_state_dict(ckpt.weights)
    if ckpt.rng is not None:
        common.set_rng_state(ckpt.rng, run.device)
    else:
        print0(f"warning: {ckpt.path} has no RNG file for rank {run.rank} (a run with fewer ranks?); RNG not restored")
    for flag, (before, now) in changed.items():
        print0(f"resume: {flag} {now!r} (the checkpoint ran with {before!r})")
    run.config["resumed"] = ckpt.config.get("resumed", []) + [
        dict(step=state.step, checkpoint=ckpt.path, changed={k: list(v) for k, v in changed.items()})]
    if run.rank == 0:  # this folder's later checkpoints and log lines belong to the abandoned continuation
        for moved in common.set_aside_newer(run.args.out, state.step):
            print0(f"resume: {moved} was written after step {state.step}; set aside")
    barrier()
    print0(f"resuming from {ckpt.path} at step {state.step}")
    run.state, run.resumed_from = state, ckpt.path


def set_context_trainable(run, trainable):
    run.model.set_context_trainable(trainable)
    run.state.context_trainable = trainable


def load_optimizer_state(run, ckpt):
    """Optimizer + scheduler state of a checkpoint, then the learning rates of the current flags."""
    # AdamW holds state only for tensors that had a gradient (not the context ones in epoch 1), and
    # FSDP2's loader is strict about every tensor that requires one: set the freeze of that moment first
    set_context_trainable(run, run.state.context_trainable)
    # the rates of --lr / --lr-adapter: base_lrs (each group's "lr" is already scaled by the warmup)
    base_lrs = list(run.scheduler.base_lrs)
    if run.args.fsdp:
        set_optimizer_state_dict(run.model, run.optimizer, optim_state_dict=ckpt.optimizer["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        run.optimizer.load_state_dict(ckpt.optimizer["optimizer"])
    run.scheduler.load_state_dict(ckpt.optimizer["scheduler"])
    # both state dicts carry the saved rates: the flags given now win
    run.scheduler.base_lrs = base_lrs
    for g, base, lr_lambda in zip(run.optimizer.param_groups, base_lrs, run.scheduler.lr_lambdas):
        g["initial_lr"], g["lr"] = base, base * lr_lambda(run.scheduler.last_epoch)


def optimizer_state(run):
    """Full (unsharded) optimizer state plus the scheduler's. Collective under FSDP."""
    if run.args.fsdp:
        state = get_optimizer_state_dict(run.model, run.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = run.optimizer.state_dict()
    return dict(optimizer=state, scheduler=run.scheduler.state_dict())


def setup(args, rank, world, local_rank, device):
    """Everything before the first step: data, model, resume, wrapping, optimizer."""
    # the base as given (or the preset's Hub id), or "preset:tiny" / "preset:small": never a cache path
    recorded_base = args.base or f"preset:{args.preset}"
    if args.preset in ("tiny", "small"):  # build the preset's cached world on first use, once per node
        ensure, use = (tiny.ensure_tiny_world, use_tiny_world) if args.preset == "tiny" else \
            (small.ensure_small_world, use_small_world)
        if local_rank == 0:
            ensure(args.cache_dir)
        barrier()
        use(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    micro, accum = batch_layout(args.batch_size, args.micro_batch_size, world)
    if micro != args.micro_batch_size:
        print0(f"--micro-batch-size {micro}: {args.batch_size} samples per step over {world} ranks leave {micro} "
               f"per rank (--micro-batch-size {args.micro_batch_size} asked)")
        args.micro_batch_size = micro  # the run config records the micro-batch used
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llava, processor = carpe.load_base(args.base, device=device, dtype=dtype)
    fit_model_max_length(args, llava)
    model, image_transform, moe_config = create_model(args, llava, processor, device)
    config = dict(method=args.method, base=recorded_base, template=args.template,
                  carpe=model.config.to_dict() if hasattr(model.config, "to_dict") else None,
                  moe=moe_config.to_dict() if moe_config is not None else None,
                  train=dict({k: v for k, v in vars(args).items() if k not in RUN_FLAGS + ("mix_ratio",)},
                             base=recorded_base))
    dataset, n_skipped = build_dataset(args, processor, rank, local_rank)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"an epoch has {len(dataset)} samples, fewer than --batch-size {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    run = Run(args=args, rank=rank, world=world, device=device, dtype=dtype, model=model, forward_model=model,
              context_params=[], optimizer=None, scheduler=None, dataset=dataset,
              collator=data.Collator(processor.tokenizer.pad_token_id, image_transform), config=config,
              state=TrainerState(epoch_length=len(dataset), skipped_samples=n_skipped), accum=accum,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    ckpt = find_checkpoint(args, rank, device)
    if ckpt is not None:
        restore(run, ckpt)  # weights before wrapping, optimizer state after
    run.forward_model, run.context_params = wrap_model(args, model, device, world)
    run.optimizer, run.scheduler = make_optimizer(args, model, total_steps)
    if ckpt is not None:
        load_optimizer_state(run, ckpt)
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if model.is_trainable_name(n))
    print0(f"{args.method} on {args.base}: {n_trainable / 1e6:.2f}M trainable params; {len(dataset)} samples/epoch "
           f"({dataset.plan.imagenet_per_epoch} ImageNet), {steps_per_epoch} steps/epoch, {total_steps} steps, "
           f"world {world} x micro {args.micro_batch_size} x accum {accum}")
    if rank == 0 and (args.tensorboard or args.wandb):  # the run config in effect, as a resume updated it
        run.mirror = common.LogMirror(args.out, run.config, tensorboard=args.tensorboard, wandb_project=args.wandb)
    return run


# -----------------------------------------------------------------------------
# training

def accumulate(run, batches, autocast):
    """Forward and backward over this rank's micro-batches of one global batch. The gradient is
    the mean over micro-batches of each one's mean token loss (as HF Trainer). -> StepStats."""
    vision_moe = getattr(run.model, "vision_moe", None)
    stats = StepStats(route_hist=[0] * len(vision_moe.expert_names) if vision_moe is not None else None)
    for micro in range(run.accum):
        batch = next(batches)
        # DDP all-reduces the gradients at every backward: only the last micro-batch needs that
        sync = micro == run.accum - 1 or not isinstance(run.forward_model, DDP)
        with (nullcontext() if sync else run.forward_model.no_sync()), autocast:
            pixel_values = batch["pixel_values"]
            if isinstance(pixel_values, dict):  # CARPE-MoE: one tensor per expert
                pixel_values = {k: v.to(run.device) for k, v in pixel_values.items()}
            elif pixel_values is not None:  # None: no sample of this micro-batch has an image
                pixel_values = pixel_values.to(run.device, dtype=run.dtype)
            out = run.forward_model(input_ids=batch["input_ids"].to(run.device),
                                    attention_mask=batch["attention_mask"].to(run.device),
                                    pixel_values=pixel_values, labels=batch["labels"].to(run.device))
            (out.loss / run.accum).backward()
        stats.add(out, batch)
    return stats


def average_context_grads(run):
    """The context tensors sit outside DDP/FSDP: average their gradients over ranks by hand."""
    if run.world == 1:
        return
    for p in run.context_params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(run.world)


def bad_step_reason(loss, grad_norm, state, max_loss_ratio):
    """Why this step's update must not reach the weights, or None."""
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm {grad_norm}"
    if max_loss_ratio and len(state.recent_losses) >= 5:
        mean = sum(state.recent_losses) / len(state.recent_losses)
        if loss > max_loss_ratio * mean:
            return f"loss spike {loss:.4g} > --max-loss-ratio {max_loss_ratio} x recent mean {mean:.4g}"
    return None


def stop_run(run, reason):
    """Stop a run whose weights went bad: reject the checkpoints from the last applied update on; name the one before."""
    u = run.state.last_update
    earlier = [p for p in common.list_checkpoints(run.args.out) if common.checkpoint_step(p) < u]
    if run.resumed_from and common.checkpoint_step(run.resumed_from) < u:
        earlier.append(run.resumed_from)  # a run resumed from another folder: where it started
    good = max(earlier, key=common.checkpoint_step, default=None)
    barrier()  # every rank has read the folder before rank 0 renames in it
    if run.rank == 0:
        common.reject_checkpoints(run.args.out, u)
    barrier()
    advice = (f"the last good checkpoint is {good}: resume it with --resume {good}, perhaps with a lower --lr"
              if good else f"no checkpoint before step {run.state.last_update} was saved: start again with a lower --lr")
    raise SystemExit(f"stopping at step {run.state.step}: {reason}. The weights of step {run.state.last_update} are "
                     f"suspect (checkpoints from there on renamed *.rejected); {advice}")


def save(run):
    """A checkpoint of the current step, if the weights are finite; then retention. Collective.
    -> the gathered weights."""
    weights = gather_trainable(run.model)
    try:
        common.check_finite(weights, f"the trainable weights at step {run.state.step}")
    except common.DamagedFileError as e:
        stop_run(run, str(e))
    path = common.checkpoint_path(run.args.out, run.state.step)
    try:  # a full disk raises on every rank: all stop here together
        common.save_checkpoint(path, weights, optimizer_state(run), asdict(run.state), run.config, run.rank, run.device)
    except common.DiskFullError as e:
        raise SystemExit(disk_full_message(run, e)) from None
    if run.rank == 0:  # never the one just written, never the one this run resumed from
        common.prune_checkpoints(run.args.out, run.args.keep_checkpoints, protect=(path, run.resumed_from))
    barrier()
    return weights


def disk_full_message(run, error):
    """One line for a save the disk had no room for: the error names the path and the space."""
    saved = common.list_checkpoints(run.args.out)
    kept = f"the previous checkpoint {saved[-1]} is intact" if saved else "no earlier checkpoint was saved"
    text = error.strerror or str(error)  # DiskFullError(ENOSPC, text): the text without "[Errno 28]"
    return f"stopping at step {run.state.step}: {text}; {kept}: free space on that disk and continue with --resume"


def log_step(run, stats, loss, grad_norm, lrs, skipped, seconds):
    """One line of log.jsonl (rank 0) and the progress bar."""
    state = run.state
    record = dict(step=state.step, epoch=(state.step - 1) // run.steps_per_epoch + 1, loss=loss, **lrs,
                  grad_norm=grad_norm, vision_weight=stats.vision_weight / stats.samples,
                  tokens_per_s=stats.tokens / seconds, peak_mem_gb=peak_memory_gb(run.device),
                  truncated=state.truncated, skipped=state.skipped_samples, context_trainable=state.context_trainable,
                  skipped_step=skipped, skipped_steps=state.skipped_steps)
    if stats.replaced_ids:  # bad samples the loader replaced in this step (--skip-bad-samples)
        record["skipped_ids"] = stats.replaced_ids
    if stats.route_hist is not None:
        record["balance_loss"] = stats.balance_loss / stats.micro_batches
        record["route_hist"] = stats.route_hist
        record["route"] = dict(zip(run.model.vision_moe.expert_names, stats.route_hist))
    if run.rank != 0:
        return record
    log_path = os.path.join(run.args.out, "log.jsonl")
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.mirror is not None:
        run.mirror.log(record)
    if stats.truncated and state.truncated == stats.truncated:  # the first cut sample: say it once
        print0(f"warning: samples longer than --model-max-length {run.args.model_max_length} are being cut "
               f"(counted as 'truncated' in {log_path})")
    if skipped:
        print0(f"warning: step {state.step} skipped: {skipped}")
    return record


def train(run):
    """The loop. -> the final weights (gathered by the last save)."""
    args, state = run.args, run.state
    trainable = [p for name, p in run.model.named_parameters() if run.model.is_trainable_name(name)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" else nullcontext()
    bar = tqdm(total=run.total_steps, initial=state.step, disable=run.rank != 0, desc="train")
    weights = None
    run.model.train()
    for epoch in range(state.step // run.steps_per_epoch, math.ceil(run.total_steps / run.steps_per_epoch)):
        # the paper freezes the context prompt and encoder for the first epoch
        set_context_trainable(run, epoch > 0)
        # every rank reads its share of this epoch's fixed order, from the resumed position on
        start = (state.step - epoch * run.steps_per_epoch) * args.batch_size
        batches = iter(data.make_loader(run.dataset, run.collator, args.micro_batch_size, args.batch_size, run.rank,
                                        run.world, epoch, start, args.num_workers))
        while state.step < min(run.total_steps, (epoch + 1) * run.steps_per_epoch):
            t0 = time.time()
            stats = accumulate(run, batches, autocast)
            stats.stop = float(run.stop.signal is not None)
            average_context_grads(run)
            # sums over ranks: every rank sees the same loss and norm, so all take the same decision
            stats = reduce_stats(stats)
            loss = stats.loss / stats.micro_batches
            grad_norm = clip_grad_norm(trainable, args.grad_clip)
            lrs = {f"lr_{g['name']}": g["lr"] for g in run.optimizer.param_groups}
            # finite or nothing: a bad loss or gradient never reaches the weights
            skipped = bad_step_reason(loss, grad_norm, state, args.max_loss_ratio)
            if skipped is None:
                run.optimizer.step()
                state.last_update, state.consecutive_skips = state.step + 1, 0
                state.recent_losses = (state.recent_losses + [loss])[-20:]
            else:
                state.skipped_steps += 1
                state.consecutive_skips += 1
            # the schedule and the data position move on either way: the batch was consumed
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += int(stats.tokens)
            state.truncated += int(stats.truncated)
            state.skipped_samples += int(stats.replaced)
            record = log_step(run, stats, loss, grad_norm, lrs, skipped, time.time() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", alpha=f"{record['vision_weight']:.3f}")
            if state.consecutive_skips >= args.max_skipped_steps:
                stop_run(run, f"{state.consecutive_skips} step(s) in a row skipped (the last: {skipped})")
            saved = (args.save_every and state.step % args.save_every == 0) or state.step == run.total_steps
            if saved:
                weights = save(run)
            if stats.stop and state.step < run.total_steps:
                stop_for_signal(run, int(stats.stop), saved)
    bar.close()
    return weights


def stop_for_signal(run, n_ranks, saved):
    """Every rank saw the same count of signalled ranks in the step's all-reduce: all write this
    step's checkpoint together and leave (main releases the lock) with PREEMPTED_EXIT_CODE."""
    if not saved:
        save(run)
    path = common.checkpoint_path(run.args.out, run.state.step)
    print0(f"stopping after step {run.state.step} of {run.total_steps}: {n_ranks} of {run.world} rank(s) received "
           f"SIGTERM or SIGINT; checkpoint {path} written; continue with --resume (exit code {PREEMPTED_EXIT_CODE})")
    raise SystemExit(PREEMPTED_EXIT_CODE)


def finish(run, weights):
    """The final weights in the run-folder format, and a summary with a cross-rank check that
    training kept the replicas identical."""
    if weights is None:  # resumed from the final checkpoint: nothing was trained, nothing saved
        weights = gather_trainable(run.model)
        common.check_finite(weights, "the resumed weights")
    full = None
    if run.rank == 0:
        try:
            common.save_run(run.args.out, weights, run.config)
        except common.DiskFullError as e:  # caught, so the all-reduce below tells the other ranks to stop too
            full = e
    # one slot per rank's checksum, the last: 1 when rank 0's final save found the disk full
    checksums = torch.zeros(run.world + 1, dtype=torch.float64)
    checksums[run.rank] = weights_checksum(weights)
    checksums[-1] = float(full is not None)
    all_reduce_sum(checksums)
    if checksums[-1]:
        raise SystemExit(disk_full_message(run, full) if full is not None else
                         f"stopping at step {run.state.step}: rank 0 found the disk full writing the final weights")
    checksums = checksums[:-1]
    if run.rank == 0:
        common.write_json_atomic(os.path.join(run.args.out, "summary.json"), dict(
            steps=run.state.step, world=run.world, rank_checksums=checksums.tolist(), truncated=run.state.truncated,
            skipped_samples=run.state.skipped_samples, skipped_steps=run.state.skipped_steps))
        print0(f"done: {run.state.step} steps; final weights in {run.args.out}/model.safetensors")
    barrier()


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = resolve_args(parse_args(argv))
    if args.fsdp and "RANK" not in os.environ:  # FSDP2's mesh needs torchrun's process group, even for one process
        raise SystemExit("--fsdp shards the model over the processes torchrun starts: launch with "
                         "torchrun --nproc_per_node N train.py ... (N = GPUs per node)")
    rank, world, local_rank, device = setup_distributed(timeout_s=args.dist_timeout * 60)
    lock = claim_run_folder(args, rank)
    run = None
    try:
        run = setup(args, rank, world, local_rank, device)
        run.stop.install()  # from the first step on, SIGTERM / SIGINT end the run after a step, with a checkpoint
        finish(run, train(run))
        return run.model
    finally:
        if run is not None and run.mirror is not None:
            run.mirror.close()
        if lock is not None:
            lock.close()
        if run is not None:  # DDP's reducer holds the process group: let it go while the group is alive
            run.forward_model = None
            gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        if run is not None:  # last: torchrun may signal this rank again while it leaves
            run.stop.restore()


if __name__ == "__main__":
    main()
