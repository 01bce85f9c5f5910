"""
carpe.py: CARPE (Context-Aware Image Representation Prioritization via Ensemble) wrapped
around a Hugging Face LLaVA-1.5-style model (`LlavaForConditionalGeneration`, transformers 5.x).
The paper's baselines (vanilla LLaVA, LEVI) live in baselines.py, on the same LlavaWrapper.

    llava, processor = load_base("llava-hf/llava-1.5-7b-hf")
    model = CARPE(llava, CarpeConfig())
    out = model(input_ids=..., attention_mask=..., pixel_values=..., labels=...)
    out.loss / out.logits (B, T, V) / out.context_weights (B, 2) as (vision, language)
    out = model.generate(input_ids, attention_mask, pixel_values, max_new_tokens=32, eos_token_id=2,
                         return_dict=True)   # out.sequences, out.context_weights, out.route

One forward pass (CARPE.forward, top to bottom):
 1. Context pass, text only: the prompt tokens (before the first supervised token; image and pad
    tokens removed) plus the learnable context prompt go through the LM; the prompt's final hidden
    state h_ctx (B, d) gives (alpha, beta) = softmax(W_ctx h_ctx). A separate pass, so the weights
    depend on the instruction only and CARPE-MoE's router can read h_ctx before any image is encoded.
 2. Main pass: the ordinary LLaVA forward. Keep H_llm (after the final norm) and H_pen (the
    output of decoder layer `query_layer`, -2 = second-to-last) through a forward hook.
 3. Vision integrator: raw vision features F (what the projector reads, CLS dropped likewise) ->
    new 2-layer MLP adapter -> memory M (B, P, d). One pre-norm block with queries H_pen:
    cross-attention to M, *causal* self-attention, MLP; its output projections start at zero (the
    identity at step 0). The LM's frozen final norm maps it to the head's input: H_vision (B, T, d).
 4. Mix: Z = (alpha H_vision + beta H_llm) W^T, exactly the paper's alpha H_vision W^T +
    beta H_llm W^T; the loss goes through kernels.py's fused path.

Bases: any LlavaForConditionalGeneration, whatever its text model (Llama, Mistral, Qwen2, Gemma,
Phi, ...) and vision tower (CLIP, SigLIP), with an int or list-valued vision_feature_layer and the
"default" or "full" feature strategy. Other LLaVA variants (NeXT, OneVision, ...) tile images
differently and are refused by class name.

Counting at 7B without 7B of memory: every model here builds on the meta device,
    model = CARPE(meta_llava())            # inside `with torch.device("meta"):`; meta_llava() = llava-1.5-7b's shapes
    count_parameters(model)                # ParameterCount: trainable, frozen, parts, adamw_gib

Choices the paper leaves open:
 - The context encoder Linear(d, 2) starts at zero: (alpha, beta) = (0.5, 0.5) while frozen in epoch 1.
 - The context prompt starts as a random vector with the token embeddings' scale (Gemma's sqrt(d) included).
 - A tied lm_head is untied (cloned) so that training the head leaves the frozen embeddings.
"""
import os
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from PIL import Image
from transformers import (AutoConfig, AutoProcessor, CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

from kernels import attention, fused_mixed_cross_entropy, IGNORE_INDEX


@dataclass
class CarpeConfig:
    integrator_heads: int = 32  # heads of the integrator's attentions (d must divide)
    mlp_ratio: float = 4.0  # integrator MLP width = mlp_ratio * d
    chunk_size: int = 1024  # tokens per chunk in the fused linear cross-entropy
    fixed_weights: tuple | None = None  # (vision, language): bypass the context encoder (ablation; (0, 1) = vanilla LLaVA)
    query_layer: int = -2  # LM decoder layer whose output gives the integrator's queries (-2 = paper, -1 = ablation)
    integrator_self_attn: bool = True  # False = ablation without the integrator's self-attention
    gradient_checkpointing: bool = False  # checkpoint the frozen LM's decoder layers (LEVI: its blocks; use at 7B)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if d.get("fixed_weights") is not None:
            d["fixed_weights"] = tuple(d["fixed_weights"])
        return cls(**d)


@dataclass
class CarpeOutput:
    loss: torch.Tensor | None = None  # lm loss (+ MoE balance loss, weighted)
    logits: torch.Tensor | None = None  # (B, T, V), only without labels
    context_weights: torch.Tensor | None = None  # (B, 2) as (vision, language)
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None  # CARPE-MoE only
    route: torch.Tensor | None = None  # (B,) chosen expert, -1 for samples without image; MoE only


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, T + new)
    context_weights: torch.Tensor  # (B, 2)
    route: torch.Tensor | None = None  # (B,) MoE only


@dataclass
class Prepared:
    """Everything computed before the LM's main pass; shared by forward and generate."""
    attention_mask: torch.Tensor  # (B, T)
    inputs_embeds: torch.Tensor  # (B, T, d) token embeddings, image embeddings scattered in
    weights: torch.Tensor  # (B, 2) context weights (vision, language)
    has_image: torch.Tensor  # (B,) bool
    memory: torch.Tensor | None = None  # (B, P, d) what the integrator attends to; None if no image
    balance_loss: torch.Tensor | None = None  # CARPE-MoE only
    route: torch.Tensor | None = None  # (B,) CARPE-MoE only


