"""
common.py: what train.py, eval.py, bench.py and tiny.py share: distributed set-up (the FSDP2 / HSDP
mesh, preemption signals), atomic writes (a full disk named), the learning-rate schedule, checkpoints,
run folders (loading a trained run), folder locks, log mirrors and WiSE-FT weight interpolation.
"""
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moe
from baselines import build_model
from carpe import CarpeConfig, load_base, make_image_transform



def setup_distributed(timeout_s=None):
    """-> rank, world, local_rank, device. Works with plain python (world 1) and torchrun.
    timeout_s: how long any collective may wait (None = the backend's default: NCCL's watchdog
    kills a rank after 10 minutes, which a first launch's rank-0-only work, such as checking a
    cold json of 624K images, can exceed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise SystemExit(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                             f"(torchrun --nproc_per_node N {os.path.basename(sys.argv[0])} ...)")
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world, local_rank, device


def fsdp_mesh(device, world):
    """One node: a flat mesh. Several nodes (LOCAL_WORLD_SIZE < WORLD_SIZE): HSDP, sharded within a node
    (all-gathers stay on its fast links) and replicated across nodes (one gradient all-reduce per step)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local >= world or world % local:
        return init_device_mesh(device.type, (world,))
    print0(f"FSDP2 mesh: HSDP, replicated over {world // local} nodes x sharded over {local} ranks each")
    return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # SLURM's time limit and preemption, Kubernetes, Ctrl-C


