"""
moe.py: CARPE-MoE's vision mixture of experts (paper section 3.1, ../shared/DESIGN.md section 2).

    vision_moe = build_vision_moe(llava, MoEConfig())          # or tiny.tiny_moe_config() offline
    model = carpe.CARPE(llava, carpe.CarpeConfig(), vision_moe=vision_moe)
    pixel_values = vision_moe.preprocess(list_of_pil_images)    # dict: expert name -> (n, 3, S_e, S_e)
    out = model(input_ids=..., pixel_values=pixel_values, labels=...)   # out.balance_loss, out.route

Four frozen vision experts (defaults = the paper's):
  clip    the base LLaVA's own CLIP ViT-L/14-336 tower; its LLM adapter IS the base's projector
  siglip  google/siglip-so400m-patch14-384 (no CLS token)
  dinov2  facebook/dinov2-large
  cumo    the CLIP-MoE vision tower of shi-labs/CuMo-mistral-7b (see "CuMo" below)
A router Linear(d, n_experts) reads the context prompt's hidden state h_ctx (text only, so the
route never depends on the image) and picks one expert per sample (top-1). Only that expert's
encoder runs for the sample: the batch is grouped by expert.

Choices made where the paper / issue are silent:
 - One token layout. Every expert's patch grid is resampled to the base tower's grid (24x24 = 576
   for LLaVA-1.5; 6x6 = 36 for tiny.tiny_llava) by adaptive average pooling, before its adapters,
   so the prompt layout never depends on the route.
 - Features: the second-to-last layer of every expert (LLaVA's convention; the clip expert follows
   the base config's vision_feature_layer), prefix tokens (CLS) dropped.
 - Image sizes: clip 336, siglip 384 (27x27 -> pooled to 24x24), dinov2 336 (24x24; DINOv2
   interpolates its position embeddings), cumo 336 single-scale. Each expert pads the image to a
   square with its own mean colour (LLaVA's expand2square), resizes (bicubic) and normalises with
   its own mean / std. PIL + numpy only.
 - Router gradient mode (MoEConfig.router_grad): "ratio" (default) multiplies the chosen expert's
   outputs by p / p.detach(), where p is the chosen expert's router probability: the forward value
   is exactly the expert's output (the factor is exactly 1.0) and d out / d p = out / p reaches the
   router. "gate" multiplies by p itself (Switch Transformer style; the forward value changes).
 - The router is fp32 math on h_ctx (autocast off); a zero-bias nn.Linear with PyTorch's default weight init (a
   zero init would tie every sample to expert 0).
 - Balance loss: Switch-style n_experts * sum_e f_e * P_e over the images of the local batch
   (f_e = share of images routed to e, P_e = mean router probability of e); CARPE adds
   balance_weight (0.01) times it to the loss.
 - Adapters: each expert has a 2-layer MLP into the LLM space (`llm_adapters.<name>`, trained at the
   adapter lr 2e-5) and a 2-layer MLP raw adapter for the integrator (`raw_adapters.<name>`, lr 2e-4).
   The clip expert's LLM adapter is the base's multi_modal_projector itself (a shared submodule: in
   CARPE it is named, trained and saved once, as llava.model.multi_modal_projector.*, because CARPE
   registers llava before vision_moe and named_parameters() keeps the first name of a shared
   tensor). VisionMoE holds its own raw adapters for all four experts; CARPE's
   vision_integrator.raw_adapter is unused under MoE (it stays in the checkpoint, untouched).
   Likewise the clip encoder is the base's vision_tower (shared, frozen).
 - Encoders are frozen and run under no_grad (nothing upstream of their output trains). Their
   features are taken with a forward hook on the block, not output_hidden_states: transformers 5
   looks up what to record by the model's class name, which FSDP2's fully_shard changes, and then
   silently returns hidden_states=None.
 - Experts that no sample of the batch chose get zero (not None) adapter gradients through a
   0 * sum(params) term in the balance loss, so every rank reduces the same tensors (FSDP2's
   reduce-scatter sizes must match across ranks). With train.py --fsdp the frozen encoders must stay
   outside FSDP (ignored_params): a rank that routes nothing to an expert never calls its encoder,
   so a separately sharded tower would miss its all-gather on that rank.
 - New modules (adapters, router, tiny experts) are initialised under MoEConfig.seed without
   touching the global RNG.

CuMo (what the code search of SHI-Labs/CuMo showed, and what is assumed):
 - cumo/model/multimodal_encoder/clip_smoe.py: CLIPSMoEVisionTransformer = embeddings,
   pre_layrnorm, encoder.layers.{i} (self_attn.{q,k,v,out}_proj, layer_norm1, gate (Linear(1024, 4,
   bias=False)), experts.{j}.fc1 / fc2 (CLIP MLPs, quick_gelu), layer_norm2); no post_layernorm.
   The gate's softmax is fp32, top-2, weights renormalised. Its features are the input of the last
   layer (= HF hidden_states[-2]), CLS dropped.
 - cumo/model/llava_arch.py: the tower sits at model.vision_tower (attribute vision_model) of the
   LLaVA-Mistral model, so the checkpoint keys are `model.vision_tower.vision_model.<...>`.
 - Assumed: the HF repo holds safetensors shards with a model.safetensors.index.json (a single
   model.safetensors, or pytorch_model*.bin read with weights_only=True, also work).
 - We build a transformers CLIPVisionModel (ViT-L/14-336) and replace each layer's mlp by
   CLIPSparseMoE(gate, experts); the key map CuMo -> ours is explicit and every key is checked both
   ways (missing or extra = ValueError naming it). Our unused post_layernorm (not in CuMo) is set to
   the identity. CuMo also concatenates a multi-scale (S^2) view; we run single-scale 336 px.
"""
import argparse
import json
import os
from dataclasses import dataclass, asdict, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from carpe import MLP, expand_to_square, hidden_state_at

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FAMILIES = ("base_clip", "siglip", "dinov2", "clip_moe")
CUMO_PREFIX = "model.vision_tower.vision_model."  # where CuMo's LLaVA-Mistral keeps its CLIP-MoE tower


