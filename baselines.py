"""
baselines.py: the paper's comparison models (CARPE section 4.2) behind CARPE's API, so that
train.py, eval.py and the checkpoints treat every method alike: forward -> CarpeOutput,
generate(..., return_dict=True) -> GenerateOutput and the trainable-set API
(is_trainable_name, param_groups, trainable_state_dict, load_trainable_state_dict,
set_context_trainable), all from carpe.LlavaWrapper.

    model = build_model("levi", llava, CarpeConfig())   # "carpe", "llava", "imagenet-ft" or "levi"

 - LlavaBaseline: vanilla LLaVA-1.5. Its logits are HF LLaVA's own (the head reads H_llm, the
   context weights are fixed at (vision, language) = (0, 1)). Two methods use it:
   "llava", evaluated frozen (the base model of Tables 2 and 3), and "imagenet-ft", the
   ImageNet fine-tune of Zhang et al. 2024, where train.py trains the projector alone at the
   adapter learning rate on the ImageNet prompts. WiSE-FT needs no model of its own: its
   weights interpolate two checkpoints' (common.interpolate_weights).
 - LEVI (Roh et al. 2024), as the CARPE paper adapts it to a generative LVLM: LEVI's
   task-specific branch becomes the projector's output (image embeddings already in the
   language space), read by five adapting layers attached to the LM's last five decoder
   layers. Each is carpe.IntegratorBlock (cross-attention with queries from its LM layer's
   output and keys/values from the projector output, causal self-attention, MLP). The five
   adapted states are averaged and go through the LM's final norm and the shared head in
   place of H_llm. Unlike CARPE there is no context encoder and no mix with H_llm, and the
   vision side never sees the raw vision features.
CarpeConfig.gradient_checkpointing applies to every method: the LM's decoder layers are
checkpointed (carpe.enable_checkpointing); LEVI's LM has no backward (nothing upstream of it
trains), so LEVI checkpoints its five blocks instead.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from carpe import (CARPE, CarpeConfig, CarpeOutput, IntegratorBlock, LlavaWrapper, Prepared, check_base, check_images,
                   embed_inputs, enable_checkpointing, final_norm, per_sample, positions_from_mask,
                   raw_vision_features, run_language_model, untie_head)
from kernels import fused_mixed_cross_entropy


# -----------------------------------------------------------------------------
# vanilla LLaVA (frozen: "llava"; projector fine-tuned on ImageNet: "imagenet-ft")

class LlavaBaseline(LlavaWrapper):
    """Vanilla LLaVA behind CARPE's API. `eval.py --method llava` uses it frozen; `train.py
    --method imagenet-ft` trains its projector alone at the adapter lr, as Zhang et al. 2024.
    LEVI adds its blocks to this forward; here the head reads H_llm."""

    def __init__(self, llava, config: CarpeConfig = None):
        super().__init__()
        check_base(llava)
        self.llava = llava
        self.config = config
        self.query_layers = []
        self.apply_freezing()
        if config is not None and config.gradient_checkpointing:
            enable_checkpointing(self.language_model)

    def is_trainable_name(self, name):
        return name.startswith("llava.model.multi_modal_projector.")

    def prepare(self, input_ids, attention_mask, pixel_values, weights=(0.0, 1.0), keep_memory=False):
        """LLaVA's own input embeddings; memory = the projected image embeddings (B, P, d) if asked."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        has_image = check_images(self.llava, input_ids, pixel_values)  # (B,)
        image_embeds = None
        if has_image.any():  # LLaVA's own image path
            image_embeds = self.llava.model.multi_modal_projector(raw_vision_features(self.llava, pixel_values))
        memory = per_sample(image_embeds, has_image) if keep_memory and image_embeds is not None else None
        return Prepared(attention_mask=attention_mask, inputs_embeds=embed_inputs(self.llava, input_ids, image_embeds),
                        weights=torch.tensor(weights, device=input_ids.device).expand(input_ids.size(0), 2),
                        has_image=has_image, memory=memory)

    def vision_hidden(self, h_llm, captured, memory_kvs, has_image, key_valid, caches=None, cache_len=0):
        """No vision side: H_llm itself (its weight is 0 anyway)."""
        return h_llm

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None):
        prep = self.prepare(input_ids, attention_mask, pixel_values)
        mask = prep.attention_mask  # (B, T)
        h_llm, captured = run_language_model(self.language_model, self.main_pass_inputs(prep.inputs_embeds), mask,
                                             positions_from_mask(mask), self.query_layers)  # (B, T, d), [(B, T, d)]
        key_valid = None if bool(mask.all()) else mask.bool()
        memory_kvs = [block.memory_kv(prep.memory) for block in self.integrator_blocks()]
        h = self.vision_hidden(h_llm, captured, memory_kvs, prep.has_image, key_valid)  # (B, T, d)
        out = CarpeOutput(context_weights=prep.weights)
        head = self.llava.lm_head
        if labels is None:
            out.logits = head(h)  # (B, T, V)
        else:  # one-hot weights: the mix is h itself, through the same chunked loss
            chunk_size = (self.config or CarpeConfig()).chunk_size
            out.loss = out.lm_loss = fused_mixed_cross_entropy(h, h, prep.weights, labels, head.weight, head.bias,
                                                               chunk_size=chunk_size)
        return out


# -----------------------------------------------------------------------------
# LEVI with five integrator blocks on the last five LM layers

class LEVI(LlavaBaseline):
    """The paper's adaptation of LEVI (Roh et al. 2024; CARPE section 4.2): five integrator
    blocks (the same IntegratorBlock as CARPE's); block i's queries are the output of the i-th of
    the LM's last five layers, its keys/values the projector output (image embeddings already in
    the language space, unlike CARPE's raw features). The five adapted states are averaged,
    normalised by the LM's final norm (as CARPE's H_vision) and go through the shared head.
    Trainable: the blocks and the head."""

    def __init__(self, llava, config: CarpeConfig = None, n_blocks=5):
        config = config or CarpeConfig()
        super().__init__(llava, config)
        untie_head(llava)
        text_config = llava.config.text_config
        n_layers = text_config.num_hidden_layers
        assert n_layers >= n_blocks, f"LEVI needs {n_blocks} LM layers, the base has {n_layers}"
        self.query_layers = list(range(n_layers - n_blocks, n_layers))
        d = text_config.hidden_size
        self.blocks = nn.ModuleList(IntegratorBlock(d, config.integrator_heads, config.mlp_ratio, self_attn=True)
                                    for _ in range(n_blocks))
        self.to(device=llava.lm_head.weight.device)
        self.blocks.to(dtype=llava.lm_head.weight.dtype)
        self.apply_freezing()

    def is_trainable_name(self, name):
        return name.startswith(("blocks.", "llava.lm_head."))

    def prepare(self, input_ids, attention_mask, pixel_values):
        return super().prepare(input_ids, attention_mask, pixel_values, weights=(1.0, 0.0), keep_memory=True)

    def integrator_blocks(self):
        return list(self.blocks)

    def vision_hidden(self, h_llm, captured, memory_kvs, has_image, key_valid, caches=None, cache_len=0):
        """final_norm(mean_i block_i(layer_i output)): (B, T, d). With gradient checkpointing, a
        training pass recomputes each block in the backward: LEVI's LM needs no backward (nothing
        upstream of it trains), so the blocks hold all of its activations."""
        checkpointed = self.config.gradient_checkpointing and torch.is_grad_enabled() and caches is None
        caches = caches or [None] * len(self.blocks)
        states = []
        for block, h, kv, cache in zip(self.blocks, captured, memory_kvs, caches):
            if checkpointed:
                states.append(checkpoint(block, h, kv, has_image, key_valid, use_reentrant=False))
            else:
                states.append(block(h, kv, has_image, key_valid, cache, cache_len))
        return final_norm(self.language_model)(torch.stack(states).mean(0))


# -----------------------------------------------------------------------------
# one entry for every method name

METHODS = ("carpe", "llava", "imagenet-ft", "levi")


def build_model(method, llava, carpe_config=None, vision_moe=None):
    """The model for a method name; all share forward / generate / the trainable-set API."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if vision_moe is not None and method != "carpe":
        raise ValueError(f"--moe only applies to method 'carpe', not {method!r}")
    if method == "carpe":
        return CARPE(llava, carpe_config, vision_moe=vision_moe)
    if method == "levi":
        return LEVI(llava, carpe_config)
    return LlavaBaseline(llava, carpe_config)  # "llava" (evaluated frozen) and "imagenet-ft" (projector trained)