class StopRequest:
    """SIGTERM / SIGINT handlers that only note the signal; the note travels in the step's all-reduce
    (reduce_stats), so every rank stops after the same step. Repeats are ignored (torchrun forwards the
    signal its ranks already got); DataLoader workers forked later inherit the handler and keep serving."""

    def __init__(self):
        self.signal = None  # the name of the first signal received
        self.previous = {}

    def note(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name

    def install(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self.previous = {sig: signal.signal(sig, self.note) for sig in STOP_SIGNALS}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t):
    """In-place sum over ranks of a CPU tensor (NCCL needs it on the GPU for the trip)."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t)
    return t


def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def full_tensor(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params, max_norm):
    """Global grad norm over plain and FSDP (DTensor) gradients; clip in place (when finite).
    -> the norm before clipping (the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = sum(full_tensor(g.float().pow(2).sum()) for g in grads).sqrt()
    if max_norm > 0 and torch.isfinite(norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.item() if isinstance(g, DTensor) else coef.to(g.dtype))
    return norm.item()


def gather_trainable(model):
    """Full trainable tensors on CPU (gathered from the FSDP shards; every rank must call this)."""
    return {name: full_tensor(t).detach().cpu().contiguous() for name, t in model.trainable_state_dict().items()}


def weights_checksum(weights):
    """48 bits of a sha256 of the weights: exact in float64, so ranks can compare by all-reduce."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].float().numpy().tobytes())
    return float(int(digest.hexdigest()[:12], 16))


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def cosine_schedule(total_steps, warmup_steps):
    def lr_lambda(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr_lambda


class DiskFullError(OSError):
    """A write that failed because its file system is full; the message names the path, what was
    needed and what is free, and says that the partial file was removed."""


def nbytes(obj):
    """The bytes of the tensors in a nested container: what writing it needs, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 64


def free_bytes(path):
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def is_disk_full(error, path, needed):
    """A failed write ran out of space: ENOSPC, or the writer's own words for it (torch.save says
    only "iostream error", safetensors "StorageFull"), or less space left than the write needed."""
    if getattr(error, "errno", None) == errno.ENOSPC or any(w in str(error) for w in ("No space left", "StorageFull")):
        return True
    return free_bytes(path) < needed


def remove_quietly(path):
    """Remove a file or folder if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def disk_full_error(path, needed, partial):
    """The DiskFullError for a write of `needed` bytes into `path`, once `partial` is removed."""
    remove_quietly(partial)
    return DiskFullError(errno.ENOSPC, f"no space left on the device holding {path}: writing it needs about "
                                       f"{needed / 2**20:.1f} MiB and {free_bytes(path) / 2**20:.1f} MiB are free "
                                       f"(the partial {os.path.basename(partial)} was removed). Free some space and run "
                                       f"again")


def write_atomic(path, write, needed):
    """write(tmp_path), then rename over `path`. A failure removes the temp file; a full disk
    raises DiskFullError naming the path and the space needed."""
    tmp = path + ".tmp"
    try:
        write(tmp)
    except Exception as e:
        if is_disk_full(e, path, needed):
            raise disk_full_error(path, needed, tmp) from None
        remove_quietly(tmp)
        raise
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    text = json.dumps(obj, indent=2)
    write_text_atomic(path, text)


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a full disk shows at the flush, not at the rename
    write_atomic(path, write, len(text.encode()))


def save_safetensors_atomic(state, path):
    write_atomic(path, lambda tmp: save_file(state, tmp), nbytes(state))


class LogMirror:
    """Mirrors each log.jsonl record to TensorBoard (<out>/tensorboard/) and/or Weights & Biases
    (train.py --tensorboard / --wandb PROJECT). Both are optional imports (requirements-logging.txt);
    log.jsonl stays the record. W&B offline mode works (WANDB_MODE=offline: `wandb sync` uploads
    later); a resumed run continues the same W&B run (its id is kept in <out>/wandb_id)."""

    def __init__(self, out, config, tensorboard=False, wandb_project=None):
        self.writer = self.wandb_run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: only this flag needs it
            except ImportError:
                raise SystemExit("--tensorboard needs the tensorboard package: "
                                 "pip install -r requirements-logging.txt") from None
            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))
        if wandb_project:
            try:
                import wandb  # optional: only this flag needs it
            except ImportError:
                raise SystemExit("--wandb needs the wandb package: pip install -r requirements-logging.txt") from None
            id_file = os.path.join(out, "wandb_id")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else os.urandom(4).hex()
            write_text_atomic(id_file, run_id)
            self.wandb_run = wandb.init(project=wandb_project, id=run_id, resume="allow", dir=out, config=config,
                                        name=os.path.basename(os.path.abspath(out)))

    @staticmethod
    def scalars(record):
        """The numbers of a record, nested dicts flattened (route/clip, ...); lists and text left out."""
        flat = {}
        for key, value in record.items():
            if isinstance(value, dict):
                flat.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)) and key != "step":  # bools too: 0 / 1
                flat[key] = float(value)
        return flat

    def log(self, record):
        values = self.scalars(record)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


# -----------------------------------------------------------------------------
# integrity: file digests and finite weights

MANIFEST = "manifest.json"  # {"sha256": {file name: hex digest}} beside the files it covers


class DamagedFileError(ValueError):
    """A file whose bytes differ from the digest recorded beside it, or holding non-finite weights."""


def sha256_file(path, chunk=1 << 22):
    """Hex sha256 of a file, read in 4 MiB chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder, names):
    """Record the sha256 of each named file of `folder` in folder/manifest.json (atomically)."""
    write_json_atomic(os.path.join(folder, MANIFEST), {"sha256": {n: sha256_file(os.path.join(folder, n)) for n in names}})


def verify_manifest(folder, required=False):
    """Check every file recorded in folder/manifest.json against its digest; raise
    DamagedFileError naming the first damaged or missing file. -> True if a manifest was checked,
    False if the folder has none (allowed only when not `required`)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        if required:
            raise DamagedFileError(f"{path} is missing: the folder was not completely written")
        return False
    try:
        with open(path) as f:
            recorded = json.load(f)["sha256"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    for name, digest in recorded.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise DamagedFileError(f"{file} is missing (recorded in {path})")
        if sha256_file(file) != digest:
            raise DamagedFileError(f"{file} is damaged: its sha256 differs from the one recorded in {path}")
    return True


def check_finite(state, where):
    """Refuse a weight dict holding NaN or inf, naming `where` (a file) and the first bad tensor."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise DamagedFileError(f"{where}: tensor {name} holds {n_bad} non-finite value(s) (NaN or inf)")


def load_weights(path, device="cpu"):
    """safetensors -> dict, naming the file when it cannot be parsed; refuses non-finite weights."""
    try:
        state = load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / junk files
        raise DamagedFileError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    check_finite(state, path)
    return state


# -----------------------------------------------------------------------------
# run folders: run_config.json + model.safetensors (+ manifest.json), what eval.py --ckpt reads

RUN_WEIGHTS = ("model.safetensors",)  # the weights file(s) of a run folder
RUN_CONFIG = "run_config.json"  # the run's own config; never named config.json, which tools read as a transformers model
LEGACY_RUN_CONFIG = "config.json"  # what run folders written before the rename hold


def run_config_path(folder):
    """The run config file of a run folder (new name first, then the old one), or None."""
    for name in (RUN_CONFIG, LEGACY_RUN_CONFIG):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def read_run_config(folder):
    """A run folder's config (dict): method, base, template, carpe, moe, train. Raises
    FileNotFoundError naming the folder when it holds none, DamagedFileError when unreadable."""
    path = run_config_path(folder)
    if path is None:
        raise FileNotFoundError(f"{folder} is not a train.py run directory: it has no {RUN_CONFIG}")
    config = read_json(path)
    if not isinstance(config, dict) or "method" not in config:
        raise FileNotFoundError(f"{folder} is not a train.py run directory: {path} is not a run config")
    return config


def is_run_dir(path):
    """A train.py run folder (new or old layout), as opposed to a Hugging Face model folder."""
    try:
        read_run_config(path)
    except (FileNotFoundError, DamagedFileError):
        return False
    return os.path.isfile(os.path.join(path, RUN_WEIGHTS[0]))


def run_digest(run_dir):
    """A digest of the run's weights: the sha256 of its weights file (of the files' digests if
    there were several), so two evaluations can tell whether they saw the same weights."""
    digests = [sha256_file(os.path.join(run_dir, n)) for n in RUN_WEIGHTS]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in zip(RUN_WEIGHTS, digests)).encode()).hexdigest()