# -----------------------------------------------------------------------------
# config

@dataclass
class ExpertConfig:
    name: str  # key of the expert everywhere (pixel_values dict, module names, logs)
    family: str  # base_clip (the base LLaVA's own tower) | siglip | dinov2 | clip_moe (CuMo)
    model_id: str = ""  # HF id or local dir for from_pretrained; "" for base_clip
    image_size: int = 336  # square input side in pixels
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    feature_layer: int = -2  # hidden_states index the features are read from
    has_cls: bool = True  # drop one prefix token (CLS) from the features
    moe_experts: int = 4  # clip_moe only: MLP experts per encoder layer
    moe_top_k: int = 2  # clip_moe only: experts per token
    tiny: dict | None = None  # build from this config dict (random init, offline) instead of loading model_id


def paper_experts():
    return [
        ExpertConfig("clip", "base_clip", "", 336, CLIP_MEAN, CLIP_STD, -2, True),
        ExpertConfig("siglip", "siglip", "google/siglip-so400m-patch14-384", 384, SIGLIP_MEAN, SIGLIP_STD, -2, False),
        ExpertConfig("dinov2", "dinov2", "facebook/dinov2-large", 336, IMAGENET_MEAN, IMAGENET_STD, -2, True),
        ExpertConfig("cumo", "clip_moe", "shi-labs/CuMo-mistral-7b", 336, CLIP_MEAN, CLIP_STD, -2, True),
    ]


@dataclass
class MoEConfig:
    experts: list = field(default_factory=paper_experts)  # list[ExpertConfig]
    balance_weight: float = 0.01  # weight of the Switch load-balancing loss in CARPE's loss
    router_grad: str = "ratio"  # "ratio": out * p / p.detach() (exact forward) | "gate": out * p
    seed: int = 0  # init of the new adapters, router and tiny experts

    def __post_init__(self):
        self.experts = [e if isinstance(e, ExpertConfig) else ExpertConfig(**e) for e in self.experts]
        for e in self.experts:
            e.image_mean, e.image_std = tuple(e.image_mean), tuple(e.image_std)
            if e.family not in FAMILIES:
                raise ValueError(f"expert {e.name!r}: unknown family {e.family!r}; known: {FAMILIES}")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if self.router_grad not in ("ratio", "gate"):
            raise ValueError(f"router_grad must be 'ratio' or 'gate', got {self.router_grad!r}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


# -----------------------------------------------------------------------------
# CuMo's CLIP-MoE: a transformers CLIPVisionModel with sparse-MoE MLPs

def cumo_vision_config():
    """CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower CuMo upcycles."""
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=768)


