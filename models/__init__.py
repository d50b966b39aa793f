"""Model files, their cards, and the recipes that train them (``python -m models.recipes.<name>``)."""