def load_run(out_dir, device="cpu", dtype=None, base=None):
    """Rebuild a train.py run directory (run_config.json + model.safetensors) for evaluation:
    -> (model, processor, image_transform). Verifies the digests the folder records and refuses
    non-finite weights, naming the file and tensor. base: the base folder or Hub id to build on
    instead of the config's own "base" entry (pretrained.py resolves preset names such as
    "preset:tiny" and passes the folder here)."""
    weights_file = os.path.join(out_dir, "model.safetensors")
    run = read_run_config(out_dir)
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"{out_dir} is not a finished train.py run directory: {weights_file} is missing")
    verify_manifest(out_dir)
    state = load_weights(weights_file, device)  # before the base: a damaged run fails in a second
    llava, processor = load_base(base or run["base"], device, dtype)
    vision_moe = None
    if run.get("moe"):
        vision_moe = moe.build_vision_moe(llava, moe.MoEConfig.from_dict(run["moe"]), device=device, dtype=dtype,
                                          image_processor=processor.image_processor)
    carpe_config = CarpeConfig.from_dict(run["carpe"]) if run.get("carpe") else CarpeConfig()
    model = build_model(run.get("method", "carpe"), llava, carpe_config, vision_moe)
    model.load_trainable_state_dict(state)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    image_transform = vision_moe.preprocess if vision_moe is not None else make_image_transform(processor)
    return model, processor, image_transform


def save_run(out, weights, run_config):
    """The final weights in the run-folder format load_run reads, with their digests (rank 0)."""
    save_safetensors_atomic(weights, os.path.join(out, "model.safetensors"))
    write_json_atomic(os.path.join(out, RUN_CONFIG), run_config)
    legacy = os.path.join(out, LEGACY_RUN_CONFIG)
    if os.path.isfile(legacy) and "method" in read_json(legacy):  # an old-layout run finished again in place
        os.remove(legacy)
    write_manifest(out, ["model.safetensors", RUN_CONFIG])


# -----------------------------------------------------------------------------
# the run folder is the unit of safety: one run at a time, a used folder is not silently reused

RUN_OUTPUTS = ("ckpt", "superseded", "log.jsonl", RUN_CONFIG, LEGACY_RUN_CONFIG, "model.safetensors", MANIFEST,
               "summary.json", "skipped_entries.json")


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock; .holder is its pid as it wrote it."""

    def __init__(self, lock_path, holder):
        super().__init__(f"pid {holder} holds {lock_path}")
        self.lock_path, self.holder = lock_path, holder


def lock_folder(folder, name=".lock"):
    """Hold an exclusive lock on folder/name for the life of the returned file (close it to
    release; the kernel releases it if the process dies), writing our pid into it. Raises
    FolderInUseError naming the holder's pid at once if another process holds it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise FolderInUseError(path, holder) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_run_folder(out):
    """train.py's lock on its --out for the run: a second run into the same folder fails at once
    naming the pid that holds it."""
    try:
        return lock_folder(out)
    except FolderInUseError as e:
        raise SystemExit(f"--out {out} is in use by another run (pid {e.holder} holds {e.lock_path})") from None


def used_run_outputs(out):
    """The outputs of an earlier run found in `out` (empty for a fresh folder)."""
    return [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]


