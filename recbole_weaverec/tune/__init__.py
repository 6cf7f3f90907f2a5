"""Hyperparameter search on validation, RecBole's way (params files: ``choice``, ``uniform``, ``quniform``,
``loguniform``) with Optuna studies that resume: ``python -m recbole_weaverec.tune`` (``cli``) for one model, a
leaderboard's ``tune:`` blocks (``leaderboard.tuning``) for a board. ``space`` parses the search space, ``study``
runs it."""
