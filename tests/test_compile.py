"""kernels.compile_blocks: regional compilation of the repeated blocks. A compiled CARPE training
step gives eager's loss and gradients; identical blocks share one graph (no recompile per layer);
a graph break or a block run out of cache entries is an error, never a silent fall-back to eager;
generation (whose layers carry a KV cache) still equals eager. The training-step test uses the
aot_eager backend (dynamo's graphs run through AOT autograd's traced forward and backward, no
code generation); set CARPE_INDUCTOR_TESTS=1 for the same check through inductor."""
import os

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch._dynamo.exc import FailOnRecompileLimitHit, Unsupported

import baselines
import bench
import carpe
import kernels
import moe
import tiny


def tiny_carpe(seed=0):
    """The tiny CARPE (6 LM layers, 3 CLIP layers, one integrator block), its integrator and
    context encoder moved off their identity / uniform start so every gradient is non-trivial."""
    llava, _ = tiny.tiny_llava(seed=seed)
    torch.manual_seed(seed)
    model = carpe.CARPE(llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=7))
    with torch.no_grad():
        for p in list(model.vision_integrator.parameters()) + list(model.context_encoder.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    model.set_context_trainable(True)  # epoch 2: the context pass runs backward too
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(model, batch, reference):
    loss, grads = loss_and_grads(model, batch)
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        assert (g - ref_grads[name]).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


def train_batches(llava):
    cpu = torch.device("cpu")
    return (bench.make_batch(llava, 2, 9, 5, cpu, text_vocab=100),
            bench.make_batch(llava, 3, 12, 7, cpu, seed=1, text_vocab=100))  # other batch size and length


def check_compiled_step(backend):
    torch._dynamo.reset()  # dynamo's caches live on code objects, shared with earlier tests
    model = tiny_carpe()
    batches = train_batches(model.llava)
    references = [loss_and_grads(model, b) for b in batches]
    kernels.reset_compile_counts()
    kernels.compile_blocks(carpe.repeated_blocks(model), backend=backend)
    for batch, reference in zip(batches, references):
        assert_same_step(model, batch, reference)
    counts = kernels.compile_counts()
    # one graph per kind of block: the 6 LM layers share one, the 3 CLIP layers one, the
    # integrator one; the second batch (other batch size and lengths) reuses them
    assert counts == kernels.CompileCounts(unique_graphs=3, graph_breaks=0, eager_calls=0)
    # epoch 1: the context pass runs without grad (guarded), one more graph for the LM layers only
    model.set_context_trainable(False)
    reference = None
    with torch.compiler.set_stance("force_eager"):  # the reference twin: the same blocks, eager
        reference = loss_and_grads(model, batches[0])
    assert_same_step(model, batches[0], reference)
    assert kernels.compile_counts() == kernels.CompileCounts(unique_graphs=4, graph_breaks=0, eager_calls=0)


def test_compiled_step_equals_eager_with_one_graph_per_kind_of_block():
    check_compiled_step("aot_eager")


@pytest.mark.skipif(not os.environ.get("CARPE_INDUCTOR_TESTS"),
                    reason="inductor generates and compiles C++ (minutes on a shared CPU); set CARPE_INDUCTOR_TESTS=1")
def test_inductor_step_equals_eager():
    check_compiled_step("inductor")


def moe_batches(llava, vision_moe):
    """Two image batches for the tiny CARPE-MoE, with each image in the MoE's dict of pixels."""
    images = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 200, 0), (0, 0, 255))]
    batches = train_batches(llava)
    for batch in batches:
        batch["pixel_values"] = vision_moe.preprocess(images[:batch["input_ids"].size(0)])
    return batches


def force_route(vision_moe, expert):
    """Every sample to `expert` (a large router bias), so each expert's tower runs and compiles."""
    with torch.no_grad():
        vision_moe.router.bias.zero_()
        vision_moe.router.bias[expert] = 20.0


def tiny_method(method):
    """A tiny model of `method` ("carpe-moe", "levi", "imagenet-ft") and its training batches,
    one per route for CARPE-MoE."""
    llava, _ = tiny.tiny_llava(seed=0)
    torch.manual_seed(0)
    if method == "carpe-moe":
        vision_moe = moe.build_vision_moe(llava, tiny.tiny_moe_config())
        model = baselines.build_model("carpe", llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=7),
                                      vision_moe=vision_moe)
        model.set_context_trainable(True)
        return model, moe_batches(llava, vision_moe)
    model = baselines.build_model(method, llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=7))
    if method == "levi":  # blocks off their identity start, so every gradient is non-trivial
        with torch.no_grad():
            for p in model.blocks.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model, train_batches(llava)


