"""Training recipes: fixed seeds, public data from ``--data``, model files and cards written here."""
