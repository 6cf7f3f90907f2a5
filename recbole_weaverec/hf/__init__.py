"""Hugging Face models: which folder or hub name to load (the embedded defaults, a local folder or a hub name)
and whether a hub name can be had at all. Nothing here imports the recommenders or the text encoder built on it."""
