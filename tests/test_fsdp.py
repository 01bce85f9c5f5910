"""FSDP2 with ranks whose micro-batches differ in modality: 2 ranks under torchrun (gloo on CPU),
the tiny CARPE sharded as train.py shards it (each LM decoder layer its own unit, then the
root), gradient checkpointing off, then on. In the first micro-batch rank 0 has an image and rank 1 is
text-only, in the second the other way round. Without carpe's main_pass_inputs the text-only
rank skips the frozen LM's backward and with it the layers' all-gathers that the image rank
runs: the collectives no longer match and the step hangs (the subprocess timeout turns that
into a failure within a few minutes instead of the collective timeout's half hour). The
gathered gradients must equal one process's mean over the two ranks' micro-batches.

This file is also the worker: `torchrun --nproc_per_node 2 tests/test_fsdp.py OUT`."""
import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules, as a worker too

import bench  # noqa: E402
import carpe  # noqa: E402
import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVE_TIMEOUT_S = 60  # a mismatched gloo collective fails after this instead of 30 minutes


def tiny_carpe(checkpointing=False):
    llava, _ = tiny.tiny_llava(seed=0)
    torch.manual_seed(0)
    model = carpe.CARPE(llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=7, gradient_checkpointing=checkpointing))
    model.train()
    model.set_context_trainable(True)  # epoch 2: the context pass has a backward on every rank too
    return model


def micro_batches(llava):
    """(with an image, text-only), one sample each."""
    with_image = bench.make_batch(llava, 1, 9, 5, torch.device("cpu"), text_vocab=100)
    text = bench.make_batch(llava, 1, 12, 5, torch.device("cpu"), seed=1, text_vocab=100)
    text_only = dict(input_ids=text["input_ids"][:, text["input_ids"][0] != llava.config.image_token_id],
                     pixel_values=None)
    text_only["attention_mask"] = torch.ones_like(text_only["input_ids"])
    text_only["labels"] = text_only["input_ids"].clone()
    text_only["labels"][:, :-5] = -100
    return with_image, text_only


def shard_like_train(model):
    """train.wrap_model's FSDP2 layout: each decoder layer a unit, the rest under the root."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.llava.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    context = {p for name, p in model.named_parameters() if carpe.is_context_name(name)}
    fully_shard(model, mesh=mesh, ignored_params=context)
    model.set_reduce_scatter_unused_params(True)


def worker(out):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = [sharded_grads(checkpointing) for checkpointing in (False, True)]
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def sharded_grads(checkpointing):
    """Two micro-batches on each rank, one text-only and one with an image, in opposite orders:
    the gathered gradients."""
    rank = dist.get_rank()
    model = tiny_carpe(checkpointing)
    batches = micro_batches(model.llava)
    shard_like_train(model)
    for step in range(2):  # step 0: rank 1 text-only; step 1: rank 0 text-only
        model(**batches[(rank + step) % 2]).loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            if carpe.is_context_name(name):  # ignored by FSDP: plain local tensors, reduced by hand
                dist.all_reduce(g)
                g = g / dist.get_world_size()
            grads[name] = g
    return grads


def test_fsdp_ranks_text_only_and_with_image_with_and_without_checkpointing(tmp_path):
    out = str(tmp_path / "grads.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the 2-rank FSDP2 step hung: {(err.stderr or b'')[-2000:]}") from None
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # the reference: one process, both micro-batches of both steps, FSDP's mean over 2 ranks
    model = tiny_carpe()
    for batch in micro_batches(model.llava) * 2:
        model(**batch).loss.backward()
    reference = {name: p.grad / 2 for name, p in model.named_parameters() if p.grad is not None}
    for grads in torch.load(out):  # gradient checkpointing off, then on
        assert sorted(grads) == sorted(reference)
        for name, g in grads.items():
            torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6, msg=name)


if __name__ == "__main__":
    worker(sys.argv[1])
