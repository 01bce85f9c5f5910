"""
kernels.py: the two hot paths of CARPE, plus the reference forms the tests compare them with.

1. `attention(q, k, v, causal, mask)`: multi-head attention on
   `torch.nn.functional.scaled_dot_product_attention`, which dispatches to flash /
   memory-efficient kernels on GPU. `eager_attention` is the softmax(QK^T/sqrt(d))V reference.

2. The logit mix plus the loss. The paper (appendix A.1) computes
       Z = alpha * H_vision W^T + beta * H_llm W^T
   and a cross-entropy on Z. The head W is linear and shared and alpha + beta = 1, so
       Z = (alpha * H_vision + beta * H_llm) W^T          (a bias b also carries over)
   exactly. `fused_mixed_cross_entropy` therefore mixes the hidden states, keeps only the
   supervised positions, and runs a chunked linear cross-entropy whose custom autograd never
   holds more than one (chunk, V) block of logits (in the spirit of Liger-Kernel's
   FusedLinearCrossEntropy: the gradient is computed chunk by chunk inside the forward).
   With a trainable head this is 3 N x d x V matmuls (logits, dL/dH, dL/dW) against the
   naive path's 6 (2 forward, 4 backward). `reference_mixed_cross_entropy` is the paper's
   two-matmul form, kept for the tests and bench.py.

3. `compile_blocks(blocks)`: regional torch.compile of the model's repeated blocks (each LM
   decoder layer, each vision-tower layer, the integrator block), leaving the data-dependent
   glue between them eager. Its reference twin is the same blocks uncompiled; see its
   docstring for why identical blocks share one compiled graph.

Labels follow the Hugging Face convention: `labels` has the input's shape, -100 marks
unsupervised positions, and position t's hidden state predicts labels[t + 1].
"""
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters as dynamo_counters

IGNORE_INDEX = -100


# -----------------------------------------------------------------------------
# attention

def attention(q, k, v, causal=False, mask=None):
    """q (B, h, Tq, hd), k/v (B, h, Tk, hd); mask: bool, True = may attend, broadcastable
    to (B, h, Tq, Tk). With causal and no mask this takes the fused causal kernel."""
    Tq, Tk = q.size(-2), k.size(-2)
    if causal and (mask is not None or Tq != Tk):  # SDPA's is_causal is top-left aligned
        mask = True if mask is None else mask
        # bottom-right aligned causal mask, so a query block that follows a cache is right too
        tri = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        mask = mask & tri
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def eager_attention(q, k, v, causal=False, mask=None):
    """The textbook formula, for tests."""
    scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5  # (B, h, Tq, Tk)
    Tq, Tk = q.size(-2), k.size(-2)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(diagonal=Tk - Tq)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# -----------------------------------------------------------------------------
# mix + linear cross-entropy

def reference_mixed_cross_entropy(h_vision, h_llm, weights, labels, head_weight, head_bias=None):
    """The paper's form: two full head matmuls, mix the logits, full cross-entropy.
    h_vision, h_llm (B, T, d); weights (B, 2) as (alpha, beta); labels (B, T)."""
    z_vision = F.linear(h_vision, head_weight, head_bias)  # (B, T, V)
    z_llm = F.linear(h_llm, head_weight, head_bias)  # (B, T, V)
    alpha = weights[:, 0, None, None]
    beta = weights[:, 1, None, None]
    logits = alpha * z_vision + beta * z_llm  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def mix_supervised(h_vision, h_llm, weights, labels):
    """Mix the hidden states at the supervised positions only.
    Returns mixed (N, d) and targets (N,), N = number of supervised tokens."""
    targets = labels[:, 1:]  # (B, T-1)
    supervised = targets != IGNORE_INDEX  # (B, T-1)
    batch_index = supervised.nonzero()[:, 0]  # (N,)
    w = weights[batch_index]  # (N, 2)
    mixed = w[:, :1] * h_vision[:, :-1][supervised] + w[:, 1:] * h_llm[:, :-1][supervised]  # (N, d)
    return mixed, targets[supervised]


