"""Teacher cards: YAML data (no code); installed as the package distill.teachers so distill.recipe finds them."""
