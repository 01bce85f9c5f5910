"""kernels.py: attention against the eager formula; the fused mix + chunked linear
cross-entropy against the paper's two-matmul form, in loss and gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import (attention, eager_attention, fused_mixed_cross_entropy, reference_mixed_cross_entropy,
                     IGNORE_INDEX)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 9), (1, 5)])
def test_attention_matches_eager(causal, Tq, Tk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, Tq, 8), torch.randn(2, 3, Tk, 8), torch.randn(2, 3, Tk, 8)
    mask = torch.rand(2, 1, Tq, Tk) > 0.3
    own = torch.arange(Tq) + (Tk - Tq)  # each query's own key under a bottom-right aligned causal mask
    mask[..., torch.arange(Tq), own] = True  # so no row is fully masked
    for m in (None, mask):
        torch.testing.assert_close(attention(q, k, v, causal, m), eager_attention(q, k, v, causal, m),
                                   rtol=1e-5, atol=1e-5)


def make_inputs(B=3, T=11, d=16, V=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_vision = torch.randn(B, T, d, generator=g, requires_grad=True)
    h_llm = torch.randn(B, T, d, generator=g, requires_grad=True)
    # the context encoder's logits: weights = softmax(logits), as in the model. (With a head bias the
    # gradient w.r.t. the raw weights differs by the same constant for alpha and beta, which the
    # softmax cancels, because the fused form relies on alpha + beta = 1.)
    weight_logits = torch.randn(B, 2, generator=g).requires_grad_()
    head_weight = (torch.randn(V, d, generator=g) * 0.3).requires_grad_()
    head_bias = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # prompt
    labels[1, -3:] = IGNORE_INDEX  # right padding
    labels[2, ::2] = IGNORE_INDEX  # scattered
    return h_vision, h_llm, weight_logits, labels, head_weight, head_bias


def loss_and_grads(fn, inputs, **kw):
    h_vision, h_llm, weight_logits, labels, head_weight, head_bias = inputs
    tensors = [t for t in (h_vision, h_llm, weight_logits, head_weight, head_bias) if t is not None]
    for t in tensors:
        t.grad = None
    loss = fn(h_vision, h_llm, torch.softmax(weight_logits, -1), labels, head_weight, head_bias, **kw)
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk_size", [1000, 7, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_reference(chunk_size, bias):
    inputs = make_inputs(bias=bias)
    ref_loss, ref_grads = loss_and_grads(reference_mixed_cross_entropy, inputs)
    loss, grads = loss_and_grads(fused_mixed_cross_entropy, inputs, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_fused_with_frozen_head_and_scaled_output():
    h_vision, h_llm, weight_logits, labels, head_weight, head_bias = make_inputs()
    head_weight.requires_grad_(False)
    head_bias.requires_grad_(False)
    ref = 3.0 * reference_mixed_cross_entropy(h_vision, h_llm, torch.softmax(weight_logits, -1), labels, head_weight, head_bias)
    ref_grads = torch.autograd.grad(ref, [h_vision, h_llm, weight_logits])
    fused = 3.0 * fused_mixed_cross_entropy(h_vision, h_llm, torch.softmax(weight_logits, -1), labels, head_weight, head_bias, chunk_size=5)
    grads = torch.autograd.grad(fused, [h_vision, h_llm, weight_logits])
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_no_supervised_token_gives_zero_loss_and_grads():
    h_vision, h_llm, weight_logits, labels, head_weight, head_bias = make_inputs()
    labels[:] = IGNORE_INDEX
    loss = fused_mixed_cross_entropy(h_vision, h_llm, torch.softmax(weight_logits, -1), labels, head_weight, head_bias)
    loss.backward()
    assert loss.item() == 0.0
    assert head_weight.grad.abs().sum() == 0 and h_vision.grad.abs().sum() == 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_never_holds_more_than_one_chunk_of_logits():
    B, T, d, V, chunk = 4, 64, 8, 500, 16
    h_vision, h_llm, weight_logits, labels, head_weight, head_bias = make_inputs(B, T, d, V, bias=False)
    weights = torch.softmax(weight_logits, -1).detach()
    N = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert N * V > 4 * chunk * V
    with LargestTensor() as probe:
        fused_mixed_cross_entropy(h_vision, h_llm, weights, labels, head_weight, None, chunk_size=chunk).backward()
    # the head gradient (V, d) is the biggest thing: logits never exceed one (chunk, V) block
    assert probe.largest <= max(chunk * V, V * d)
    with LargestTensor() as probe:
        reference_mixed_cross_entropy(h_vision, h_llm, weights, labels, head_weight, None).backward()
    assert probe.largest >= B * T * V  # the naive path does materialise (B, T, V)


def test_fused_compiles():
    inputs = make_inputs()
    ref_loss, ref_grads = loss_and_grads(reference_mixed_cross_entropy, inputs)
    compiled = torch.compile(fused_mixed_cross_entropy, backend="aot_eager", fullgraph=False)
    loss, grads = loss_and_grads(compiled, inputs, chunk_size=8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
