"""
moe.py: CARPE-MoE's vision mixture of experts (paper section 3.1).

    experts = parse_experts("clip,siglip=/models/siglip,dinov2=facebook/dinov2-large@-2")  # or a .json
    vision_moe = build_vision_moe(llava, MoEConfig(experts), image_processor=processor.image_processor)
    model = carpe.CARPE(llava, carpe.CarpeConfig(), vision_moe=vision_moe)
    pixel_values = vision_moe.preprocess(list_of_pil_images)    # dict: expert name -> (n, 3, S_e, S_e)
    out = model(input_ids=..., pixel_values=pixel_values, labels=...)   # out.balance_loss, out.route
    route_histogram(out.route, vision_moe.expert_names)         # {"clip": 3, "siglip": 0, ...}

Frozen vision experts; the default four are the paper's:
  clip    the base LLaVA's own CLIP ViT-L/14-336 tower; its LLM adapter IS the base's projector
  siglip  google/siglip-so400m-patch14-384 (no CLS token)
  dinov2  facebook/dinov2-large
  cumo    the CLIP-MoE vision tower of shi-labs/CuMo-mistral-7b (see "CuMo" below)
Any expert may instead come from a local folder or another Hub id (parse_experts); the list is
saved in the run's config (MoEConfig.to_dict), so a reload builds exactly the same experts.
A router Linear(d, n_experts) reads the context prompt's hidden state h_ctx (text only, so the
route never depends on the image) and picks one expert per sample (top-1). Only that expert's
encoder runs for the sample: the batch is grouped by expert. Routes are integers (router order)
inside the model and expert names wherever they are written (route_histogram).

Choices made where the paper is silent:
 - One token layout. Every expert's patch grid is resampled to the base tower's grid (24x24 = 576
   for LLaVA-1.5) by adaptive average pooling (a grid smaller than the base's is upsampled by
   repetition), before its adapters, so the prompt layout never depends on the route.
 - Features: the second-to-last layer of every expert by default (LLaVA's convention; the clip
   expert follows the base config's vision_feature_layer), prefix tokens (CLS) dropped.
 - Preprocessing: LLaVA's pad-to-square (expand2square, mean colour int(255 * m)), then each
   expert's own image processor (AutoImageProcessor, PIL backend; the clip expert uses the base
   LLaVA's). So the input size is the processor's: siglip 384 (27x27 -> pooled to 24x24), clip and
   cumo 336; the paper's dinov2 entry asks for 336 (24x24 through interpolated position
   embeddings), not its processor's 224 crop. ExpertConfig.image_size overrides a processor's
   size (resize and crop). Hand-written size, mean and std only for random experts built from a
   config (ExpertConfig.tiny), through a PIL CLIP image processor resizing straight to the square.
 - Router gradient (MoEConfig.router_grad), p = the chosen expert's router probability: "ratio"
   (default) multiplies its outputs by p / p.detach() (exactly 1.0: the forward value is unchanged,
   and d out / d p = out / p reaches the router); "gate" by p itself (Switch style).
 - The router is fp32 math on h_ctx (autocast off); a zero-bias nn.Linear with PyTorch's default
   weight init (a zero init would tie every sample to expert 0).
 - Balance loss: Switch-style n_experts * sum_e f_e * P_e over the images of the local batch
   (f_e = share of images routed to e, P_e = mean router probability of e); CARPE adds
   balance_weight (0.01) times it to the loss.
 - Adapters: each expert has a 2-layer MLP into the LLM space (`llm_adapters.<name>`, adapter lr)
   and a 2-layer MLP raw adapter for the integrator (`raw_adapters.<name>`). The clip expert's LLM
   adapter is the base's multi_modal_projector itself (shared: CARPE names, trains and saves it once,
   as llava.model.multi_modal_projector.*, since named_parameters() keeps a shared tensor's first
   name), and its encoder the base's vision_tower. CARPE's vision_integrator.raw_adapter is unused
   under MoE (it stays in the checkpoint, untouched).
 - Encoders are frozen and run under no_grad (nothing upstream of their output trains). Their
   features are taken with a forward hook on the block (carpe.hidden_state_at), not
   output_hidden_states, which FSDP2's class swap silently breaks in transformers 5.
 - Experts no sample of the batch chose get zero (not None) adapter gradients through a
   0 * sum(params) term in the balance loss, so every rank reduce-scatters the same tensors. Under
   FSDP2 the frozen encoders stay outside FSDP (ignored_params): a rank that routes nothing to an
   expert never calls its encoder, so a sharded tower would miss its all-gather there.
 - New modules (adapters, router, random experts) are initialised under MoEConfig.seed without
   touching the global RNG.

CuMo (read from SHI-Labs/CuMo; what is assumed is said so):
 - cumo/model/multimodal_encoder/clip_smoe.py, CLIPSMoEVisionTransformer: embeddings,
   pre_layrnorm, encoder.layers.{i} (self_attn.{q,k,v,out}_proj, layer_norm1, gate (Linear(width,
   n_experts, bias=False)), experts.{j}.fc1 / fc2 (CLIP MLPs), layer_norm2); no post_layernorm.
   CLIPEncoderMoELayer.forward: gate softmax in fp32, top-k (num_selected), weights renormalised
   to sum 1. The tower returns the input of its last layer (= HF hidden_states[-2]); CLS dropped.
 - cumo/model/multimodal_encoder/clip_encoder.py, CLIPVisionTower: the tower's CLIPVisionConfig and
   CLIPImageProcessor come from the checkpoint config's mm_vision_tower (a CLIP id); num_experts and
   num_selected from the same config.json. cumo/model/llava_arch.py: the tower sits at
   model.vision_tower.vision_model, so the checkpoint keys are `model.vision_tower.vision_model.<...>`.
 - We build the tower from the checkpoint itself: an HF-style `vision_config` in its config.json if
   there is one, else the tensors' shapes (layers, width, MLP width, experts, patch size, channels,
   image size from the position embedding); then OpenAI CLIP's head size 64, quick_gelu and
   eps 1e-5 (assumed). Top-k: config.json's num_selected, else ExpertConfig.moe_top_k. Weights come
   from safetensors shards with model.safetensors.index.json (assumed layout; a single
   model.safetensors, or pytorch_model*.bin read with weights_only=True, also work). The key map
   CuMo -> ours is explicit and every key is checked both ways (missing, extra or mis-shaped =
   ValueError naming it). Our unused post_layernorm (not in CuMo) is set to the identity.
   Preprocessing: the folder's preprocessor_config.json, else the processor of its mm_vision_tower.
   CuMo also concatenates a multi-scale (S^2) view; we run single-scale.
 - Compiled (`--compile`, regional through kernels.compile_blocks), the MoE layers take a dense
   static-shape form of the same top-2 sum (CLIPSparseMoE): every expert on every token, weight
   0 for the unchosen, bit-identical here to the eager sparse form, 2x the MoE MLPs' FLOPs.
"""
import argparse
import json
import math
import os
import re
from dataclasses import dataclass, asdict, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from safetensors import safe_open
from transformers import (AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          SiglipVisionConfig, SiglipVisionModel)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPMLP

