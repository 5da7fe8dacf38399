"""GuppyLM: a vanilla GPT in one file, written to transformers' conventions.

Read top to bottom: MLP -> attention -> decoder layer -> pretrained base -> model -> causal LM.
The architecture is the original transformer decoder as GPT-2 used it, nothing newer:
learned absolute positions, pre-LayerNorm blocks, ReLU feed-forward, LM head tied to the token embedding.

This file is the model's remote code: a saved folder carries it, and `from_pretrained(..., trust_remote_code=True)`
runs it under whatever transformers the user has (tested from 4.57 to 5.25). So it leans only on the surface
transformers keeps stable - `PreTrainedModel`, `GenerationMixin`, `Cache.update` / `get_seq_length`, the output
dataclasses - and owns the rest: the attention mask, both attention kernels and the hidden-state bookkeeping are
a few lines each below. It imports siblings only as `from .configuration_guppylm import ...`.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_guppylm import GuppyConfig

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: generate() passes `cache=` to forward and
# reads the output field `cache`. Guppy's forward takes either name and returns the field this version's outputs have.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GuppyMLP(nn.Module):
    """Position-wise feed-forward: expand, ReLU, project back."""

    def __init__(self, config: GuppyConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states):
        return self.dropout(self.fc_out(torch.relu(self.fc_in(hidden_states))))


def eager_attention(query, key, value, mask, dropout):
    """softmax(QK^T / sqrt(hs)) V spelled out, returning the weights too. mask: bool (B, 1, T, S), True = may look."""
    scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5  # (B, nh, T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return F.dropout(weights, p=dropout) @ value, weights  # (B, nh, T, hs), (B, nh, T, S)


class GuppyAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection."""

    def __init__(self, config: GuppyConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, mask=None, cache: Cache | None = None, output_attentions=False):
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        if cache is not None:
            # the cache appends this step's keys/values and hands back the whole history: (B, nh, T_past + T, hs)
            key, value = cache.update(key, value, self.layer_idx)

        dropout = self.config.attention_dropout if self.training else 0.0
        if output_attentions or self.config._attn_implementation == "eager":
            attn_output, attn_weights = eager_attention(query, key, value, mask, dropout)
        else:
            # torch's fused kernel never materializes the weights. With no mask (no padding, no cache history),
            # its is_causal flag is the cheapest causal mask; one query token after the cache may see everything.
            attn_output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and seq_len > 1
            )
            attn_weights = None
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, seq_len, -1)  # re-assemble heads side by side
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class GuppyDecoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GuppyConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = GuppyAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GuppyMLP(config)

    def forward(self, hidden_states, mask=None, cache=None, output_attentions=False):
        attn_output, attn_weights = self.self_attn(self.input_layernorm(hidden_states), mask, cache, output_attentions)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), attn_weights