@dataclass
class KVCache:  # an integrator block's preallocated self-attention cache
    k: torch.Tensor  # (B, h, T_max, hd)
    v: torch.Tensor  # (B, h, T_max, hd)


@dataclass
class GenerationState:
    """What greedy decoding carries from step to step."""
    prepared: Prepared
    lm_cache: DynamicCache  # the LM's KV cache
    memory_kvs: list  # per integrator block: cross-attention (K, V) over the memory, or None
    integrator_caches: list  # per integrator block: its self-attention KVCache, or None
    cache_len: int = 0  # tokens already in the integrator caches


# -----------------------------------------------------------------------------
# the vision integrator

class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its (fp32, trained) weight cast to the input's dtype: under bf16 autocast
    outside FSDP, mixed dtypes would skip the fused kernel and compute in fp32."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class MultiHeadAttention(nn.Module):
    """Queries from x; keys/values from whatever `project_kv` was given (x itself, or M)."""

    def __init__(self, d, n_head):
        super().__init__()
        assert d % n_head == 0, f"integrator width {d} is not divisible by integrator_heads={n_head}"
        self.n_head = n_head
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)  # a key bias shifts every score of a query equally: softmax drops it
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def split_heads(self, x):  # (B, T, d) -> (B, h, T, hd)
        B, T, d = x.shape
        return x.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)

    def project_kv(self, source):  # (B, S, d) -> 2 x (B, h, S, hd)
        return self.split_heads(self.k(source)), self.split_heads(self.v(source))

    def forward(self, x, k, v, causal=False, mask=None):
        q = self.split_heads(self.q(x))  # (B, h, T, hd)
        y = attention(q, k, v, causal=causal, mask=mask)  # (B, h, T, hd)
        B, h, T, hd = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, h * hd))