from carpe import MLP, expand_to_square, hidden_state_at, meta_llava

# normalisation constants of the three families, for experts whose preprocessing is written by hand
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FAMILIES = ("base_clip", "siglip", "dinov2", "clip_moe")
FAMILY_ALIASES = {"clip": "base_clip", "cumo": "clip_moe"}  # short names accepted by parse_experts
CUMO_PREFIX = "model.vision_tower.vision_model."  # where CuMo's LLaVA-Mistral keeps its CLIP-MoE tower
CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT-B/L uses 64-wide attention heads


# -----------------------------------------------------------------------------
# config

@dataclass
class ExpertConfig:
    name: str  # key of the expert everywhere (pixel_values dict, module names, logs, histograms)
    family: str  # base_clip (the base LLaVA's own tower) | siglip | dinov2 | clip_moe (CuMo)
    source: str = ""  # HF id or local folder for from_pretrained / the CuMo checkpoint; "" for base_clip
    image_size: int | None = None  # square input side; None = the expert's image processor's own
    image_mean: tuple | None = None  # hand-written normalisation (tiny experts, or base_clip without its processor)
    image_std: tuple | None = None
    feature_layer: int = -2  # hidden_states index the features are read from (base_clip: the base's own)
    has_cls: bool = True  # drop one prefix token (CLS) from the features
    moe_experts: int = 4  # clip_moe built from `tiny`: MLP experts per layer (a checkpoint's count is read from it)
    moe_top_k: int = 2  # clip_moe: experts per token, unless the checkpoint's config.json gives num_selected
    tiny: dict | None = None  # build from this config dict (random init, offline) instead of loading `source`
    processor: str = ""  # HF id or folder of the image processor; "" = `source` (CuMo: else its mm_vision_tower)

    @property
    def hand_written(self):
        """Preprocessing from image_size / image_mean / image_std instead of an image processor."""
        return self.image_mean is not None


