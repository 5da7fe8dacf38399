"""Synthetic chat datasets for a persona: a YAML pack of templates in, a Hugging Face dataset folder out."""

from .build import build_and_save, build_dataset, save_dataset, statistics
from .persona import Persona, PersonaError, check_persona, list_personas, load_persona, scaffold_persona

__all__ = [
    "Persona",
    "PersonaError",
    "build_and_save",
    "build_dataset",
    "check_persona",
    "list_personas",
    "load_persona",
    "save_dataset",
    "scaffold_persona",
    "statistics",
]