class IntegratorBlock(nn.Module):
    """x = x + CrossAttn(norm(x), M); x = x + CausalSelfAttn(norm(x)); x = x + MLP(norm(x)).
    Used by CARPE (one block) and by the LEVI baseline (five blocks)."""

    def __init__(self, d, n_head, mlp_ratio=4.0, self_attn=True):
        super().__init__()
        self.norm_cross = RMSNorm(d)
        self.cross_attn = MultiHeadAttention(d, n_head)
        self.norm_self = RMSNorm(d) if self_attn else None
        self.self_attn = MultiHeadAttention(d, n_head) if self_attn else None
        self.norm_mlp = RMSNorm(d)
        self.mlp = MLP(d, int(mlp_ratio * d), d)
        # residual branches start at zero: the block is the identity at step 0
        for proj in [self.cross_attn.o, self.mlp.proj] + ([self.self_attn.o] if self_attn else []):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def new_cache(self, batch_size, max_len):
        """Preallocated self-attention KV cache, so a decode step copies nothing old."""
        if self.self_attn is None:
            return None
        w, n_head = self.self_attn.k.weight, self.self_attn.n_head
        shape = (batch_size, n_head, max_len, w.size(0) // n_head)
        return KVCache(*(torch.empty(shape, dtype=w.dtype, device=w.device) for _ in "kv"))

    def memory_kv(self, memory):
        """Cross-attention K/V over the memory M (B, P, d), computed once per prompt; None = no image."""
        return self.cross_attn.project_kv(memory) if memory is not None else None

    def forward(self, x, memory_kv, has_image, key_valid=None, cache=None, cache_len=0):
        """x (B, T, d) queries; memory_kv from memory_kv(); has_image (B,) bool; key_valid (B, T_total)
        bool: the real (non-pad) self-attention positions, None = all. cache: a KVCache for
        incremental decoding, positions [cache_len, cache_len + T) are written."""
        if memory_kv is not None:
            cross = self.cross_attn(self.norm_cross(x), *memory_kv)  # (B, T, d)
            x = x + cross * has_image[:, None, None].to(cross.dtype)  # no image: no cross term
        if self.self_attn is not None:
            h = self.norm_self(x)
            k, v = self.self_attn.project_kv(h)  # (B, h, T, hd)
            T = x.size(1)
            if cache is not None:
                cache.k[:, :, cache_len:cache_len + T] = k
                cache.v[:, :, cache_len:cache_len + T] = v
                k, v = cache.k[:, :, :cache_len + T], cache.v[:, :, :cache_len + T]
            mask = None
            if key_valid is not None:
                Tk = k.size(2)
                mask = key_valid[:, None, None, :Tk].expand(-1, 1, T, -1).clone()  # (B, 1, T, Tk)
                # a query may always see itself: left-pad rows would otherwise be all -inf (NaN)
                own = torch.arange(T, device=x.device) + (Tk - T)
                mask[:, 0, torch.arange(T, device=x.device), own] = True
            x = x + self.self_attn(h, k, v, causal=True, mask=mask)
        x = x + self.mlp(self.norm_mlp(x))
        return x


class VisionIntegrator(nn.Module):
    def __init__(self, d_vision, d, config: CarpeConfig):
        super().__init__()
        self.raw_adapter = MLP(d_vision, d, d)  # new 2-layer adapter for raw vision features
        self.block = IntegratorBlock(d, config.integrator_heads, config.mlp_ratio, config.integrator_self_attn)


def context_prompt_init(embed, d):
    """A random (1, d) vector with the token embeddings' scale (Gemma's sqrt(d) included); on the
    meta device (shapes only) an empty meta tensor."""
    if embed.weight.is_meta:
        return torch.empty(1, d, device="meta")
    scale = float(getattr(embed, "embed_scale", 1.0))
    return torch.randn(1, d) * embed.weight.detach().float().std().item() * scale


def mix(weights, h_vision, h_llm):
    """alpha * H_vision + beta * H_llm for hidden states (B, ..., d) and weights (B, 2)."""
    shape = (-1,) + (1,) * (h_llm.dim() - 1)
    return (weights[:, 0].reshape(shape).to(h_vision.dtype) * h_vision
            + weights[:, 1].reshape(shape).to(h_llm.dtype) * h_llm)


# -----------------------------------------------------------------------------
# parts of the wrapped LLaVA, whatever its text model and vision tower

def check_base(llava):
    """Refuse what is not LLaVA-1.5-style (one image = one fixed grid of tokens), by class name."""
    if not isinstance(llava, LlavaForConditionalGeneration):
        raise TypeError(f"{type(llava).__name__} is not a LLaVA-1.5-style base: CARPE and its baselines wrap "
                        "LlavaForConditionalGeneration only")
    decoder_layers(llava.model.language_model)
    final_norm(llava.model.language_model)
    encoder_layers(llava.model.vision_tower)


def decoder_layers(language_model):
    """The ModuleList of decoder layers of a head-less HF text model."""
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot find the decoder layers (.layers) of {type(language_model).__name__}")
    return layers


def final_norm(language_model):
    """The text model's final norm: `norm` (Llama, Mistral, Qwen2, Gemma) or `final_layernorm` (Phi)."""
    for name in ("norm", "final_layernorm"):
        norm = getattr(language_model, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise TypeError(f"cannot find the final norm (.norm or .final_layernorm) of {type(language_model).__name__}")


def encoder_layers(encoder):
    """The ModuleList of transformer blocks of a CLIP / SigLIP / DINOv2 vision model."""
    for path in ("encoder.layers", "vision_model.encoder.layers", "encoder.layer"):
        module = encoder
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise TypeError(f"cannot find the encoder layers of {type(encoder).__name__}")


def keep_output(store, key):
    """A forward hook that puts a block's output (the first element of a tuple) in store[key]."""
    def hook(module, args, output):
        store[key] = output[0] if isinstance(output, tuple) else output
    return hook


def hidden_state_at(encoder, pixel_values, index):
    """encoder(pixel_values, output_hidden_states=True).hidden_states[index] (0 = the embeddings,
    i = block i-1's output), taken with forward hooks; a list of indices concatenates them on the
    feature dim, as HF LLaVA does. Not output_hidden_states: transformers 5 finds the modules to
    record by class name, which FSDP2's fully_shard changes, and then returns None."""
    layers = encoder_layers(encoder)
    n, indices = len(layers), ([index] if isinstance(index, int) else list(index))
    captured, handles = {}, []
    for j in indices:
        i = j + n + 1 if j < 0 else j
        if not 0 <= i <= n:
            raise ValueError(f"feature layer {j} is outside the {n + 1} hidden states of {type(encoder).__name__}")
        if i == 0:  # the embeddings: the input of the first block
            def keep_input(module, args, kwargs, j=j):
                captured[j] = args[0] if args else kwargs["hidden_states"]
            handles.append(layers[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        else:
            handles.append(layers[i - 1].register_forward_hook(keep_output(captured, j)))
    try:
        encoder(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    feats = [captured[j] for j in indices]  # each (n_img, tokens, Dv)
    return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)  # (n_img, tokens, Dv * len(indices))


def vision_feature_width(config):
    """Width of the raw features: the tower's width times the number of feature layers."""
    layer = config.vision_feature_layer
    return config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))


def raw_vision_features(llava, pixel_values):
    """The projector's input as HF LLaVA computes it: (n_img, P, Dv * n_layers), CLS dropped with
    the "default" strategy, every token kept with "full"."""
    cfg = llava.config
    feats = hidden_state_at(llava.model.vision_tower, pixel_values, cfg.vision_feature_layer)
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]  # drop CLS (the same token of every concatenated layer)
    return feats


def check_images(llava, input_ids, pixel_values):
    """(B,) bool: which samples have an image; their count must match pixel_values."""
    has_image = (input_ids == llava.config.image_token_id).any(1)
    n_img = int(has_image.sum())
    if isinstance(pixel_values, dict):  # CARPE-MoE: one tensor per expert, each (n_img, 3, S_e, S_e)
        pixel_values = next(iter(pixel_values.values()))
    n_pix = 0 if pixel_values is None else pixel_values.size(0)
    if n_pix != n_img:
        raise ValueError(f"{n_img} samples have image tokens but {n_pix} images were given in pixel_values")
    return has_image


def embed_inputs(llava, input_ids, image_embeds=None):
    """Token embeddings (the text model's own module, so Gemma's scale applies) with the image
    embeddings (n_img, P, d) scattered over the image tokens, as HF LLaVA does: (B, T, d)."""
    inputs_embeds = llava.model.language_model.get_input_embeddings()(input_ids)  # (B, T, d)
    if image_embeds is None:
        return inputs_embeds
    is_image_token = input_ids == llava.config.image_token_id  # (B, T)
    counts = is_image_token.sum(1)
    counts = counts[counts > 0]
    if (counts != image_embeds.size(1)).any():
        raise ValueError(f"each image needs exactly {image_embeds.size(1)} image tokens; got {counts.tolist()}")
    return inputs_embeds.masked_scatter(is_image_token[..., None], image_embeds.to(inputs_embeds.dtype))


def per_sample(image_rows, has_image, fill=0):
    """Spread per-image rows (n_img, ...) over the batch (B, ...), `fill` where no image."""
    out = image_rows.new_full((has_image.size(0),) + image_rows.shape[1:], fill)
    out[has_image] = image_rows
    return out


def positions_from_mask(attention_mask):
    """Position ids that skip left padding, as HF generate computes them: (B, T)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def run_language_model(language_model, inputs_embeds, attention_mask, position_ids, layer_indices,
                       past_key_values=None):
    """One LM pass (extending past_key_values if given) -> H_llm (B, T, d) after the final norm,
    [output (B, T, d) of each layer in layer_indices] (forward hooks: not every layer's kept)."""
    captured, layers = {}, decoder_layers(language_model)
    handles = [layers[i].register_forward_hook(keep_output(captured, slot)) for slot, i in enumerate(layer_indices)]
    try:
        out = language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=past_key_values is not None)
    finally:
        for handle in handles:
            handle.remove()
    return out.last_hidden_state, [captured[slot] for slot in range(len(layer_indices))]


def enable_checkpointing(language_model):
    """Checkpoint each decoder layer (non-reentrant). HF's hook making the input embeddings
    require grad is removed: it would run a frozen-LM backward on every pass, needed or not
    (LlavaWrapper.main_pass_inputs adds one only where the ranks or the compile need it)."""
    language_model.activation_checkpointing_enable({"use_reentrant": False})
    language_model.disable_input_require_grads()


def lm_is_sharded(language_model):
    """Whether FSDP2's fully_shard wraps the LM's decoder layers (one all-gather per layer per pass)."""
    return any(isinstance(layer, FSDPModule) for layer in decoder_layers(language_model))


def untie_head(llava):
    """A head tied to the input embeddings gets its own copy: training it must not move them."""
    if llava.lm_head.weight is llava.model.language_model.get_input_embeddings().weight:
        llava.lm_head.weight = nn.Parameter(llava.lm_head.weight.detach().clone())


# -----------------------------------------------------------------------------
# what CARPE and the baselines share: the trainable set (paper section 4.1), cached decoding

def is_context_name(name):
    """The context prompt and encoder: frozen for the whole first epoch."""
    return name == "context_prompt" or name.startswith("context_encoder.")


class TrainableSet:
    """The trainable-set API of every model here. A model defines is_trainable_name(name);
    freezing, the optimizer groups and the checkpoint tensors all follow from it."""

    def is_trainable_name(self, name):
        raise NotImplementedError

    def apply_freezing(self):
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_name(name))

    def set_context_trainable(self, trainable: bool):
        """Freeze / unfreeze the context prompt and encoder (a no-op for models without them)."""
        for name, p in self.named_parameters():
            if is_context_name(name):
                p.requires_grad_(trainable)

    def param_groups(self, lr_adapter=2e-5, lr=2e-4, weight_decay=0.0):
        """Two AdamW groups: the adapter(s) at lr_adapter, every other trainable tensor at lr; the
        frozen-for-now context prompt and encoder are included (AdamW skips them without a grad)."""
        adapter, rest = [], []
        for name, p in self.named_parameters():
            if self.is_trainable_name(name):  # adapters: LLaVA's projector and the MoE experts' LLM adapters
                is_adapter = "multi_modal_projector." in name or ".llm_adapters." in name
                (adapter if is_adapter else rest).append(p)
        return [dict(params=adapter, lr=lr_adapter, weight_decay=weight_decay, name="adapter"),
                dict(params=rest, lr=lr, weight_decay=weight_decay, name="rest")]

    def trainable_state_dict(self):
        return {name: p.detach() for name, p in self.named_parameters() if self.is_trainable_name(name)}

    def load_trainable_state_dict(self, state):
        """Copy a trainable_state_dict in; a missing, unexpected or mis-shaped tensor is an error naming it."""
        params = {name: p for name, p in self.named_parameters() if self.is_trainable_name(name)}
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or extra:
            raise ValueError(f"checkpoint does not fit this model (another method, base or config?): "
                             f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                             f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, this model has "
                                 f"{tuple(params[name].shape)} (another base or config?)")
            with torch.no_grad():
                params[name].copy_(tensor)


