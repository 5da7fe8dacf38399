"""GuppyLM: a vanilla GPT in one file, written to transformers' conventions.

Read top to bottom: MLP -> attention -> decoder layer -> pretrained base -> model -> causal LM.
The architecture is the original transformer decoder as GPT-2 used it, nothing newer:
learned absolute positions, pre-LayerNorm blocks, ReLU feed-forward, LM head tied to the token embedding.
This file imports siblings only as `from .configuration_guppylm import ...`, so a saved model folder
loads with `trust_remote_code=True` in a program that does not have guppylm installed.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_guppylm import GuppyConfig


class GuppyMLP(nn.Module):
    """Position-wise feed-forward: expand, ReLU, project back."""

    def __init__(self, config: GuppyConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states):
        return self.dropout(self.fc_out(torch.relu(self.fc_in(hidden_states))))


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax(QK^T / sqrt(d)) V, returning the attention weights too. Shapes: (B, nh, T, hs)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, T_past + T)
    if attention_mask is not None:
        # create_causal_mask gives a boolean mask (True = may attend) when SDPA is configured, an additive one otherwise
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return attn_output, attn_weights


class GuppyAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection."""

    def __init__(self, config: GuppyConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask=None, past_key_values: Cache | None = None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)

        if past_key_values is not None:
            # the cache appends this step's keys/values and hands back the whole history: (B, nh, T_past + T, hs)
            key, value = past_key_values.update(key, value, self.layer_idx)

        # SDPA never materializes the attention weights, so a request for them takes the eager path.
        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager" and not kwargs.get("output_attentions"):
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)  # re-assemble heads side by side
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class GuppyDecoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GuppyConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = GuppyAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GuppyMLP(config)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, past_key_values=past_key_values, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GuppyPreTrainedModel(PreTrainedModel):
    config_class = GuppyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GuppyDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # output_hidden_states / output_attentions are collected by hooks on these modules (transformers' capture_outputs)
    _can_record_outputs = {"hidden_states": GuppyDecoderLayer, "attentions": GuppyAttention}


class GuppyModel(GuppyPreTrainedModel):
    """Embeddings + decoder stack + final LayerNorm; returns hidden states, not logits."""

    def __init__(self, config: GuppyConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GuppyDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        total_length = past_length + inputs_embeds.shape[1]
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {total_length} tokens is longer than the model's context of "
                f"{self.config.max_position_embeddings}; truncate the prompt"
            )
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # count only real tokens, so a left-padded prompt sees the same positions as the unpadded one
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:total_length]
            else:
                position_ids = torch.arange(past_length, total_length, device=inputs_embeds.device).unsqueeze(0)

        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))

        # One mask for all layers: causal + padding. With nothing to pad, SDPA gets None and uses is_causal.
        # Attention weights are computed on the eager path, which needs the mask materialized.
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            allow_is_causal_skip=not kwargs.get("output_attentions"),
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, past_key_values=past_key_values, **kwargs)

        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class GuppyForCausalLM(GuppyPreTrainedModel, GenerationMixin):
    """GuppyModel + LM head (the token embedding, transposed)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GuppyConfig):
        super().__init__(config)
        self.model = GuppyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # generate() asks for the last position only (logits_to_keep=1); 0 keeps every position
        logits = self.lm_head(hidden_states[:, -logits_to_keep:, :])  # (B, T, vocab)

        loss = None
        if labels is not None:
            # labels may simply be input_ids: padding never carries loss; the loss function shifts by one itself
            labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["GuppyForCausalLM", "GuppyModel", "GuppyPreTrainedModel"]