def check_method_compiles(method, backend):
    torch._dynamo.reset()
    model, batches = tiny_method(method)
    kernels.reset_compile_counts()
    kernels.compile_blocks(carpe.repeated_blocks(model), backend=backend)
    routes = range(len(model.vision_moe.expert_names)) if method == "carpe-moe" else [None]
    for route in routes:
        if route is not None:
            force_route(model.vision_moe, route)
        with torch.compiler.set_stance("force_eager"):  # the reference twin: the same blocks, eager
            reference = loss_and_grads(model, batches[0])
        assert_same_step(model, batches[0], reference)
        if route is not None:
            assert model(**batches[0]).route.tolist() == [route] * 2
    counts = kernels.compile_counts()
    assert counts.graph_breaks == 0 and counts.eager_calls == 0
    # one graph per kind of block: LM layer, CLIP layer (+ integrator blocks; + the three other towers'
    # layers, CuMo's CLIP layer a second entry of CLIP's code for its MoE MLP)
    assert counts.unique_graphs == {"carpe-moe": 6, "levi": 3, "imagenet-ft": 2}[method]


@pytest.mark.parametrize("method", ["carpe-moe", "levi", "imagenet-ft"])
def test_every_method_compiles_and_its_step_equals_eager(method):
    """Each method's repeated blocks compiled for real (aot_eager: dynamo's fullgraph trace and
    AOT autograd's forward and backward graphs); a training step's loss and gradients equal
    the same blocks run eagerly. CARPE-MoE runs one step per expert, so every tower compiles
    (CuMo's sparse MoE layers inside its CLIP layers included). CARPE: the test above."""
    check_method_compiles(method, "aot_eager")


@pytest.mark.skipif(not os.environ.get("CARPE_INDUCTOR_TESTS"),
                    reason="inductor generates and compiles C++ (minutes on a shared CPU); set CARPE_INDUCTOR_TESTS=1")
@pytest.mark.parametrize("method", ["carpe-moe", "levi", "imagenet-ft"])
def test_every_method_with_inductor(method):
    check_method_compiles(method, "inductor")


def test_generation_with_compiled_blocks_equals_eager():
    model = tiny_carpe(seed=1)
    batch = train_batches(model.llava)[0]
    ids, pixels = batch["input_ids"][:, :-5], batch["pixel_values"]  # the prompts
    with torch.no_grad():
        reference = model.generate(ids, pixel_values=pixels, max_new_tokens=3)
        kernels.compile_blocks(carpe.repeated_blocks(model), backend="eager")  # no grad: nothing for aot to add
        kernels.reset_compile_counts()
        assert torch.equal(model.generate(ids, pixel_values=pixels, max_new_tokens=3), reference)
    # the context pass and the towers ran compiled; the LM layers' cached calls (prefill + 2 steps) eagerly
    counts = kernels.compile_counts()
    assert counts.graph_breaks == 0 and counts.unique_graphs >= 3
    assert counts.eager_calls == 3 * len(model.llava.model.language_model.layers)


class Block(nn.Module):
    def __init__(self, branch_on_data=False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.branch_on_data = branch_on_data

    def forward(self, x):
        if self.branch_on_data and x.sum() > 0:  # data-dependent Python control flow: a graph break
            x = -x
        return self.fc(x)


def test_a_graph_break_inside_a_block_is_an_error():
    block = Block(branch_on_data=True)
    kernels.compile_blocks([block], backend="eager")
    with pytest.raises(Unsupported):
        block(torch.randn(3, 4))


def test_a_block_out_of_cache_entries_raises_instead_of_running_eagerly():
    blocks = [Block(), Block()]
    kernels.compile_blocks(blocks, backend="eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        blocks[0](torch.randn(3, 4))
        blocks[1](torch.randn(5, 4))  # another instance, another batch size: the same graph
        with torch.no_grad(), pytest.raises(FailOnRecompileLimitHit):
            blocks[1](torch.randn(3, 4))  # grad mode is guarded: a second entry, past the limit of 1


def test_compile_blocks_refuses_twice_and_nothing():
    block = Block()
    kernels.compile_blocks([block], backend="eager")
    with pytest.raises(ValueError, match="Block"):
        kernels.compile_blocks([block], backend="eager")
    with pytest.raises(ValueError, match="no blocks"):
        kernels.compile_blocks([], backend="eager")


def test_checkpointed_text_only_step_compiles_and_equals_eager():
    """The 7B recipe's gradient checkpointing with --compile, one process (or DDP): a text-only
    micro-batch (no image, so nothing trainable upstream of the LM) used to be traced as an
    inference graph that refuses the recompute region's RNG ops. Epoch 1's state (context frozen)."""
    torch._dynamo.reset()
    llava, _ = tiny.tiny_llava(seed=0)
    torch.manual_seed(0)
    model = carpe.CARPE(llava, carpe.CarpeConfig(integrator_heads=4, chunk_size=7, gradient_checkpointing=True))
    model.train()
    with_image = bench.make_batch(llava, 2, 9, 5, torch.device("cpu"), text_vocab=100)
    text_only = dict(with_image, pixel_values=None,
                     input_ids=with_image["input_ids"].masked_fill(with_image["input_ids"] == llava.config.image_token_id, 5))
    batches = (text_only, with_image)
    references = [loss_and_grads(model, b) for b in batches]
    kernels.compile_blocks(carpe.repeated_blocks(model), backend="aot_eager")
    for b, reference in zip(batches, references):
        assert_same_step(model, b, reference)