# bytes per trainable parameter under AdamW with fp32 master weights: weight + grad + exp_avg + exp_avg_sq
ADAMW_BYTES_PER_PARAM = 4 + 4 + 4 + 4


@dataclass
class ParameterCount:
    """What count_parameters(model) finds; each shared tensor is counted once."""
    trainable: int  # the method's trainable set (is_trainable_name: context prompt and encoder included)
    frozen: int  # everything else (the LM, the vision tower(s))
    parts: dict  # part name (trainable_part) -> trainable parameters in it, in module order

    @property
    def total(self):
        return self.trainable + self.frozen

    @property
    def adamw_gib(self):
        """The trainable set's training state: fp32 weights, fp32 grads and AdamW's two fp32 moments."""
        return self.trainable * ADAMW_BYTES_PER_PARAM / 2 ** 30

    @property
    def frozen_bf16_gib(self):
        return self.frozen * 2 / 2 ** 30


def trainable_part(name):
    """The part of the model a trainable parameter belongs to, by name (for counts and tables)."""
    if is_context_name(name):
        return "context"
    for prefix, part in (("llava.model.multi_modal_projector.", "projector"), ("llava.lm_head.", "head"),
                         ("vision_integrator.", "integrator"), ("blocks.", "blocks")):
        if name.startswith(prefix):
            return part
    if name.startswith("vision_moe."):  # moe.llm_adapters, moe.raw_adapters, moe.router
        return "moe." + name.split(".")[1]
    return name.split(".")[0]


