"""Memory planner of the LLM recommenders (issue 16, item 5): ``python -m recbole_weaverec.plan <run arguments>``
prints the estimated peak device memory of training, merging and scoring from the LM's config and the run's
settings alone (no weights loaded) and, given a device's memory, refuses a plan that cannot fit (exit status 2).

- ``formulas``: the documented formulas (bytes per phase as named terms) and ``Shape``;
- ``shapes``: the LM's shape from its config (folder, HF cache, GGUF metadata, a table of public configs);
- ``phases``: a run's config -> the formulas' inputs (token counts, batch, LoRA, merge, scoring settings);
- ``__main__``: the command.
"""