class CLIPSparseMoE(nn.Module):
    """Per token: gate softmax (fp32) -> top-k of n CLIP MLPs -> weights renormalised to sum to 1."""

    def __init__(self, vision_config, n_experts=4, top_k=2):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPMLP
        self.top_k = top_k
        self.gate = nn.Linear(vision_config.hidden_size, n_experts, bias=False)
        self.experts = nn.ModuleList([CLIPMLP(vision_config) for _ in range(n_experts)])

    def forward(self, x):  # (B, N, D)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # (T, E) fp32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (T, k)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)  # (T, D)
        for j, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == j)  # tokens that picked expert j, and in which slot
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weights[token, slot, None].to(x.dtype)  # (t_j, D)
            out.index_add_(0, token, y)
        return out.view(shape)


def build_clip_moe(vision_config, n_experts=4, top_k=2):
    """A CLIPVisionModel whose every encoder layer's MLP is a CLIPSparseMoE (random init)."""
    from transformers import CLIPVisionModel
    model = CLIPVisionModel(vision_config)
    for layer in model.encoder.layers:
        layer.mlp = CLIPSparseMoE(vision_config, n_experts, top_k)
    return model


def upcycle_dense_mlps(clip_moe, dense_clip):
    """Copy a dense CLIPVisionModel into a CLIP-MoE: every expert = the dense layer's MLP
    (the MoE then computes exactly the dense function, whatever the gate says)."""
    missing, unexpected = clip_moe.load_state_dict(dense_clip.state_dict(), strict=False)
    assert all(".mlp.fc" in k for k in unexpected), unexpected
    for layer_moe, layer in zip(clip_moe.encoder.layers, dense_clip.encoder.layers):
        for expert in layer_moe.mlp.experts:
            expert.load_state_dict(layer.mlp.state_dict())
    return clip_moe


def cumo_key_map(n_layers, n_experts, prefix=CUMO_PREFIX):
    """CuMo checkpoint key -> our CLIPVisionModel (with CLIPSparseMoE) state_dict key."""
    keys = {"embeddings.class_embedding": "embeddings.class_embedding",
            "embeddings.patch_embedding.weight": "embeddings.patch_embedding.weight",
            "embeddings.position_embedding.weight": "embeddings.position_embedding.weight"}
    for wb in ("weight", "bias"):
        keys[f"pre_layrnorm.{wb}"] = f"pre_layrnorm.{wb}"
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        for wb in ("weight", "bias"):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "layer_norm1", "layer_norm2"):
                keys[f"{src}{part}.{wb}"] = f"{dst}{part}.{wb}"
            for j in range(n_experts):
                for fc in ("fc1", "fc2"):
                    keys[f"{src}experts.{j}.{fc}.{wb}"] = f"{dst}mlp.experts.{j}.{fc}.{wb}"
        keys[f"{src}gate.weight"] = f"{dst}mlp.gate.weight"
    return {prefix + k: v for k, v in keys.items()}


def load_cumo_state(clip_moe, tensors, prefix=CUMO_PREFIX, source="CuMo checkpoint"):
    """Load CuMo's vision-tower tensors (keys under `prefix`; other keys are ignored) into
    `clip_moe` through cumo_key_map. Missing, extra or mis-shaped keys raise ValueError."""
    layers = clip_moe.encoder.layers
    key_map = cumo_key_map(len(layers), len(layers[0].mlp.experts), prefix)
    ours = clip_moe.state_dict()
    not_covered = sorted(set(ours) - set(key_map.values()) - {"post_layernorm.weight", "post_layernorm.bias"})
    assert not not_covered, f"cumo_key_map does not cover {not_covered}"
    given = {k for k in tensors if k.startswith(prefix)}
    missing = sorted(set(key_map) - given)
    extra = sorted(given - set(key_map))
    if missing:
        raise ValueError(f"{source}: missing vision-tower key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all)")
    if extra:
        raise ValueError(f"{source}: unexpected vision-tower key(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"({len(extra)} in all); the CLIP-MoE layout differs from {len(layers)} layers x "
                         f"{len(layers[0].mlp.experts)} experts")
    with torch.no_grad():
        for src, dst in key_map.items():
            if tensors[src].shape != ours[dst].shape:
                raise ValueError(f"{source}: {src} has shape {tuple(tensors[src].shape)}, expected {tuple(ours[dst].shape)}")
            ours[dst].copy_(tensors[src])
        # CuMo's tower has no post_layernorm; ours is unused (features come from layer -2): identity
        clip_moe.post_layernorm.weight.fill_(1.0)
        clip_moe.post_layernorm.bias.zero_()
    return clip_moe