def count_parameters(model):
    """Trainable / frozen parameter counts of CARPE, CARPE-MoE or a baseline, by part; works on the
    meta device (the 7B figures without 7B of memory)."""
    parts, trainable, frozen = {}, 0, 0
    for name, p in model.named_parameters():  # a shared tensor once (its first name)
        if model.is_trainable_name(name):
            part = trainable_part(name)
            parts[part] = parts.get(part, 0) + p.numel()
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParameterCount(trainable=trainable, frozen=frozen, parts=parts)


class LlavaWrapper(TrainableSet, nn.Module):
    """A model around a LLaVA (self.llava) with cached greedy decoding. A subclass defines
    prepare(...) -> Prepared, query_layers (the LM layers its integrator blocks read),
    integrator_blocks() and vision_hidden(...) (the hidden state that gets the vision weight)."""

    @property
    def language_model(self):
        return self.llava.model.language_model

    def integrator_blocks(self):
        return []

    def lm_input_trains(self):
        """Whether a trainable tensor sits upstream of the main pass's input: the adapters that
        make the image embeddings (the projector; CARPE-MoE's adapters and router)."""
        modules = [self.llava.model.multi_modal_projector] + [m for m in [getattr(self, "vision_moe", None)] if m]
        return any(p.requires_grad for m in modules for p in m.parameters())

    def main_pass_inputs(self, inputs_embeds):
        """inputs_embeds (B, T, d) for the main LM pass; under FSDP2 or gradient checkpointing,
        made a grad-requiring leaf when a micro-batch has no image but the image path trains.
        FSDP2: an image micro-batch backpropagates through every decoder layer (the projector's
        gradient crosses the LM) and all-gathers each layer again; a text-only one has nothing
        trainable upstream, so autograd would skip that backward and the ranks' collectives would
        no longer match (a hang). Leaving the LM unsharded instead would cost its 6.48B bf16
        parameters whole on every GPU (+10.5 GiB at 8 GPUs); this costs one frozen-LM backward on
        a text-only micro-batch, which the image ranks run in that step anyway. Checkpointing: a
        compiled checkpointed layer whose inputs need no gradient is traced as an inference graph,
        which refuses the recompute's RNG ops; this keeps every training micro-batch on the one
        training graph, as HF's input-grad hook did. (LEVI trains nothing upstream of the LM.)"""
        needs_backward = lm_is_sharded(self.language_model) or self.language_model.is_activation_checkpointing
        if torch.is_grad_enabled() and not inputs_embeds.requires_grad and needs_backward and self.lm_input_trains():
            return inputs_embeds.detach().requires_grad_()
        return inputs_embeds

    # --- loading, sharing and asking: pretrained.py does the work; the imports are deferred
    # because it sits above carpe.py (imports point down only).
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        import pretrained
        return pretrained.load(path, device=device, dtype=dtype, expect=cls)

    def save_pretrained(self, folder, **kwargs):
        import pretrained
        return pretrained.save_pretrained(self, folder, **kwargs)

    def push_to_hub(self, repo_id, **kwargs):
        import pretrained
        return pretrained.push_to_hub(self, repo_id, **kwargs)

    def ask(self, image, question, max_new_tokens=64, return_dict=False, **kwargs):
        import pretrained
        return pretrained.ask(self, image, question, max_new_tokens=max_new_tokens, return_dict=return_dict, **kwargs)

    def start_generation(self, input_ids, attention_mask, pixel_values, max_new_tokens):
        """Once per prompt: the context weights, the MoE route, the cross-attention K/V, empty KV caches."""
        prep = self.prepare(input_ids, attention_mask, pixel_values)
        B, T = input_ids.shape
        blocks = self.integrator_blocks()
        return GenerationState(prepared=prep, lm_cache=DynamicCache(config=self.language_model.config),
                               memory_kvs=[block.memory_kv(prep.memory) for block in blocks],
                               integrator_caches=[block.new_cache(B, T + max_new_tokens) for block in blocks])

    def generation_step(self, state, inputs_embeds, attention_mask, position_ids):
        """One cached LM + integrator-blocks step over the new tokens -> the last position's mixed logits (B, V)."""
        h_llm, captured = run_language_model(self.language_model, inputs_embeds, attention_mask,
                                             position_ids, self.query_layers, state.lm_cache)
        h_vision = self.vision_hidden(h_llm, captured, state.memory_kvs, state.prepared.has_image,
                                      attention_mask.bool(), state.integrator_caches, state.cache_len)
        state.cache_len += inputs_embeds.size(1)
        return self.llava.lm_head(mix(state.prepared.weights, h_vision[:, -1], h_llm[:, -1]))  # (B, V)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens=32,
                 eos_token_id=None, pad_token_id=None, return_dict=False):
        """Greedy decoding of left-padded prompts, finished rows filled with the pad token as HF
        generate does: (B, T + new) token ids, or with return_dict=True a GenerateOutput."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts (attention_mask[:, -1] must be 1): "
                             "set tokenizer.padding_side = 'left'")
        if pad_token_id is None:
            pad_token_id = self.llava.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_token_id if isinstance(eos_token_id, int) else 0
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long, device=input_ids.device)
        state = self.start_generation(input_ids, attention_mask, pixel_values, max_new_tokens)
        position_ids = positions_from_mask(attention_mask)
        logits = self.generation_step(state, state.prepared.inputs_embeds, attention_mask, position_ids)  # prefill
        unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
        sequences = input_ids
        embed_tokens = self.language_model.get_input_embeddings()
        for step in range(max_new_tokens):
            next_tokens = logits.argmax(-1)  # (B,)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
            if eos.numel():
                unfinished &= ~torch.isin(next_tokens, eos)
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            # one new token per row: extend the mask and positions, run one cached step
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            logits = self.generation_step(state, embed_tokens(next_tokens[:, None]), attention_mask, position_ids)
        if return_dict:
            return GenerateOutput(sequences=sequences, context_weights=state.prepared.weights, route=state.prepared.route)
        return sequences


# -----------------------------------------------------------------------------
# CARPE

class CARPE(LlavaWrapper):
    def __init__(self, llava, config: CarpeConfig = None, vision_moe=None):
        super().__init__()
        check_base(llava)
        self.config = config = config or CarpeConfig()
        self.llava = llava
        d, n_layers = llava.config.text_config.hidden_size, llava.config.text_config.num_hidden_layers
        assert -n_layers <= config.query_layer < n_layers, \
            f"query_layer={config.query_layer} is outside the LM's {n_layers} layers"
        untie_head(llava)
        self.query_layers = [config.query_layer]  # the integrator's queries: H_pen
        self.vision_integrator = VisionIntegrator(vision_feature_width(llava.config), d, config)
        self.context_prompt = nn.Parameter(context_prompt_init(self.language_model.get_input_embeddings(), d))  # (1, d)
        self.context_encoder = nn.Linear(d, 2)
        for p in self.context_encoder.parameters():
            nn.init.zeros_(p)
        self.vision_moe = vision_moe  # moe.VisionMoE or None
        # the new modules take the base's device and dtype (train.py keeps trainable tensors in fp32)
        self.to(device=llava.lm_head.weight.device)
        for module in (self.vision_integrator, self.context_encoder):
            module.to(dtype=llava.lm_head.weight.dtype)
        self.context_prompt.data = self.context_prompt.data.to(llava.lm_head.weight.dtype)
        self.apply_freezing()
        if config.gradient_checkpointing:
            enable_checkpointing(self.language_model)

    def is_trainable_name(self, name):
        """The paper's trainable set: adapter (projector), head, integrator, context prompt and
        encoder (+ MoE adapters and router). Independent of the epoch-1 freeze."""
        if name.startswith("vision_moe."):
            return self.vision_moe.is_trainable_name(name[len("vision_moe."):])
        return name.startswith(("llava.model.multi_modal_projector.", "llava.lm_head.", "vision_integrator.",
                                "context_prompt", "context_encoder."))

    # --- 1. context pass -------------------------------------------------------------------
    def prompt_mask(self, input_ids, attention_mask, labels=None):
        """(B, T) bool: the tokens the context pass reads. Prompt = before the first supervised
        token (with labels) or every non-pad token (without); image tokens excluded."""
        keep = attention_mask.bool() & (input_ids != self.llava.config.image_token_id)
        if labels is not None:
            supervised = labels != IGNORE_INDEX  # (B, T)
            T = labels.size(1)
            first = torch.where(supervised.any(1), supervised.float().argmax(1),
                                torch.full_like(supervised[:, 0], T, dtype=torch.long))  # (B,)
            keep &= torch.arange(T, device=labels.device)[None, :] < first[:, None]
        return keep

    def context_hidden(self, input_ids, attention_mask, labels=None):
        """Run the text-only context pass. Returns h_ctx (B, d)."""
        keep = self.prompt_mask(input_ids, attention_mask, labels)  # (B, T)
        lengths = keep.sum(1)  # (B,)
        B, L = input_ids.size(0), int(lengths.max()) + 1  # L: + the context prompt
        # left-pad the kept tokens so the context prompt sits at the last position of every row
        ids = torch.zeros(B, L, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
        for b in range(B):
            n = int(lengths[b])
            ids[b, L - 1 - n:L - 1] = input_ids[b][keep[b]]
            mask[b, L - 1 - n:] = 1
        embeds = self.language_model.get_input_embeddings()(ids)  # (B, L, d)
        ctx = self.context_prompt.to(embeds.dtype).expand(B, 1, -1)  # (B, 1, d)
        embeds = torch.cat([embeds[:, :-1], ctx], dim=1)  # (B, L, d)
        h, _ = run_language_model(self.language_model, embeds, mask, positions_from_mask(mask), [])
        return h[:, -1]  # (B, d)

    def context(self, input_ids, attention_mask, labels=None):
        """Returns (context_weights (B, 2), h_ctx (B, d) or None)."""
        B = input_ids.size(0)
        h_ctx = None
        if self.config.fixed_weights is None or self.vision_moe is not None:
            # nothing upstream of h_ctx trains while the context prompt is frozen (epoch 1)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.context_prompt.requires_grad):
                h_ctx = self.context_hidden(input_ids, attention_mask, labels)
        if self.config.fixed_weights is not None:
            weights = torch.tensor(self.config.fixed_weights, dtype=torch.float32, device=input_ids.device).expand(B, 2)
        else:
            weights = torch.softmax(self.context_encoder(h_ctx).float(), dim=-1)  # (B, 2)
        return weights, h_ctx

    # --- image encoding and everything else before the main pass ------------------------------
    def encode_images(self, pixel_values, h_ctx_images):
        """-> image_embeds (n_img, P, d) for the LM, memory (n_img, P, d), balance_loss, route (n_img,)."""
        if self.vision_moe is not None:
            return self.vision_moe(pixel_values, h_ctx_images)
        feats = raw_vision_features(self.llava, pixel_values)  # (n_img, P, Dv)
        image_embeds = self.llava.model.multi_modal_projector(feats)  # (n_img, P, d)
        memory = self.vision_integrator.raw_adapter(feats)  # (n_img, P, d)
        return image_embeds, memory, None, None

    def prepare(self, input_ids, attention_mask, pixel_values, labels=None, context_mask=None):
        """The context weights, the input embeddings with the image embeddings scattered in, and
        the integrator memory: a Prepared. Shared by forward and generate."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weights, h_ctx = self.context(input_ids, attention_mask if context_mask is None else context_mask, labels)
        has_image = check_images(self.llava, input_ids, pixel_values)  # (B,)
        image_embeds, memory, balance_loss, route = None, None, None, None
        if has_image.any():
            image_embeds, image_memory, balance_loss, image_route = self.encode_images(
                pixel_values, h_ctx[has_image] if h_ctx is not None else None)  # (n_img, P, d) x 2
            memory = per_sample(image_memory, has_image)  # (B, P, d)
            if image_route is not None:
                route = per_sample(image_route, has_image, fill=-1)  # (B,)
        return Prepared(attention_mask=attention_mask, inputs_embeds=embed_inputs(self.llava, input_ids, image_embeds),
                        weights=weights, has_image=has_image, memory=memory, balance_loss=balance_loss, route=route)

    # --- 3. the integrator -----------------------------------------------------------------
    def integrate(self, h_query, memory_kv, has_image, key_valid=None, cache=None, cache_len=0):
        """H_vision = final_norm(block(H_query)): (B, T, d)."""
        x = self.vision_integrator.block(h_query, memory_kv, has_image, key_valid, cache, cache_len)
        return final_norm(self.language_model)(x)

    def memory_kv(self, memory):
        return self.vision_integrator.block.memory_kv(memory)

    def integrator_blocks(self):
        return [self.vision_integrator.block]

    def vision_hidden(self, h_llm, captured, memory_kvs, has_image, key_valid, caches, cache_len):
        """H_vision for a cached decoding step (B, T, d)."""
        return self.integrate(captured[0], memory_kvs[0], has_image, key_valid, caches[0], cache_len)

    def image_path_parameters(self):
        """The trainable parameters only an image reaches: adapters and the cross-attention."""
        block = self.vision_integrator.block
        modules = [self.llava.model.multi_modal_projector, self.vision_integrator.raw_adapter,
                   block.cross_attn, block.norm_cross]
        if self.vision_moe is not None:
            modules.append(self.vision_moe)
        return [p for m in modules for p in m.parameters()]

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, context_mask=None):
        """input_ids, attention_mask (B, T); pixel_values (n_img, 3, H, W) for the samples with
        image tokens (a dict per expert under MoE); labels (B, T), -100 = unsupervised.
        context_mask (B, T) bool: overrides the tokens the context pass reads (image tokens always
        excluded), so a full recompute can reproduce generate(), whose context is the prompt alone."""
        # 1. context pass -> weights (B, 2); images -> inputs_embeds (B, T, d), memory (B, P, d)
        prep = self.prepare(input_ids, attention_mask, pixel_values, labels, context_mask)
        mask = prep.attention_mask  # (B, T)
        # 2. main pass: H_llm (B, T, d) after the final norm; H_query (B, T, d) from query_layer
        h_llm, (h_query,) = run_language_model(self.language_model, self.main_pass_inputs(prep.inputs_embeds), mask,
                                               positions_from_mask(mask), self.query_layers)
        # 3. integrator: H_vision (B, T, d); left padding is masked out of its self-attention
        key_valid = None if bool(mask.all()) else mask.bool()
        h_vision = self.integrate(h_query, self.memory_kv(prep.memory), prep.has_image, key_valid)
        # 4. mix through the shared head
        head = self.llava.lm_head
        out = CarpeOutput(context_weights=prep.weights, balance_loss=prep.balance_loss, route=prep.route)
        if labels is None:
            out.logits = head(mix(prep.weights, h_vision, h_llm))  # (B, T, V)
            return out
        out.lm_loss = fused_mixed_cross_entropy(h_vision, h_llm, prep.weights, labels, head.weight, head.bias,
                                                chunk_size=self.config.chunk_size)  # no (N, V) logits held
        out.loss = out.lm_loss
        if prep.memory is None and torch.is_grad_enabled():
            # a text-only batch leaves the image path without gradients; a zero term gives every
            # rank the same set of gradients, which FSDP2's reduce-scatter needs
            image_path = [p for p in self.image_path_parameters() if p.requires_grad]
            if image_path:
                out.loss = out.loss + 0.0 * sum(p.sum() for p in image_path)
        if out.balance_loss is not None:
            out.loss = out.loss + self.vision_moe.config.balance_weight * out.balance_loss
        return out