def default_position_ids(attention_mask, past_length, seq_len, device):
    """(B or 1, T) positions of the new tokens: after the cached ones; with a 2-D attention mask, counting only real
    tokens, so that a left-padded prompt sees the same positions as the unpadded one."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
    return torch.arange(past_length, past_length + seq_len, device=device)[None]


def attention_mask_4d(attention_mask, position_ids, past_length, query_length, always):
    """Which keys each query may look at: bool (B, 1, T, T_past + T), True = may look; None = plain causal.

    Three rules, combined: causal (never the future); padding (never a position the 2-D `attention_mask` zeroes);
    packing (positions restarting at 0 inside one row start a new sequence, as in padding-free training, and the
    sequences never see each other). With none of them in play, None lets SDPA use its fast causal kernel, unless
    `always` asks for the mask (the eager path needs it). Under torch.export and torch.compile, which trace shapes
    and not values, a given `attention_mask` always becomes the mask and packing is not looked for.
    """
    tracing = torch.compiler.is_compiling()
    padded = attention_mask is not None and (tracing or not bool(attention_mask.all()))
    packed = (
        not tracing and attention_mask is None and past_length == 0 and query_length > 1
        and bool((position_ids[:, 1:] <= position_ids[:, :-1]).any())
    )
    if not (padded or packed or always or (past_length > 0 and query_length > 1)):
        return None
    device = position_ids.device
    key_index = torch.arange(past_length + query_length, device=device)
    mask = key_index[None, :] <= key_index[past_length:, None]  # (T, S) causal
    mask = mask[None, None]  # (1, 1, T, S)
    if padded:
        mask = mask & attention_mask[:, None, None, :].bool()
    if packed:
        starts = F.pad(position_ids[:, 1:] <= position_ids[:, :-1], (1, 0))  # (B, T): True where a sequence begins
        sequence = starts.cumsum(-1)  # (B, T): which packed sequence each token belongs to
        mask = mask & (sequence[:, None, :, None] == sequence[:, None, None, :])
    # A query that may look nowhere (a padding token with only padding before it) would softmax to NaN, and NaN
    # in its keys would poison every real token: let each token see itself.
    return mask | (key_index[None, :] == key_index[past_length:, None])


class GuppyPreTrainedModel(PreTrainedModel):
    config_class = GuppyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GuppyDecoderLayer"]
    _supports_sdpa = True  # torch's fused attention (the default) or the eager one above


class GuppyModel(GuppyPreTrainedModel):
    """Embeddings + decoder stack + final LayerNorm; returns hidden states, not logits."""

    def __init__(self, config: GuppyConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GuppyDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False  # gradient_checkpointing_enable() sets it, and the function to use
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs,  # e.g. cache_position from older generate(): the cache's own length says the same
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would append their keys/values to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache()
        elif not use_cache:
            cache = None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        batch_size, seq_len = inputs_embeds.shape[:2]

        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_length, seq_len, inputs_embeds.device)
        position_ids = position_ids.expand(batch_size, seq_len)
        # The context is the table of learned positions: a row may be longer (packed sequences restart at 0).
        if not torch.compiler.is_compiling() and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} is past the model's context of "
                f"{self.config.max_position_embeddings} tokens; cut the prompt to fit"
            )

        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        eager = output_attentions or self.config._attn_implementation == "eager"
        mask = attention_mask_4d(attention_mask, position_ids, past_length, seq_len, always=eager)

        all_hidden_states, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)  # what this layer reads
            if self.gradient_checkpointing and self.training:
                hidden_states, attn_weights = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, mask, None, output_attentions
                )
            else:
                hidden_states, attn_weights = layer(hidden_states, mask, cache, output_attentions)
            if output_attentions:
                all_attentions.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_FIELD: cache},
        )
        return output if return_dict is not False else output.to_tuple()


class GuppyForCausalLM(GuppyPreTrainedModel, GenerationMixin):
    """GuppyModel + LM head (the token embedding, transposed)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GuppyConfig):
        super().__init__(config)
        self.model = GuppyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs,  # passed to the loss (num_items_in_batch from Trainer)
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if position_ids is None:
            seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = default_position_ids(attention_mask, past_length, seq_len, self.lm_head.weight.device)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        # generate() asks for the last position only (logits_to_keep=1); 0 keeps every position
        logits = self.lm_head(hidden_states[:, -logits_to_keep:, :])  # (B, T, vocab)
        if not self.training and self.config.eos_token_id is not None:
            # The token predicted at the last learned position could never be read back: there the model ends the
            # reply with <|im_end|>, so generate() stops cleanly at the context's end instead of failing mid-reply.
            # (No label ever sits past the context, so no loss sees this.)
            at_end = position_ids[:, -logits.shape[1] :] == self.config.max_position_embeddings - 1  # (B, T_kept)
            eos = torch.zeros_like(logits[0, 0], dtype=torch.bool)
            eos[self.config.eos_token_id] = True
            logits = logits.masked_fill(at_end[..., None] & ~eos, torch.finfo(logits.dtype).min)

        loss = None
        if labels is not None:
            # labels may simply be input_ids: padding never carries loss; the loss function shifts by one itself
            labels = labels.masked_fill(labels == self.config.pad_token_id, -100)
            kwargs = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index", "shift_labels")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = ["GuppyForCausalLM", "GuppyModel", "GuppyPreTrainedModel"]