def clear_run_outputs(out):
    """--overwrite: remove an earlier run's outputs (only the names a run writes; other files stay)."""
    for name in used_run_outputs(out):
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# -----------------------------------------------------------------------------
# checkpoints: <out>/ckpt/step_XXXXXXX/ = model.safetensors (trainable tensors), optimizer.pt
# (optimizer + scheduler), rng_rank{r}.pt, trainer_state.json, config.json, manifest.json (the
# sha256 of every other file). Written into step_XXXXXXX.tmp and renamed: a kill leaves either a
# complete checkpoint or a .tmp folder that nothing reads. Nothing that can run code is loaded.

CHECKPOINT_NAME = re.compile(r"step_(\d{7})")


@dataclass
class Checkpoint:
    path: str
    weights: dict  # trainable tensors, checked finite
    optimizer: dict  # {"optimizer": ..., "scheduler": ...}
    trainer_state: dict
    config: dict  # the run config in effect when it was written
    rng: dict | None  # this rank's RNG state (None: written by a run with fewer ranks)


def checkpoint_path(out, step):
    return os.path.join(out, "ckpt", f"step_{step:07d}")


def checkpoint_step(path):
    return int(CHECKPOINT_NAME.fullmatch(os.path.basename(path)).group(1))


def list_checkpoints(out):
    """The complete checkpoints of a run folder, oldest first (.tmp / .rejected folders excluded)."""
    folder = os.path.join(out, "ckpt")
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if CHECKPOINT_NAME.fullmatch(d)]


def rng_state(device):
    """python, numpy, torch (and CUDA) RNG state as tensors and plain values (weights_only loadable)."""
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


def retire(path):
    """Delete a folder so that a kill midway cannot leave a half-deleted checkpoint that looks
    complete: rename it out of the checkpoint name space first."""
    doomed = path + ".deleting"
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def any_rank(*flags):
    """For each flag: True on every rank if it is true on any (one all-reduce), so no rank waits
    in a barrier for one that failed."""
    total = all_reduce_sum(torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64))
    return [bool(v) for v in total.tolist()]