def repeated_blocks(model):
    """The repeated blocks to compile one by one (regional compilation), each once: LM decoder
    layers, vision-tower layers, model.integrator_blocks() and CARPE-MoE's other expert towers'
    layers. model: CARPE, a baseline, or a bare LlavaForConditionalGeneration."""
    llava = model if isinstance(model, LlavaForConditionalGeneration) else model.llava
    blocks = list(decoder_layers(llava.model.language_model)) + list(encoder_layers(llava.model.vision_tower))
    if model is not llava:
        blocks += model.integrator_blocks()
    if getattr(model, "vision_moe", None) is not None:
        blocks += [layer for encoder in model.vision_moe.encoders.values() for layer in encoder_layers(encoder)]
    return list({id(b): b for b in blocks}.values())  # each once, in first-seen order


# -----------------------------------------------------------------------------
# images and bases

def expand_to_square(image, background):
    """LLaVA's 'pad' aspect ratio: centre the image on a square of the background colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def make_image_transform(processor):
    """callable(list of PIL images) -> pixel_values (n, 3, H, W): pad to square with the
    processor's mean colour, then the image processor (resize, crop, normalise)."""
    image_processor = processor.image_processor
    background = tuple(int(255 * m) for m in image_processor.image_mean)  # as LLaVA's expand2square

    def transform(images):
        squares = [expand_to_square(image.convert("RGB"), background) for image in images]
        return image_processor(squares, return_tensors="pt")["pixel_values"]
    return transform