def _compute_dtype(x):
    # under autocast, run the chunk matmuls in the autocast dtype (bf16 on GPU), as F.linear would
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(hidden[n] @ W^T + b, target[n]), computed chunk by chunk.

    The forward computes the gradients as it goes (softmax - onehot is all the backward
    needs), so at most one (chunk, V) logits block is alive at any time, and the backward
    only rescales the stored gradients by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        N, d = hidden.shape
        dtype = _compute_dtype(hidden)
        need_weight_grad = weight.requires_grad
        need_bias_grad = bias is not None and bias.requires_grad
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h_all = hidden.to(dtype)
            grad_hidden = torch.empty(N, d, dtype=hidden.dtype, device=hidden.device)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias_grad else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            V = weight.size(0)
            # one logits buffer reused by every chunk: no (c, V) allocation (and, on CPU, no fresh
            # pages to fault in) per chunk; softmax and its gradient are computed in it in place
            buffer = torch.empty(min(chunk_size, N), V, dtype=dtype, device=hidden.device)
            for start in range(0, N, chunk_size):
                h = h_all[start:start + chunk_size]  # (c, d)
                t = targets[start:start + chunk_size]  # (c,)
                c = h.size(0)
                rows = torch.arange(c, device=t.device)
                logits = buffer[:c]  # (c, V), the only N x V-sized tensor alive
                if b is None:
                    torch.mm(h, w.t(), out=logits)
                else:
                    torch.addmm(b, h, w.t(), out=logits)
                if dtype != torch.float32:
                    logits = logits.float()  # softmax in fp32 (one fp32 chunk under bf16 autocast)
                target_logit = logits[rows, t]  # (c,)
                # log-sum-exp by hand, in place: torch.logsumexp would allocate a (c, V) temporary
                row_max = logits.amax(dim=-1, keepdim=True)  # (c, 1)
                probs = logits.sub_(row_max).exp_()  # (c, V) exp(z - max), in place
                sum_exp = probs.sum(dim=-1, keepdim=True)  # (c, 1)
                loss += (row_max.squeeze(1) + sum_exp.log().squeeze(1) - target_logit).sum()
                # d(mean CE)/d(logits) = (softmax - onehot) / N, again in place
                grad_logits = probs.mul_((sum_exp * N).reciprocal_())
                grad_logits[rows, t] -= 1.0 / N
                grad_logits_c = grad_logits.to(dtype)  # no copy in fp32
                # write/accumulate the matmul results in place: no (c, d) or (V, d) temporaries
                if grad_hidden.dtype == dtype:
                    torch.mm(grad_logits_c, w, out=grad_hidden[start:start + c])  # (c, d)
                else:
                    grad_hidden[start:start + c] = grad_logits_c @ w
                if need_weight_grad:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad_logits_c.t(), h)  # (V, d)
                    else:
                        grad_weight += (grad_logits_c.t() @ h).float()
                if need_bias_grad:
                    grad_bias += grad_logits.sum(0)
                del logits, probs, grad_logits, grad_logits_c
            del buffer
        ctx.save_for_backward(grad_hidden,
                              grad_weight if grad_weight is not None else torch.empty(0),
                              grad_bias if grad_bias is not None else torch.empty(0))
        ctx.has_weight_grad = need_weight_grad
        ctx.has_bias_grad = need_bias_grad
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss / N

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # the loss is almost always the final scalar (grad_output == 1): then the stored
        # gradients are already the answer, and scaling them would copy a (V, d) tensor
        # (the check reads the value, so a compiled graph skips it and always scales)
        if torch.compiler.is_compiling() or grad_output.numel() != 1 or grad_output.item() != 1.0:
            grad_hidden = grad_hidden * grad_output
            grad_weight = grad_weight * grad_output if ctx.has_weight_grad else grad_weight
            grad_bias = grad_bias * grad_output if ctx.has_bias_grad else grad_bias
        grad_weight = grad_weight.to(ctx.weight_dtype) if ctx.has_weight_grad else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.has_bias_grad else None
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_linear_cross_entropy(hidden, weight, bias, targets, chunk_size=1024):
    """hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) -> mean CE (scalar)."""
    if hidden.size(0) == 0:  # no supervised token: a zero that still belongs to the graph
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)


def fused_mixed_cross_entropy(h_vision, h_llm, weights, labels, head_weight, head_bias=None,
                              chunk_size=1024):
    """Equal (loss and gradients) to reference_mixed_cross_entropy, without (N, V) logits."""
    mixed, targets = mix_supervised(h_vision, h_llm, weights, labels)  # (N, d), (N,)
    return chunked_linear_cross_entropy(mixed, head_weight, head_bias, targets, chunk_size)


# -----------------------------------------------------------------------------
# regional compilation