def wait_for_files(paths, timeout_s=600):
    """Wait until every path exists. Other ranks' files are looked up by name, never by listing
    the folder: a network file system may serve a stale listing for a while."""
    deadline = time.monotonic() + timeout_s
    for path in paths:
        while not os.path.isfile(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear within {timeout_s} s (written by another rank)")
            time.sleep(0.05)


def save_checkpoint(path, weights, optimizer_state, trainer_state, config, rank, device):
    """Write a checkpoint (collective: every rank adds its RNG file). The caller checked `weights`
    finite. The manifest is written last, then the folder is renamed into place. A full disk on
    any rank raises DiskFullError on every rank, with the temp folder removed and the earlier
    checkpoints untouched."""
    tmp = path + ".tmp"
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_files = [f"rng_rank{r}.pt" for r in range(world)]
    needed = nbytes(weights) + nbytes(optimizer_state)
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed during a save
            os.makedirs(tmp)
            save_file(weights, os.path.join(tmp, "model.safetensors"))
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            write_json_atomic(os.path.join(tmp, "trainer_state.json"), trainer_state)
            write_json_atomic(os.path.join(tmp, "config.json"), config)
        except Exception as e:
            error = e
    if not any_rank(error)[0]:
        try:
            torch.save(rng_state(device), os.path.join(tmp, rng_files[rank]))
        except Exception as e:
            error = e
    full = error is not None and is_disk_full(error, tmp, needed)
    failed, any_full = any_rank(error, full)
    if failed:  # every rank stops here, past its writes; rank 0 removes the temp folder
        if rank == 0:
            remove_quietly(tmp)
        if any_full:
            raise disk_full_error(path, needed, tmp)
        raise error or RuntimeError(f"saving {path} failed on another rank (its message says why)")
    if rank == 0:
        wait_for_files([os.path.join(tmp, n) for n in rng_files])
        write_manifest(tmp, ["model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"] + rng_files)
        if os.path.isdir(path):  # the same step of an abandoned earlier attempt
            retire(path)
        os.rename(tmp, path)
    barrier()
    return path


def torch_load_data(path):
    """torch.load that only accepts tensors and plain containers (weights_only), naming the file
    when it is damaged or holds anything else."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DamagedFileError(f"{path} holds more than tensors and plain values; refused ({e})".split("\n")[0]) from None
    except Exception as e:  # truncated zip, junk bytes
        raise DamagedFileError(f"{path} cannot be read ({type(e).__name__}: {e})".split("\n")[0]) from None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__}: {e})") from None


def load_checkpoint(path, rank, device="cpu"):
    """Read and verify one checkpoint -> Checkpoint. Raises DamagedFileError naming the file."""
    verify_manifest(path, required=True)
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    return Checkpoint(path=path, weights=load_weights(os.path.join(path, "model.safetensors"), device),
                      optimizer=torch_load_data(os.path.join(path, "optimizer.pt")),
                      trainer_state=read_json(os.path.join(path, "trainer_state.json")),
                      config=read_json(os.path.join(path, "config.json")),
                      rng=torch_load_data(rng_file) if os.path.isfile(rng_file) else None)


def load_latest_checkpoint(out, rank, device="cpu"):
    """The newest intact checkpoint of a run folder, falling back past damaged ones (saying so).
    -> Checkpoint, or None when the folder has none."""
    damaged = []
    for path in reversed(list_checkpoints(out)):
        try:
            ckpt = load_checkpoint(path, rank, device)
        except DamagedFileError as e:
            print0(f"warning: checkpoint {path} is damaged ({e}); falling back to the one before it")
            damaged.append(path)
            continue
        return ckpt
    if damaged:
        raise SystemExit(f"--resume: every checkpoint in {os.path.join(out, 'ckpt')} is damaged (newest: {damaged[0]})")
    return None


def prune_checkpoints(out, keep, protect=()):
    """Keep the `keep` newest checkpoints (0 = all) and every one in `protect` (the checkpoint a
    run resumed from, the one just written)."""
    if keep <= 0:
        return
    protect = {os.path.abspath(p) for p in protect if p}
    for path in list_checkpoints(out)[:-keep]:
        if os.path.abspath(path) not in protect:
            retire(path)


def unique_path(path):
    n, candidate = 1, path
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def set_aside_newer(out, step):
    """On a resume from step `step`: the checkpoints after it and the log lines after it belong to
    the abandoned continuation. Move them to <out>/superseded/ (nothing is deleted) so that
    --resume and retention never mix the two continuations; log.jsonl keeps steps <= `step`
    (and loses a torn last line). -> the checkpoints moved."""
    aside = os.path.join(out, "superseded")
    moved = []
    for path in list_checkpoints(out):
        if checkpoint_step(path) > step:
            os.makedirs(aside, exist_ok=True)
            target = unique_path(os.path.join(aside, os.path.basename(path)))
            os.rename(path, target)
            moved.append(target)
    log = os.path.join(out, "log.jsonl")
    if os.path.isfile(log):
        keep, cut = [], []
        with open(log, errors="replace") as f:
            for line in f:
                try:
                    (keep if json.loads(line)["step"] <= step else cut).append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a line torn by a kill mid-write
        if cut:
            os.makedirs(aside, exist_ok=True)
            with open(os.path.join(aside, "log.jsonl"), "a") as f:
                f.writelines(cut)
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)
    return moved


def reject_checkpoints(out, from_step):
    """Rename the checkpoints at or after `from_step` to step_XXXXXXX.rejected: kept for
    inspection, ignored by --resume and retention."""
    for path in list_checkpoints(out):
        if checkpoint_step(path) >= from_step:
            os.rename(path, unique_path(path + ".rejected"))


def weight_files(path):
    """The safetensors files of a run dir or an HF model dir, or a single .safetensors file."""
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
        raise FileNotFoundError(f"--wise-ft: no *.safetensors in {path} (expected a train.py run dir "
                                f"or an HF model dir)")
    return files


def tensor_index(files):
    """{tensor name: (file, shape, dtype)} without loading any tensor."""
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
    run = read_run_config(run_dir)
    if run.get("moe"):
        raise ValueError(f"--wise-ft: {run_dir} is a CARPE-MoE run; pair it with another run dir, not with a base")
    llava, _ = load_base(base, dtype="auto")  # on CPU, as saved (fp16 for llava-hf): the 7B base never needs a GPU here
    cfg = CarpeConfig.from_dict(run["carpe"]) if run.get("carpe") else None
    torch.manual_seed(run["train"].get("seed", 0))  # the run's own init of the modules it adds
    model = build_model(run["method"], llava, cfg)
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, RUN_CONFIG), run)
    state = {k: v.detach().float().contiguous() for k, v in model.trainable_state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def interpolate_weights(a, b, alpha, out_dir):
    """Write (1 - alpha) * A + alpha * B into out_dir, a copy of folder A (its other files copied as
    they are), one of A's shards at a time, on CPU. Returns out_dir."""
    files_a, files_b = weight_files(a), weight_files(b)
    index_a, index_b = tensor_index(files_a), tensor_index(files_b)
    check_same_tensors(index_a, index_b, a, b)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(a):
        for name in os.listdir(a):  # config, tokenizer, index: everything but the weights
            src = os.path.join(a, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name != MANIFEST:  # new weights, new digests
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
