"""GuppyLM: a tiny language model that talks like a small fish, built on the Hugging Face stack.

`from guppylm import GuppyConfig` (or any name below) also registers the model with transformers' Auto classes,
so `AutoModelForCausalLM.from_config(GuppyConfig(...))` and `from_pretrained(folder)` work in-process. Saved
folders also carry the modeling source (`auto_map`) and load elsewhere with `trust_remote_code=True`.
The classes load on first use, so `import guppylm` - and with it `guppylm --help` - does not import torch.
"""

__all__ = ["PRESETS", "GuppyConfig", "GuppyForCausalLM", "GuppyModel"]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'guppylm' has no attribute {name!r}")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_guppylm import PRESETS, GuppyConfig
    from .modeling_guppylm import GuppyForCausalLM, GuppyModel

    AutoConfig.register(GuppyConfig.model_type, GuppyConfig, exist_ok=True)
    AutoModel.register(GuppyConfig, GuppyModel, exist_ok=True)
    AutoModelForCausalLM.register(GuppyConfig, GuppyForCausalLM, exist_ok=True)
    # save_pretrained copies the two source files next to the weights (config.json's auto_map names them)
    GuppyConfig.register_for_auto_class()
    GuppyModel.register_for_auto_class("AutoModel")
    GuppyForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    globals().update(PRESETS=PRESETS, GuppyConfig=GuppyConfig, GuppyForCausalLM=GuppyForCausalLM, GuppyModel=GuppyModel)
    return globals()[name]