def read_checkpoint_tensors(model_id, prefix):
    """Every tensor whose key starts with `prefix` from a HF repo id or local dir, reading only the
    shards that hold them. Never executes code: safetensors, or torch.load(weights_only=True)."""
    def fetch(filename):
        if os.path.isdir(model_id):
            path = os.path.join(model_id, filename)
            return path if os.path.exists(path) else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        try:
            return hf_hub_download(model_id, filename)
        except EntryNotFoundError:
            return None

    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = fetch(index_name)
        if index is not None:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
        elif fetch(single_name) is not None:
            files = [single_name]
        else:
            continue
        tensors = {}
        for file in files:
            path = fetch(file)
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(path, framework="pt") as s:
                    tensors.update({k: s.get_tensor(k) for k in s.keys() if k.startswith(prefix)})
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                tensors.update({k: v for k, v in state.items() if k.startswith(prefix)})
        if not tensors:
            raise ValueError(f"{model_id}: no tensor under {prefix!r} (is this a CuMo CLIP-MoE checkpoint?)")
        return tensors
    raise FileNotFoundError(f"{model_id}: found neither safetensors nor pytorch_model.bin weights")


# -----------------------------------------------------------------------------
# building the experts

def build_encoder(expert: ExpertConfig, dtype):
    """A frozen vision encoder for one (non-base) expert: tiny from config, or loaded."""
    from transformers import (CLIPVisionConfig, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                              SiglipVisionModel)
    if expert.family == "siglip":
        if expert.tiny is not None:
            return SiglipVisionModel(SiglipVisionConfig(**expert.tiny))
        return SiglipVisionModel.from_pretrained(expert.model_id, dtype=dtype)
    if expert.family == "dinov2":
        if expert.tiny is not None:
            return Dinov2Model(Dinov2Config(**expert.tiny))
        return Dinov2Model.from_pretrained(expert.model_id, dtype=dtype)
    if expert.family == "clip_moe":
        if expert.tiny is not None:
            return build_clip_moe(CLIPVisionConfig(**expert.tiny), expert.moe_experts, expert.moe_top_k)
        model = build_clip_moe(cumo_vision_config(), expert.moe_experts, expert.moe_top_k)
        return load_cumo_state(model, read_checkpoint_tensors(expert.model_id, CUMO_PREFIX), source=expert.model_id)
    raise ValueError(f"expert {expert.name!r}: family {expert.family!r} has no encoder builder")


def patch_grid(encoder, expert: ExpertConfig):
    """Side of the expert's patch grid at its input size."""
    return expert.image_size // encoder.config.patch_size