def compile_blocks(blocks, backend="inductor", mode=None):
    """Compile each block's forward in place with torch.compile; the rest of the model stays eager.

    Why per block and not the whole model: CARPE's forward is full of data-dependent shapes
    (the image-token scatter, the per-sample packing of the context pass, the gather of the
    supervised positions). Compiled whole, dynamo breaks the graph at each of them and a
    32-layer step takes many minutes to compile. The blocks in between are where the FLOPs are,
    and their shapes depend only on (batch, length).

    Why identical blocks share one graph (no raised cache limits): dynamo stores compiled code
    on the Python code object (its co_extra slot), as a list of (guards, code) entries, not on
    the module instance. Every LlamaDecoderLayer runs the same `forward` code, and since torch
    2.5 (`torch._dynamo.config.inline_inbuilt_nn_modules`, on by default) a module's parameters
    and buffers are inputs of the graph, not constants guarded by the instance's id. So the
    graph traced for layer 0 passes layer 31's guards too: 32 layers cost one trace and one
    compile, and `recompile_limit` (8 entries per code object) is never approached by the
    layer count. What does fill entries are shapes and modes, hence:
    - `dynamic=True`: the same LM layers run the context pass (S prompt tokens + 1) and the
      main pass (T tokens), and both lengths change from batch to batch. Symbolic (batch,
      length) from the first trace give one graph for all of them, where dynamo's default
      (static first, dynamic after the first mismatch) would compile every block twice.
    - `fullgraph=True`: a graph break inside a block is an error, not a silent split; and a
      block whose code object runs out of cache entries raises (torch/_dynamo/convert_frame.py
      turns the recompile limit into FailOnRecompileLimitHit under fullgraph) instead of
      running eagerly from then on. Grad mode is guarded, so the epoch-1 context pass (no
      grad) adds one entry per kind of block; HF's layers of every kind share one code object
      (transformers' GradientCheckpointingLayer wraps each class's forward in the same
      `forward_with_checkpointing`), so the limit counts entries over all of them.
    - the block's `forward` is compiled, not its `__call__` (`module.compile()` compiles
      `_call_impl`): module hooks run eagerly around the compiled region. FSDP2's unshard /
      reshard hooks therefore keep working when this is called after `fully_shard` (per-block
      all-gathers, as torchtitan composes them), and the forward hooks that capture a layer's
      output (carpe.run_language_model, carpe.hidden_state_at), added and removed on every
      call, stay plain Python (dynamo does not guard on hooks: `skip_nnmodule_hook_guards`).
    - calls with a KV cache (`past_key_values`, generation's prefill and decode steps) run
      eagerly: transformers' cache is a list indexed by the layer's own `layer_idx`, a Python
      int that dynamo must burn into the graph (guards on `past_key_values.layers[i]`), so each
      of the 32 layers would need its own graph. Full-sequence passes (training, the context
      pass, scoring) have no cache and run compiled; such calls are counted (compile_counts), so
      a training forward that leaves HF's `use_cache` on (HF then builds a cache) shows up.
    Hooks that a block's submodules carry do run inside the compiled region: HF's output-capturing
    hooks (installed on every submodule once a caller asks HF for hidden states or attentions)
    read a ContextVar dynamo cannot trace, a graph break; take intermediate outputs with forward
    hooks on the blocks themselves, as carpe.hidden_state_at does.
    `torch.compiler.nested_compile_region` solves the same sharing inside a whole-program
    compile (one subgraph traced once, called per layer); with the glue eager there is no outer
    program to compile, so plain per-block compilation is the simpler tool.

    blocks: iterable of nn.Module (e.g. carpe.repeated_blocks(model)); backend: "inductor",
    "aot_eager" (tracing and autograd only: fast, for tests), ...; mode: torch.compile's mode.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("compile_blocks: no blocks given")
    for i, block in enumerate(blocks):
        if "forward" in vars(block):  # an instance-level forward: compiled already (or patched)
            raise ValueError(f"compile_blocks: block {i} ({type(block).__name__}) has its own forward already; "
                             f"compile each block once")
        block.forward = compiled_unless_cached(block.forward, backend, mode)


def compiled_unless_cached(forward, backend, mode):
    """forward compiled, except for calls that carry a Hugging Face KV cache (see compile_blocks)."""
    compiled = torch.compile(forward, backend=backend, mode=mode, dynamic=True, fullgraph=True)

    def block_forward(*args, **kwargs):
        if kwargs.get("past_key_values") is not None:
            EAGER_CALLS["kv_cache"] += 1  # counted: a training forward that forgot use_cache=False shows here
            return forward(*args, **kwargs)  # a generation step: the layer indexes the cache by its own id
        return compiled(*args, **kwargs)
    block_forward.compiled = compiled
    return block_forward


EAGER_CALLS = Counter()  # block calls compile_blocks routed to the eager forward, by reason


@dataclass
class CompileCounts:
    """Since the last reset_compile_counts(): the graphs dynamo traced (one per cache entry, so
    graphs beyond one per kind of block are recompiles), the graph breaks it met (fullgraph=True
    makes those an error inside compiled blocks; the count is for whole-model compiles), and the
    calls of compiled blocks that ran eagerly because they carried a KV cache."""
    unique_graphs: int
    graph_breaks: int
    eager_calls: int


def reset_compile_counts():
    dynamo_counters.clear()
    EAGER_CALLS.clear()


def compile_counts():
    return CompileCounts(unique_graphs=dynamo_counters["stats"]["unique_graphs"],
                         graph_breaks=sum(dynamo_counters["graph_break"].values()),
                         eager_calls=sum(EAGER_CALLS.values()))
