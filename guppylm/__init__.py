"""GuppyLM: a tiny language model that talks like a small fish, built on the Hugging Face stack.

Importing guppylm registers the model with transformers' Auto classes, so
`AutoModelForCausalLM.from_config(GuppyConfig(...))` and `from_pretrained(folder)` work in-process.
Saved folders also carry the modeling source (`auto_map`) and load elsewhere with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_guppylm import PRESETS, GuppyConfig
from .modeling_guppylm import GuppyForCausalLM, GuppyModel

AutoConfig.register(GuppyConfig.model_type, GuppyConfig)
AutoModel.register(GuppyConfig, GuppyModel)
AutoModelForCausalLM.register(GuppyConfig, GuppyForCausalLM)
# save_pretrained copies the two source files next to the weights and writes auto_map into config.json
GuppyConfig.register_for_auto_class()
GuppyModel.register_for_auto_class("AutoModel")
GuppyForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PRESETS", "GuppyConfig", "GuppyForCausalLM", "GuppyModel"]