def llava15_7b_config():
    """The LlavaConfig of llava-hf/llava-1.5-7b-hf, written out (no download): Vicuna-7B v1.5 +
    CLIP ViT-L/14-336, a 2-layer GELU projector, tower layer -2 features with CLS dropped."""
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
                       pad_token_id=32001)


def meta_llava(config=None):
    """A LlavaForConditionalGeneration on the meta device (shapes, no memory); the 7B base by default."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config or llava15_7b_config())


def looks_like_path(name):
    """Whether `name` is clearly a local path, not a Hub id ("name" or "namespace/name"): absolute,
    starting with "." or "~", more than one separator, or under an existing folder."""
    name = str(name)
    parent = os.path.dirname(name)
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name) or bool(parent and os.path.isdir(parent)))


def check_base_folder(base):
    """base with "~" expanded; a path that is no folder is an error naming it (not HF's repo-id error)."""
    base = os.path.expanduser(str(base))
    if os.path.isdir(base) or not looks_like_path(base):
        return base
    path = os.path.abspath(base)
    what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
    raise FileNotFoundError(f"base {base}: the folder {path} {what} (a base is a LLaVA model folder or a "
                            f"Hugging Face id such as llava-hf/llava-1.5-7b-hf)")


def load_base(base, device="cpu", dtype=None):
    """(llava, processor) for a LLaVA-1.5-style base: a Hugging Face id or folder. dtype: a torch
    dtype, None = float32, or "auto" = as saved. Safetensors only, never trust_remote_code. The
    processor uses the PIL image backend (transformers 5 would pick torchvision when installed)."""
    base = check_base_folder(base)
    config = AutoConfig.from_pretrained(base)
    if not isinstance(config, LlavaConfig):
        name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise TypeError(f"{base} is a {name}, not a LLaVA-1.5-style base: CARPE and its baselines wrap "
                        "LlavaForConditionalGeneration only")
    llava = LlavaForConditionalGeneration.from_pretrained(base, config=config, dtype=dtype or torch.float32,
                                                          use_safetensors=True)
    processor = AutoProcessor.from_pretrained(base, backend="pil")
    if getattr(processor.image_processor, "backend", None) != "pil":
        raise TypeError(f"{base}: {type(processor.image_processor).__name__} has no PIL backend")
    ids = processor.tokenizer.encode(processor.image_token, add_special_tokens=False)
    if ids != [config.image_token_id]:
        raise ValueError(f"{base}: the tokenizer encodes {processor.image_token!r} as {ids}, but "
                         f"config.image_token_id is {config.image_token_id}")
    return llava.to(device=device).eval(), processor