def paper_experts():
    return [
        ExpertConfig("clip", "base_clip"),
        ExpertConfig("siglip", "siglip", "google/siglip-so400m-patch14-384", has_cls=False),
        # DINOv2 at 336 px: its interpolated position embeddings give the base grid (24x24) itself,
        # where its processor's 224 px crop would give 16x16 stretched to it
        ExpertConfig("dinov2", "dinov2", "facebook/dinov2-large", image_size=336),
        ExpertConfig("cumo", "clip_moe", "shi-labs/CuMo-mistral-7b"),
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
            check_expert(e)
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


def check_expert(e: ExpertConfig):
    """Normalise the JSON-born lists to tuples and refuse configs that cannot be built, naming the expert."""
    where = f"expert {e.name!r}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", e.name):
        raise ValueError(f"{where}: a name is letters, digits, '_' or '-' (it names modules and histogram keys)")
    if e.family not in FAMILIES:
        raise ValueError(f"{where}: unknown family {e.family!r}; known: {FAMILIES}")
    if e.image_mean is not None:
        e.image_mean = tuple(e.image_mean)
    if e.image_std is not None:
        e.image_std = tuple(e.image_std)
    if (e.image_mean is None) != (e.image_std is None) or (e.hand_written and e.image_size is None):
        raise ValueError(f"{where}: hand-written preprocessing needs image_size, image_mean and image_std together")
    if e.hand_written and e.tiny is None and e.family != "base_clip":
        raise ValueError(f"{where}: image_mean / image_std of a loaded expert come from its image processor "
                         f"(set `processor` to use another one)")
    if e.tiny is not None and not e.hand_written:
        raise ValueError(f"{where}: a tiny expert has no image processor; give image_size, image_mean, image_std")
    if e.family != "base_clip" and e.tiny is None and not e.source:
        raise ValueError(f"{where}: family {e.family} needs a source (a Hub id or a local folder)")
    if e.family == "base_clip" and e.source:
        raise ValueError(f"{where}: base_clip is the base LLaVA's own tower and takes no source, got {e.source!r}")


# -----------------------------------------------------------------------------
# experts from the command line or a JSON file

EXPERT_SPEC_HELP = "NAME[:FAMILY]=SOURCE[@LAYER] entries separated by commas, a bare paper expert name, or a .json file"


def parse_experts(spec):
    """The expert list of a run, from a JSON file or a comma list (None or "" = the paper's four).

    Comma list: entries NAME[:FAMILY]=SOURCE[@LAYER] or a bare paper expert name (clip, siglip,
    dinov2, cumo = its default), for example
        clip,siglip=/models/siglip,dinov2=facebook/dinov2-large@-2,cumo=/ckpt/cumo,mine:dinov2=/m/dino
      NAME    the expert's key (letters, digits, '_', '-') in module names, logs and histograms
      FAMILY  base_clip (alias clip) | siglip | dinov2 | clip_moe (alias cumo). Omitted: NAME when it
              is a family or alias, base_clip for SOURCE "base", else the model_type of SOURCE's
              config.json (siglip / siglip_vision_model, dinov2, or a CuMo config with clip_smoe)
      SOURCE  a local folder or a Hub id; "base" = the base LLaVA's own tower (family base_clip)
      LAYER   the hidden_states index of the features (default -2)
    JSON file: a list of objects with ExpertConfig's fields (name and source required unless the
    name is a paper expert; family inferred as above; has_cls defaults to False for siglip), e.g.
        [{"name": "siglip", "source": "/models/siglip"},
         {"name": "dino", "family": "dinov2", "source": "facebook/dinov2-base", "feature_layer": -1,
          "image_size": 336}]
    Errors name the entry."""
    if spec is None or not spec.strip():
        return paper_experts()
    if spec.strip().endswith(".json") or os.path.isfile(spec):
        with open(spec) as f:
            entries = json.load(f)
        if not isinstance(entries, list):
            raise ValueError(f"{spec}: expected a JSON list of expert objects, got {type(entries).__name__}")
        experts = [expert_from_dict(d, f"{spec} entry {i}") for i, d in enumerate(entries)]
    else:
        experts = [expert_from_text(text.strip()) for text in spec.split(",") if text.strip()]
    return MoEConfig(experts=experts).experts  # the config's checks, once for all entries


def expert_from_text(text):
    """One comma-list entry NAME[:FAMILY]=SOURCE[@LAYER] (or a paper expert's name) -> ExpertConfig."""
    if "=" not in text:
        return expert_from_dict({"name": text}, f"expert entry {text!r}")
    head, source = text.split("=", 1)
    name, _, family = head.partition(":")
    entry = dict(name=name, source=source)
    if family:
        entry["family"] = family
    if "@" in source:
        source, _, layer = source.rpartition("@")
        if not re.fullmatch(r"-?\d+", layer):
            raise ValueError(f"expert entry {text!r}: the feature layer after '@' must be an integer, got {layer!r}")
        entry.update(source=source, feature_layer=int(layer))
    return expert_from_dict(entry, f"expert entry {text!r}")