class VisionMoE(nn.Module):
    def __init__(self, llava, config: MoEConfig, encoders: dict):
        super().__init__()
        self.config = config
        self.expert_names = [e.name for e in config.experts]
        vcfg = llava.config.vision_config
        d = llava.config.text_config.hidden_size
        self.grid = vcfg.image_size // vcfg.patch_size  # the base tower's grid side (24 for LLaVA-1.5)
        self.encoders = nn.ModuleDict(encoders)  # frozen; "clip" may be llava's own vision_tower
        self.llm_adapters = nn.ModuleDict()  # into the LLM embedding space (adapter lr)
        self.raw_adapters = nn.ModuleDict()  # into the integrator's memory
        self.expert_grids = {}
        for e in config.experts:
            enc = self.encoders[e.name]
            width = enc.config.hidden_size
            self.expert_grids[e.name] = patch_grid(enc, e)
            if e.family == "base_clip":
                self.llm_adapters[e.name] = llava.model.multi_modal_projector  # shared, not a copy
            else:
                self.llm_adapters[e.name] = MLP(width, d, d)
            self.raw_adapters[e.name] = MLP(width, d, d)
        self.router = nn.Linear(d, len(config.experts))
        nn.init.zeros_(self.router.bias)
        self.base_feature_layer = llava.config.vision_feature_layer
        self.image_transform = MoEImageTransform(config.experts)
        for p in self.encoders.parameters():
            p.requires_grad_(False)

    @property
    def n_experts(self):
        return len(self.expert_names)

    @property
    def experts(self):
        """The ExpertConfig list, in router order (len() = number of experts)."""
        return self.config.experts

    def is_trainable_name(self, name):
        """Name relative to this module: adapters and router train, encoders stay frozen."""
        return name.startswith(("llm_adapters.", "raw_adapters.", "router."))

    def preprocess(self, images):
        """list[PIL.Image] -> dict expert name -> (n, 3, S_e, S_e) float32 (the MoE pixel_values)."""
        return self.image_transform(images)

    # --- one expert's path ------------------------------------------------------------------
    def encode(self, name, pixel_values):
        """Frozen encoder -> (k, g_e * g_e, D_e) patch features (prefix tokens dropped)."""
        e = self.config.experts[self.expert_names.index(name)]
        enc = self.encoders[name]
        layer = self.base_feature_layer if e.family == "base_clip" else e.feature_layer
        with torch.no_grad():
            feats = hidden_state_at(enc, pixel_values.to(dtype=self.encoder_dtype(name)), layer)  # (k, prefix + g_e^2, D_e)
        g = pixel_values.size(-1) // enc.config.patch_size
        prefix = feats.size(1) - g * g
        if prefix != int(e.has_cls):
            raise ValueError(f"expert {name!r}: {feats.size(1)} tokens for a {g}x{g} grid; expected "
                             f"{int(e.has_cls)} prefix token(s) (has_cls={e.has_cls})")
        return feats[:, prefix:]

    def encoder_dtype(self, name):
        return next(self.encoders[name].parameters()).dtype

    def resample(self, feats):
        """(k, g_e^2, D) -> (k, g^2, D) on the base grid by adaptive average pooling."""
        k, n, D = feats.shape
        g_e = int(round(n ** 0.5))
        assert g_e * g_e == n, f"{n} patch tokens do not form a square grid"
        if g_e == self.grid:
            return feats
        x = feats.transpose(1, 2).reshape(k, D, g_e, g_e)  # (k, D, g_e, g_e)
        x = F.adaptive_avg_pool2d(x.float(), self.grid).to(feats.dtype)  # (k, D, g, g)
        return x.flatten(2).transpose(1, 2)  # (k, g^2, D)

    def expert_path(self, name, pixel_values):
        """-> image_embeds (k, P, d), memory (k, P, d) for images all sent to expert `name`."""
        feats = self.resample(self.encode(name, pixel_values))  # (k, P, D_e)
        llm_adapter, raw_adapter = self.llm_adapters[name], self.raw_adapters[name]
        image_embeds = llm_adapter(feats.to(next(llm_adapter.parameters()).dtype))  # (k, P, d)
        memory = raw_adapter(feats.to(next(raw_adapter.parameters()).dtype))  # (k, P, d)
        return image_embeds, memory

    # --- routing ----------------------------------------------------------------------------
    def route_probs(self, h_ctx):
        """(n, d) -> router probabilities (n, E), fp32."""
        with torch.autocast(h_ctx.device.type, enabled=False):  # route decisions in fp32 math
            logits = F.linear(h_ctx.float(), self.router.weight.float(), self.router.bias.float())  # (n, E)
        return torch.softmax(logits, dim=-1)

    def forward(self, pixel_values, h_ctx):
        """pixel_values: dict expert name -> (n, 3, S_e, S_e); h_ctx (n, d) context hidden states.
        -> image_embeds (n, P, d), memory (n, P, d), balance_loss (scalar), route (n,) long."""
        if not isinstance(pixel_values, dict):
            raise TypeError("CARPE-MoE needs pixel_values as the dict from vision_moe.preprocess(images), "
                            f"got {type(pixel_values).__name__}")
        missing = [name for name in self.expert_names if name not in pixel_values]
        if missing:
            raise ValueError(f"pixel_values lacks the image(s) of expert(s) {missing}; use vision_moe.preprocess")
        if h_ctx is None:
            raise ValueError("VisionMoE needs the context hidden state h_ctx to route")
        n = h_ctx.size(0)
        for name in self.expert_names:
            if pixel_values[name].size(0) != n:
                raise ValueError(f"pixel_values[{name!r}] holds {pixel_values[name].size(0)} images for {n} samples")
        probs = self.route_probs(h_ctx)  # (n, E)
        route = probs.argmax(-1)  # (n,)
        gate = probs.gather(1, route[:, None])[:, 0]  # (n,) probability of the chosen expert
        scale = gate / gate.detach() if self.config.router_grad == "ratio" else gate  # (n,)
        image_embeds, memory = None, None
        for e, name in enumerate(self.expert_names):
            idx = torch.nonzero(route == e)[:, 0]  # samples sent to expert e
            if idx.numel() == 0:
                continue
            emb, mem = self.expert_path(name, pixel_values[name].to(h_ctx.device)[idx])  # (k, P, d) x 2
            if image_embeds is None:
                image_embeds = emb.new_zeros(n, *emb.shape[1:])
                memory = mem.new_zeros(n, *mem.shape[1:])
            image_embeds = image_embeds.index_copy(0, idx, emb)
            memory = memory.index_copy(0, idx, mem)
        image_embeds = image_embeds * scale[:, None, None].to(image_embeds.dtype)
        memory = memory * scale[:, None, None].to(memory.dtype)
        balance_loss = switch_balance_loss(probs, route)
        if torch.is_grad_enabled():
            balance_loss = balance_loss + self.zero_touch_unused(route)
        return image_embeds, memory, balance_loss, route

    def zero_touch_unused(self, route):
        """0 * (sum of the adapters of the experts no sample chose): their gradients become zeros
        instead of None. Under FSDP2 every rank must reduce-scatter the same tensors (else gloo /
        NCCL see mismatched sizes), and DDP then needs no unused-parameter search for them."""
        used = set(route.unique().tolist())
        params = [p for e, name in enumerate(self.expert_names) if e not in used
                  for module in (self.llm_adapters[name], self.raw_adapters[name])
                  for p in module.parameters() if p.requires_grad]
        if not params:
            return 0.0
        return 0.0 * sum(p.float().sum() for p in params)

    # --- logging ----------------------------------------------------------------------------
    def routing_histogram(self, route):
        """route (n,) with -1 for samples without image -> {expert name: count}."""
        counts = route_counts(route, self.n_experts)
        return dict(zip(self.expert_names, counts))

    def format_histogram(self, counts):
        """{name: count} or list of counts -> 'clip 12 (50%) | siglip 4 (17%) | ...'."""
        if not isinstance(counts, dict):
            counts = dict(zip(self.expert_names, [int(c) for c in counts]))
        total = max(sum(counts.values()), 1)
        return " | ".join(f"{name} {c} ({100 * c / total:.0f}%)" for name, c in counts.items())


