"""Recipes: YAML → frozen typed dataclasses, strict validation, dotted overrides, teacher cards, resolved dump."""
from distill.recipe.cards import CARD_INFO_KEYS, CARD_MODEL_KEYS, CARDS_DIR, card_names, load_card, merge_card
from distill.recipe.data_config import DataConfig
from distill.recipe.fields import model_sources
from distill.recipe.loading import apply_override, dump_recipe, load_recipe, recipe_from_dict, to_plain
from distill.recipe.schema import (
    AugmentConfig,
    CheckpointConfig,
    FixResConfig,
    ImbalanceConfig,
    KDConfig,
    LogConfig,
    MixConfig,
    OptimConfig,
    Recipe,
    StudentConfig,
    TargetsConfig,
    TeacherConfig,
    TTAConfig,
)

__all__ = [
    "CARDS_DIR", "CARD_INFO_KEYS", "CARD_MODEL_KEYS", "AugmentConfig", "CheckpointConfig", "DataConfig",
    "FixResConfig", "ImbalanceConfig", "KDConfig", "LogConfig", "MixConfig", "OptimConfig", "Recipe",
    "StudentConfig", "TTAConfig", "TargetsConfig", "TeacherConfig", "apply_override", "card_names", "dump_recipe",
    "load_card", "load_recipe", "merge_card", "model_sources", "recipe_from_dict", "to_plain",
]
