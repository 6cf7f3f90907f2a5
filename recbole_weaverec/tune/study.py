"""The search itself: an Optuna study in a database (SQLite by default; a database URL lets several machines share
one study). A killed search resumes: the study keeps every finished trial, and a trial left running by a dead
process is failed by Optuna's heartbeat and does not count. Selection sees the validation score only."""
import itertools
import json
import math
import random
import warnings
from pathlib import Path

from recbole_weaverec.errors import ConfigError, TrialFailed

HEARTBEAT_S = 30
GRACE_S = 120  # a running trial without a heartbeat for this long belonged to a dead process


def storage_url(storage):
    """A database URL, or a file path made into an SQLite URL (its folder created)."""
    if "://" in storage:
        return storage
    path = Path(storage).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_study(storage, name, maximize):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is reported by the caller
    url = storage_url(storage)
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as e:  # a bad URL or an unreadable database: one line
        raise ConfigError(f"tuning storage {storage!r} cannot be opened: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    study = optuna.create_study(storage=rdb, study_name=name, load_if_exists=True,
                                direction="maximize" if maximize else "minimize")
    if study.direction != (optuna.study.StudyDirection.MAXIMIZE if maximize else
                           optuna.study.StudyDirection.MINIMIZE):
        raise ConfigError(f"study {name!r} in {storage} was created with the other direction of valid_metric")
    return study


def _counted(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def search(space, evaluate, *, trials, storage, study_name, seed, maximize=True, progress=None):
    """Run the study until ``trials`` trials have a validation score; all-``choice`` spaces are searched
    exhaustively (at most their grid size), others with TPE. A trial whose run failed (or was killed) does not
    count and is tried again by the next call; one call gives up after ``trials`` failures.

    ``evaluate(params) -> (valid_score or None, info)``: ``info`` (JSON-able) is stored with the trial for reports;
    only ``valid_score`` steers the search and the choice. Returns ``(study, budget)``."""
    import optuna

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials={trials!r} is not allowed: expected a positive integer")
    study = open_study(storage, study_name, maximize)
    grid = space.grid()
    budget = min(trials, space.size()) if grid else trials

    def objective(trial):
        params = space.suggest(trial)
        same = _finished_with(study, trial.params, trial.number)
        if same is not None:  # TPE (or a resumed grid) proposed a finished configuration: its result again
            score, info = same.value, dict(same.user_attrs)
        else:
            score, info = evaluate(params)
        for key, value in (info or {}).items():
            trial.set_user_attr(key, value)
        if score is None or not math.isfinite(score):
            failures.append(trial.number)
            raise TrialFailed(info.get("error", "") if info else "")  # optuna records the trial as failed
        return float(score)

    failures, proposed = [], []
    points = _grid_order(grid, seed) if grid else None
    while len(_counted(study)) < budget and len(failures) < budget:
        # seeded by the trials so far: a resumed search draws what an uninterrupted one would have
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
        if points is not None:  # the grid in a seeded order: the next point without a score (a failed one again)
            done = [t.params for t in _counted(study)]
            tried = {json.dumps(p, sort_keys=True) for p in done} | set(proposed)
            todo = [p for p in points if json.dumps(p, sort_keys=True) not in tried]
            if not todo:
                break
            study.enqueue_trial(todo[0])
            proposed.append(json.dumps(todo[0], sort_keys=True))  # not proposed twice by one call
        study.optimize(objective, n_trials=1, catch=(TrialFailed,))
        if progress:
            progress(len(_counted(study)), budget)
    return study, budget


def _grid_order(grid, seed):
    names = sorted(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    random.Random(seed).shuffle(points)
    return points


def _finished_with(study, params, number):
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != number and t.params == params:
            return t
    return None


def best(study):
    """The finished trial with the best validation score (the earliest among equals), or None."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    sign = 1 if study.direction.name == "MAXIMIZE" else -1
    return max(done, key=lambda t: (sign * t.value, -t.number))
