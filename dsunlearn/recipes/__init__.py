"""Recipes: small, readable top-to-bottom programs over the components (torchtune style)."""