def switch_balance_loss(probs, route):
    """Switch Transformer load balancing: E * sum_e f_e * P_e. probs (n, E) fp32, route (n,).
    f_e (share of samples routed to e) carries no gradient; P_e (mean probability) does.
    Equals 1 for uniform routing, E when everything goes to one expert with certainty."""
    n, E = probs.shape
    f = torch.bincount(route, minlength=E).to(probs.dtype) / n  # (E,)
    P = probs.mean(0)  # (E,)
    return E * (f * P).sum()


def route_counts(route, n_experts):
    """Images per expert (samples with route -1, i.e. without image, are left out): list[int]."""
    route = route[route >= 0]
    return torch.bincount(route.cpu(), minlength=n_experts).tolist()


# -----------------------------------------------------------------------------
# per-expert image preprocessing

class MoEImageTransform:
    """list[PIL.Image] -> dict expert name -> (n, 3, S_e, S_e) float32. A plain object (no
    weights), so DataLoader workers can hold it."""

    def __init__(self, experts):
        self.experts = [ExpertConfig(**asdict(e)) for e in experts]

    def one(self, image, e: ExpertConfig):
        from PIL import Image
        image = image.convert("RGB")
        fill = tuple(int(255 * m) for m in e.image_mean)  # as carpe.make_image_transform (LLaVA's expand2square)
        image = expand_to_square(image, fill).resize((e.image_size, e.image_size), Image.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        x = (x - np.array(e.image_mean, dtype=np.float32)) / np.array(e.image_std, dtype=np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, S, S)

    def __call__(self, images):
        out = {}
        for e in self.experts:
            if images:
                out[e.name] = torch.stack([self.one(im, e) for im in images])  # (n, 3, S, S)
            else:
                out[e.name] = torch.zeros(0, 3, e.image_size, e.image_size)
        return out


# -----------------------------------------------------------------------------
# entry point used by train.py / carpe.load_run

def build_vision_moe(llava, moe_config: MoEConfig, device="cpu", dtype=None):
    """The VisionMoE for `llava`: the clip expert reuses llava's vision tower and projector; the
    other experts are loaded with from_pretrained (never trust_remote_code) or, when their
    ExpertConfig has `tiny`, built from config with random weights (offline)."""
    base_dtype = llava.model.multi_modal_projector.linear_1.weight.dtype
    dtype = dtype or base_dtype  # of the added encoders; the new adapters and router follow the base projector
    vcfg = llava.config.vision_config
    if llava.config.vision_feature_select_strategy != "default":
        raise ValueError("CARPE-MoE needs the base's vision_feature_select_strategy='default' (CLS dropped), "
                         f"got {llava.config.vision_feature_select_strategy!r}")
    encoders = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(moe_config.seed)
        for e in moe_config.experts:
            if e.family == "base_clip":
                if e.image_size != vcfg.image_size:
                    raise ValueError(f"expert {e.name!r}: image_size {e.image_size} differs from the base tower's "
                                     f"{vcfg.image_size}")
                encoders[e.name] = llava.model.vision_tower
            else:
                encoders[e.name] = build_encoder(e, dtype).to(dtype=dtype)
                encoders[e.name].eval()
        vision_moe = VisionMoE(llava, moe_config, encoders)
    for module in (vision_moe.llm_adapters, vision_moe.raw_adapters, vision_moe.router):
        module.to(dtype=base_dtype)  # (the shared projector already is)
    return vision_moe.to(device=device)


# -----------------------------------------------------------------------------
# memory plan at paper scale (parameter counts from configs on the meta device; no download)

def paper_scale_param_counts():
    """Parameter counts (millions) of the four towers and the new trainable modules at 7B."""
    from transformers import CLIPVisionConfig, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel, CLIPVisionModel
    d = 4096
    with torch.device("meta"):
        clip = CLIPVisionModel(cumo_vision_config())
        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16, image_size=384, patch_size=14))
        dinov2 = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                          image_size=518, patch_size=14))
        cumo = build_clip_moe(cumo_vision_config())
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    mlp = lambda din: (din * d + d + d * d + d) / 1e6
    towers = dict(clip=count(clip), siglip=count(siglip), dinov2=count(dinov2), cumo=count(cumo))
    widths = dict(clip=1024, siglip=1152, dinov2=1024, cumo=1024)
    llm_adapters = {k: mlp(w) for k, w in widths.items()}  # clip's = the base projector
    raw_adapters = {k: mlp(w) for k, w in widths.items()}
    return dict(towers=towers, llm_adapters=llm_adapters, raw_adapters=raw_adapters, router=(d * 4 + 4) / 1e6)


