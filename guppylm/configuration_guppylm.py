"""GuppyLM configuration: the numbers that rebuild the model."""

from transformers import PretrainedConfig

# Size presets, one table. Every other number (vocab size, special token ids) comes from the tokenizer.
#   9m   - the reference architecture; meant for one GPU.
#   cpu  - chosen by bench/search_cpu_recipe.py to reach the quality bar in a 5-minute, 2-core CPU budget.
#   tiny - for tests: builds and trains in seconds.
PRESETS = {
    "9m": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, intermediate_size=768, max_position_embeddings=128),
    "cpu": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512, max_position_embeddings=128),
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
}

# The remote code's entry points, written into every saved config.json so that AutoConfig, AutoModel and
# AutoModelForCausalLM find them in a program without guppylm (`trust_remote_code=True`).
AUTO_MAP = {
    "AutoConfig": "configuration_guppylm.GuppyConfig",
    "AutoModel": "modeling_guppylm.GuppyModel",
    "AutoModelForCausalLM": "modeling_guppylm.GuppyForCausalLM",
}


class GuppyConfig(PretrainedConfig):
    """A vanilla GPT: learned positions, pre-LayerNorm blocks, ReLU feed-forward, LM head tied to the embedding."""

    model_type = "guppylm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the KV cache, under its names before and after 5.24

    def __init__(
        self,
        vocab_size=2048,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=768,
        max_position_embeddings=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        use_cache=True,
        persona="guppy",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Which persona pack the model was trained on, so `guppylm eval` knows which prompts to ask.
        self.persona = persona
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @classmethod
    def from_preset(cls, name, **kwargs):
        """`GuppyConfig.from_preset("cpu", vocab_size=1200)`: a preset with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kwargs})