def expert_from_dict(entry, where):
    """One JSON object (or parsed comma entry) -> ExpertConfig; `where` names it in errors."""
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ValueError(f"{where}: an expert needs at least a name, got {entry!r}")
    known = {f.name for f in fields(ExpertConfig)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    defaults = {e.name: e for e in paper_experts()}
    if set(entry) == {"name"}:
        if entry["name"] not in defaults:
            raise ValueError(f"{where}: {entry['name']!r} is not a paper expert ({sorted(defaults)}); "
                             f"write NAME=SOURCE (or give a source in the JSON)")
        return defaults[entry["name"]]
    entry = dict(entry)
    entry["family"] = expert_family(entry, where)
    if entry["family"] == "base_clip":
        if entry.get("source", "") not in ("", "base"):
            raise ValueError(f"{where}: family base_clip is the base LLaVA's own tower; its source is 'base', "
                             f"got {entry['source']!r}")
        entry["source"] = ""
    elif not entry.get("source") and entry.get("tiny") is None:
        raise ValueError(f"{where}: no source (a Hub id or a local folder)")
    entry.setdefault("has_cls", entry["family"] != "siglip")  # SigLIP's ViT has no CLS token
    try:
        expert = ExpertConfig(**entry)
        check_expert(expert)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return expert


def expert_family(entry, where):
    """The family an entry names, or the one its name, source or source's config.json implies."""
    family, name, source = entry.get("family"), entry["name"], entry.get("source", "")
    if family:
        family = FAMILY_ALIASES.get(family, family)
        if family not in FAMILIES:
            raise ValueError(f"{where}: unknown family {entry['family']!r}; known: {FAMILIES} "
                             f"(aliases {FAMILY_ALIASES})")
        return family
    if source == "base":
        return "base_clip"
    if name in FAMILIES or name in FAMILY_ALIASES:
        return FAMILY_ALIASES.get(name, name)
    config_path = os.path.join(source, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
        model_type = config.get("model_type")
        if model_type in ("siglip", "siglip_vision_model"):
            return "siglip"
        if model_type == "dinov2":
            return "dinov2"
        if config.get("clip_smoe"):
            return "clip_moe"
        raise ValueError(f"{where}: cannot tell the family of {config_path} (model_type {model_type!r}); "
                         f"write NAME:FAMILY=SOURCE with FAMILY one of {FAMILIES}")
    raise ValueError(f"{where}: cannot tell the family of {source!r} (not a folder with a config.json); "
                     f"write NAME:FAMILY=SOURCE with FAMILY one of {FAMILIES}")


# -----------------------------------------------------------------------------
# CuMo's CLIP-MoE: a transformers CLIPVisionModel with sparse-MoE MLPs

def cumo_vision_config():
    """CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower the released CuMo upcycles."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=768)


class CLIPSparseMoE(nn.Module):
    """Per token: gate softmax (fp32) -> top-k of n CLIP MLPs -> weights renormalised to sum to 1.
    The same sum in the same expert order, two ways: eager, sparse (each expert on the tokens that
    chose it: data-dependent sizes); compiled, dense (every expert on every token, weight 0 for the
    unchosen: static shapes for fullgraph=True; an exact 0 product, so the same sum, at n / k times
    the MoE MLPs' FLOPs: CuMo 4 / 2, the whole tower ~1.76x)."""

    def __init__(self, vision_config, n_experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(vision_config.hidden_size, n_experts, bias=False)
        self.experts = nn.ModuleList([CLIPMLP(vision_config) for _ in range(n_experts)])

    def forward(self, x):  # (B, N, D)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # (T, E) fp32
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (T, k)
        weights = weights / weights.sum(-1, keepdim=True)
        out = (self.dense if torch.compiler.is_compiling() else self.sparse)(x, weights, chosen)  # (T, D)
        return out.view(shape)

    def sparse(self, x, weights, chosen):
        """x (T, D); weights, chosen (T, k) -> (T, D), each expert on its own tokens."""
        out = torch.zeros_like(x)  # (T, D)
        for j, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == j)  # tokens that picked expert j, and in which slot
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weights[token, slot, None].to(x.dtype)  # (t_j, D)
            out.index_add_(0, token, y)
        return out

    def dense(self, x, weights, chosen):
        """The same sum with static shapes: every expert on every token, 0 for the unchosen."""
        dense_weights = torch.zeros(x.size(0), len(self.experts), dtype=weights.dtype, device=x.device)
        dense_weights = dense_weights.scatter(1, chosen, weights).to(x.dtype)  # (T, E)
        out = torch.zeros_like(x)  # (T, D)
        for j, expert in enumerate(self.experts):
            out = out + expert(x) * dense_weights[:, j, None]
        return out


def build_clip_moe(vision_config, n_experts=4, top_k=2):
    """A CLIPVisionModel whose every encoder layer's MLP is a CLIPSparseMoE (random init)."""
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


def cumo_tower_config(tensors, checkpoint_config, prefix=CUMO_PREFIX, source="CuMo checkpoint"):
    """(CLIPVisionConfig, n_experts) of the CLIP-MoE tower stored in `tensors`: the checkpoint's
    config.json `vision_config` when it has one, else read off the tensors' shapes."""
    needed = ["embeddings.class_embedding", "embeddings.patch_embedding.weight",
              "embeddings.position_embedding.weight", "encoder.layers.0.gate.weight",
              "encoder.layers.0.experts.0.fc1.weight"]
    missing = [prefix + k for k in needed if prefix + k not in tensors]
    if missing:
        raise ValueError(f"{source}: cannot read the CLIP-MoE tower's shape, missing key(s) {missing}")
    n_experts = checkpoint_config.get("num_experts") or tensors[prefix + "encoder.layers.0.gate.weight"].shape[0]
    if checkpoint_config.get("vision_config"):
        return CLIPVisionConfig(**checkpoint_config["vision_config"]), n_experts
    width = tensors[prefix + "embeddings.class_embedding"].shape[0]
    _, channels, patch, _ = tensors[prefix + "embeddings.patch_embedding.weight"].shape  # (D, C, p, p)
    n_positions = tensors[prefix + "embeddings.position_embedding.weight"].shape[0]  # 1 (CLS) + g * g
    grid = math.isqrt(n_positions - 1)
    if grid * grid != n_positions - 1:
        raise ValueError(f"{source}: {prefix}embeddings.position_embedding.weight has {n_positions} rows, "
                         f"not 1 + a square patch grid")
    if width % CLIP_HEAD_DIM:
        raise ValueError(f"{source}: width {width} is not a multiple of CLIP's head size {CLIP_HEAD_DIM}; "
                         f"give the tower's vision_config (num_attention_heads) in its config.json")
    layer_ids = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    config = CLIPVisionConfig(hidden_size=width, num_attention_heads=width // CLIP_HEAD_DIM,
                              intermediate_size=tensors[prefix + "encoder.layers.0.experts.0.fc1.weight"].shape[0],
                              num_hidden_layers=max(layer_ids) + 1, patch_size=patch, image_size=grid * patch,
                              num_channels=channels, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return config, n_experts


def load_cumo(expert: ExpertConfig):
    """The CLIP-MoE tower of the CuMo checkpoint `expert.source`, built to its own shape."""
    tensors = read_checkpoint_tensors(expert.source, CUMO_PREFIX)
    config_path = find_file(expert.source, "config.json")
    checkpoint_config = {}
    if config_path is not None:
        with open(config_path) as f:
            checkpoint_config = json.load(f)
    vision_config, n_experts = cumo_tower_config(tensors, checkpoint_config, source=expert.source)
    model = build_clip_moe(vision_config, n_experts, checkpoint_config.get("num_selected", expert.moe_top_k))
    return load_cumo_state(model, tensors, source=expert.source)


def find_file(source, filename):
    """Path of `filename` in a local folder or a Hub repo (downloaded into the HF cache), or None."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.exists(path) else None
    try:
        return hf_hub_download(source, filename)
    except EntryNotFoundError:
        return None


def read_checkpoint_tensors(source, prefix):
    """Every tensor whose key starts with `prefix` from a HF repo id or local folder, reading only the
    shards that hold them. Never executes code: safetensors, or torch.load(weights_only=True)."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = find_file(source, index_name)
        if index is not None:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
        elif find_file(source, single_name) is not None:
            files = [single_name]
        else:
            continue
        tensors = {}
        for file in files:
            path = find_file(source, file)
            if path is None:
                raise FileNotFoundError(f"{source}: {index_name} names the shard {file}, which is missing")
            if file.endswith(".safetensors"):
                with safe_open(path, framework="pt") as s:
                    tensors.update({k: s.get_tensor(k) for k in s.keys() if k.startswith(prefix)})
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                tensors.update({k: v for k, v in state.items() if k.startswith(prefix)})
        if not tensors:
            raise ValueError(f"{source}: no tensor under {prefix!r} (is this a CuMo CLIP-MoE checkpoint?)")
        return tensors
    raise FileNotFoundError(f"{source}: found neither safetensors nor pytorch_model.bin weights")


# -----------------------------------------------------------------------------
# per-expert image preprocessing

def hand_image_processor(expert: ExpertConfig):
    """A PIL CLIP image processor from hand-written size / mean / std: bicubic resize straight to
    the square size, rescale to [0, 1], normalise."""
    side = expert.image_size
    return CLIPImageProcessorPil(size={"height": side, "width": side}, do_center_crop=False,
                                 image_mean=list(expert.image_mean), image_std=list(expert.image_std),
                                 resample=Image.BICUBIC)


def load_image_processor(expert: ExpertConfig, base_image_processor=None):
    """The expert's image processor (PIL backend): hand-written, the base's (base_clip), or read by
    AutoImageProcessor from `processor`, else `source` (CuMo without one: its mm_vision_tower's)."""
    if expert.hand_written:
        return hand_image_processor(expert)
    if expert.family == "base_clip":
        if base_image_processor is None:
            raise ValueError(f"expert {expert.name!r}: the base LLaVA's image processor is needed "
                             f"(build_vision_moe(..., image_processor=processor.image_processor))")
        return base_image_processor
    where = expert.processor or expert.source
    if expert.family == "clip_moe" and not expert.processor and find_file(where, "preprocessor_config.json") is None:
        config_path = find_file(expert.source, "config.json")
        tower = None
        if config_path is not None:
            with open(config_path) as f:
                tower = json.load(f).get("mm_vision_tower")
        if not tower:
            raise ValueError(f"expert {expert.name!r}: {expert.source} has neither a preprocessor_config.json nor "
                             f"a config.json naming mm_vision_tower; set the expert's `processor`")
        where = tower
    side = expert.image_size
    override = {} if side is None else dict(size={"height": side, "width": side},
                                            crop_size={"height": side, "width": side})
    return AutoImageProcessor.from_pretrained(where, backend="pil", **override)


class MoEImageTransform:
    """list[PIL.Image] -> dict expert name -> (n, 3, S_e, S_e) float32: LLaVA's pad-to-square with
    the processor's mean colour, then that expert's image processor. A plain object (no weights),
    so DataLoader workers can hold it."""

    def __init__(self, image_processors: dict):
        self.image_processors = dict(image_processors)
        self.backgrounds = {name: tuple(int(255 * m) for m in p.image_mean)  # as LLaVA's expand2square
                            for name, p in self.image_processors.items()}
        self.sides = {name: self.output_side(name) for name in self.image_processors}

    def output_side(self, name):
        """The square side the processor produces (asked of the processor itself, whatever its
        resize / crop settings); a non-square output is refused."""
        h, w = self.image_processors[name]([Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"].shape[-2:]
        if h != w:
            raise ValueError(f"expert {name!r}: its image processor makes {h}x{w} images; CARPE-MoE needs squares")
        return h

    def __call__(self, images):
        out = {}
        for name, processor in self.image_processors.items():
            if not images:
                out[name] = torch.zeros(0, 3, self.sides[name], self.sides[name])
                continue
            squares = [expand_to_square(image.convert("RGB"), self.backgrounds[name]) for image in images]
            out[name] = processor(squares, return_tensors="pt")["pixel_values"]  # (n, 3, S, S)
        return out


# -----------------------------------------------------------------------------
# the experts and the router

def build_encoder(expert: ExpertConfig, dtype):
    """A frozen vision encoder for one (non-base) expert: random from its `tiny` config, or loaded."""
    if expert.family == "siglip":
        if expert.tiny is not None:
            return SiglipVisionModel(SiglipVisionConfig(**expert.tiny))
        return load_pretrained(SiglipVisionModel, expert.source, dtype)
    if expert.family == "dinov2":
        if expert.tiny is not None:
            return Dinov2Model(Dinov2Config(**expert.tiny))
        return load_pretrained(Dinov2Model, expert.source, dtype)
    if expert.family == "clip_moe":
        if expert.tiny is not None:
            return build_clip_moe(CLIPVisionConfig(**expert.tiny), expert.moe_experts, expert.moe_top_k)
        return load_cumo(expert)
    raise ValueError(f"expert {expert.name!r}: family {expert.family!r} has no encoder builder")


def load_pretrained(model_class, source, dtype):
    """model_class.from_pretrained(source) that refuses, naming them, tower weights the checkpoint
    lacks (from_pretrained would initialise them at random). Keys it has beyond the tower (the
    text half of a full SigLIP) are ignored."""
    model, info = model_class.from_pretrained(source, dtype=dtype, output_loading_info=True)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(f"{source}: missing {model_class.__name__} weight(s) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    return model


class VisionMoE(nn.Module):
    def __init__(self, llava, config: MoEConfig, encoders: dict, image_transform: MoEImageTransform):
        super().__init__()
        self.config = config
        self.expert_names = [e.name for e in config.experts]  # router order: route e = expert_names[e]
        vcfg = llava.config.vision_config
        d = llava.config.text_config.hidden_size
        if not isinstance(llava.config.vision_feature_layer, int):
            raise ValueError(f"CARPE-MoE needs a base that reads one vision layer; this one concatenates layers "
                             f"{llava.config.vision_feature_layer} (vision_feature_layer)")
        self.grid = vcfg.image_size // vcfg.patch_size  # the base tower's grid side (24 for LLaVA-1.5)
        self.encoders = nn.ModuleDict(encoders)  # frozen; "clip" may be llava's own vision_tower
        self.llm_adapters = nn.ModuleDict()  # into the LLM embedding space (adapter lr)
        self.raw_adapters = nn.ModuleDict()  # into the integrator's memory
        self.image_transform = image_transform
        self.expert_grids = {}
        for e in config.experts:
            enc = self.encoders[e.name]
            width = enc.config.hidden_size
            self.expert_grids[e.name] = image_transform.sides[e.name] // enc.config.patch_size
            shared = e.family == "base_clip"  # the clip expert's LLM adapter IS the base's projector (not a copy)
            self.llm_adapters[e.name] = llava.model.multi_modal_projector if shared else MLP(width, d, d)
            self.raw_adapters[e.name] = MLP(width, d, d)
        self.router = nn.Linear(d, len(config.experts))
        nn.init.zeros_(self.router.bias)
        self.base_feature_layer = llava.config.vision_feature_layer
        for p in self.encoders.parameters():
            p.requires_grad_(False)

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
        """0 * (sum of the adapters of the experts no sample chose): zero gradients, not None, so
        every FSDP2 rank reduce-scatters the same tensors (and DDP needs no unused-parameter search)."""
        used = set(route.unique().tolist())
        params = [p for e, name in enumerate(self.expert_names) if e not in used
                  for module in (self.llm_adapters[name], self.raw_adapters[name])
                  for p in module.parameters() if p.requires_grad]
        return 0.0 * sum(p.float().sum() for p in params)  # 0.0 when every expert was chosen

    def routing_histogram(self, route):
        """route (n,) with -1 for samples without image -> {expert name: count}, router order."""
        return route_histogram(route, self.expert_names)


def switch_balance_loss(probs, route):
    """Switch Transformer load balancing: E * sum_e f_e * P_e. probs (n, E) fp32, route (n,).
    f_e (share of samples routed to e) carries no gradient; P_e (mean probability) does.
    Equals 1 for uniform routing, E when everything goes to one expert with certainty."""
    n, E = probs.shape
    f = torch.bincount(route, minlength=E).to(probs.dtype) / n  # (E,)
    P = probs.mean(0)  # (E,)
    return E * (f * P).sum()


def route_histogram(routes, expert_names):
    """Images per expert keyed by name, every expert present, in router order. routes: expert
    indices (a tensor or a list, e.g. the `route` of prediction records); -1 or None = no image."""
    counts = dict.fromkeys(expert_names, 0)
    for r in routes.tolist() if torch.is_tensor(routes) else routes:
        if r is None or r < 0:
            continue
        if r >= len(expert_names):
            raise ValueError(f"route {r} names no expert; the experts are {list(expert_names)}")
        counts[expert_names[r]] += 1
    return counts


# -----------------------------------------------------------------------------
# entry point used by training and run loading

def build_vision_moe(llava, moe_config: MoEConfig, device="cpu", dtype=None, image_processor=None):
    """The VisionMoE for `llava`: the clip expert reuses llava's vision tower and projector; the
    others are loaded (from_pretrained / load_cumo, never trust_remote_code) or, with `tiny`, built
    with random weights. image_processor: the base's, for a clip expert without hand-written
    preprocessing; None = AutoImageProcessor on the folder / id llava was loaded from."""
    base_dtype = llava.model.multi_modal_projector.linear_1.weight.dtype
    dtype = dtype or base_dtype  # of the added encoders; the new adapters and router follow the base projector
    if llava.config.vision_feature_select_strategy != "default":
        raise ValueError("CARPE-MoE needs the base's vision_feature_select_strategy='default' (CLS dropped), "
                         f"got {llava.config.vision_feature_select_strategy!r}")
    needs_base_processor = any(e.family == "base_clip" and not e.hand_written for e in moe_config.experts)
    if needs_base_processor and image_processor is None:
        if not llava.config.name_or_path:
            raise ValueError("the clip expert needs the base's image processor: pass image_processor= (the base "
                             "LLaVA was not loaded from a folder or id to read it from)")
        image_processor = AutoImageProcessor.from_pretrained(llava.config.name_or_path, backend="pil")
    processors = {e.name: load_image_processor(e, image_processor) for e in moe_config.experts}
    image_transform = MoEImageTransform(processors)
    encoders = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(moe_config.seed)
        for e in moe_config.experts:
            if e.family == "base_clip":
                encoders[e.name] = llava.model.vision_tower
            else:
                encoders[e.name] = build_encoder(e, dtype).to(dtype=dtype)
                encoders[e.name].eval()
            check_input_size(e, encoders[e.name], image_transform.sides[e.name])
        vision_moe = VisionMoE(llava, moe_config, encoders, image_transform)
    for module in (vision_moe.llm_adapters, vision_moe.raw_adapters, vision_moe.router):
        module.to(dtype=base_dtype)  # (the shared projector already is)
    return vision_moe.to(device=device)


def check_input_size(expert: ExpertConfig, encoder, side):
    """Refuse, naming the expert, an input size its encoder cannot take: CLIP and SigLIP take their
    own size only (SigLIP so400m/14-384: 27x27 patches, 6 pixels unused); DINOv2 interpolates, so
    any multiple of its patch."""
    patch, own = encoder.config.patch_size, encoder.config.image_size
    if (expert.family == "dinov2" and side % patch) or (expert.family != "dinov2" and side != own):
        raise ValueError(f"expert {expert.name!r}: its preprocessing makes {side}px images; its encoder takes "
                         f"{own}px{'' if expert.family != 'dinov2' else f' (or a multiple of {patch})'}")


# -----------------------------------------------------------------------------
# the paper's experts at their real shapes, for a meta-device build (counts and memory; no download)

# the towers' published configs, written out
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518,
                    patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False)


def paper_scale_experts():
    """The paper's four experts as configs at their real shapes (random init, built from config):
    the clip expert is the base's own tower; SigLIP so400m/14-384; DINOv2-L/14 at 336 px; CuMo's
    CLIP-MoE (ViT-L/14-336, 4 MLP experts per layer, top-2). For meta_vision_moe."""
    clip = dict(image_size=336, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return [ExpertConfig("clip", "base_clip", **clip),
            ExpertConfig("siglip", "siglip", has_cls=False, tiny=SIGLIP_SO400M_384, image_size=384,
                         image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
            ExpertConfig("dinov2", "dinov2", tiny=DINOV2_LARGE, image_size=336, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD),
            ExpertConfig("cumo", "clip_moe", tiny=cumo_vision_config().to_diff_dict(), moe_experts=4, moe_top_k=2,
                         **clip)]


def meta_vision_moe(llava):
    """The paper's VisionMoE at real shapes on the meta device, for a meta `llava` (carpe.meta_llava)."""
    with torch.device("meta"):
        return build_vision_moe(llava, MoEConfig(paper_scale_experts()), device="meta")


def paper_scale_param_counts():
    """Parameter counts (millions) of the four towers and the new trainable modules at 7B."""
    vision_moe = meta_vision_moe(meta_llava())
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    return dict(towers={name: count(enc) for name, enc in vision_moe.encoders.items()},
                llm_adapters={name: count(a) for name, a in vision_moe.llm_adapters.items()},  # clip's = the projector
                raw_adapters={name: count(a) for name, a in vision_moe.raw_adapters.items()},
                router=count(vision_moe.router))


def expert_table(experts):
    """One line per expert: name, family, source, input size, feature layer, CLS."""
    lines = [f"{'name':8s} {'family':10s} {'source':40s} {'size':>9s} {'layer':>5s} cls"]
    for e in experts:
        source = e.source or ("tiny (random)" if e.tiny else "the base LLaVA's tower")
        size = str(e.image_size) if e.image_size else "processor"
        lines.append(f"{e.name:8s} {e.family:10s} {source:40s} {size:>9s} {e.feature_layer:5d} {e.has_cls}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="CARPE-MoE vision experts: print the expert table (the paper's "
                                                 "four, or --experts) and the paper-scale memory plan.")
    parser.add_argument("--experts", default=None, help=f"experts to show instead of the paper's: {EXPERT_SPEC_HELP} "
                                                        "(see parse_experts)")
    parser.add_argument("--plan", action="store_true", help="print parameter counts / memory of the paper-scale towers")
    args = parser.parse_args()
    print(expert_table(parse_experts(args.experts)))
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