def main():
    parser = argparse.ArgumentParser(description="CARPE-MoE vision experts: print the paper's expert table "
                                                 "and the paper-scale memory plan.")
    parser.add_argument("--plan", action="store_true", help="print parameter counts / memory of the paper-scale towers")
    args = parser.parse_args()
    cfg = MoEConfig()
    print(f"{'name':8s} {'family':10s} {'model':36s} {'size':>5s} {'layer':>5s} cls")
    for e in cfg.experts:
        print(f"{e.name:8s} {e.family:10s} {(e.model_id or ('tiny' if e.tiny else 'base LLaVA tower')):36s} "
              f"{e.image_size:5d} {e.feature_layer:5d} {e.has_cls}")
    if args.plan:
        c = paper_scale_param_counts()
        print(json.dumps(c, indent=1))
        frozen = sum(c["towers"].values())
        new_trainable = sum(v for k, v in c["llm_adapters"].items() if k != "clip") + sum(c["raw_adapters"].values()) + c["router"]
        print(f"frozen towers: {frozen:.0f}M params = {2 * frozen / 1e3:.2f} GB in bf16 "
              f"(clip {c['towers']['clip']:.0f}M is the base's own tower)")
        print(f"new trainable: {new_trainable:.0f}M params = {16 * new_trainable / 1e3:.2f} GB "
              f"(fp32 weight + grad + AdamW m, v)")


if __name__ == "__main__":
    main()
