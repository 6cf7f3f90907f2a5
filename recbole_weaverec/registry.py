"""Model names users type -> model classes: ours first, then RecBole's built-ins (``recbole:NAME`` forces RecBole's)."""
import importlib
import importlib.util
import pkgutil
import re

from recbole_weaverec.errors import UnknownModelError

# name -> "module:Class", imported lazily so that e.g. EASE never pays for importing transformers.
MODELS = {
    "EASE": "recbole_weaverec.model.lae.ease:EASE",
    "RLAE": "recbole_weaverec.model.lae.rlae:RLAE",
    "RDLAE": "recbole_weaverec.model.lae.rlae:RDLAE",
    "L3AE": "recbole_weaverec.model.lae.l3ae:L3AE",
    "LLMRec": "recbole_weaverec.model.llm.llmrec:LLMRec",
    "LLMJoint": "recbole_weaverec.model.llm.llmjoint:LLMJoint",
    "LLMMerge": "recbole_weaverec.model.llm.llmmerge:LLMMerge",
    "WeaveRec": "recbole_weaverec.model.llm.weaverec:WeaveRec",
    "TextSeqRec": "recbole_weaverec.model.twotower.textseqrec:TextSeqRec",
    "MergeRec": "recbole_weaverec.model.twotower.mergerec:MergeRec",
}

_RECBOLE_SUBMODULES = ("general_recommender", "context_aware_recommender", "sequential_recommender",
                       "knowledge_aware_recommender", "exlib_recommender")


def available_models():
    """Names registered by this package whose module is present (later issues add files)."""
    out = []
    for name, target in MODELS.items():
        try:
            if importlib.util.find_spec(target.split(":")[0]) is not None:
                out.append(name)
        except ModuleNotFoundError:  # parent package not there yet
            pass
    return out


def recbole_models():
    """Names of RecBole's built-in models (one module per model, named after it in lower case)."""
    # Read the packages' __init__ sources instead of importing them: exlib's imports lightgbm/xgboost.
    names = []
    for sub in _RECBOLE_SUBMODULES:
        spec = importlib.util.find_spec(f"recbole.model.{sub}")
        modules = {info.name for info in pkgutil.iter_modules(spec.submodule_search_locations)}
        with open(spec.origin, encoding="utf-8") as f:
            names += [n for n in re.findall(r"import (\w+)", f.read()) if n.lower() in modules]
    return sorted(set(names))


def get_model_class(name):
    """Our model class for ``name``, else RecBole's; an unknown name raises a one-line error listing valid names."""
    if not isinstance(name, str):
        return name  # already a class
    if name.startswith("recbole:"):
        return _recbole_model(name[len("recbole:"):])
    if name in available_models():
        module, cls = MODELS[name].split(":")
        return getattr(importlib.import_module(module), cls)
    return _recbole_model(name)


def _recbole_model(name):
    from recbole.utils import get_model

    # Check the name first: RecBole's get_model imports exlib (lightgbm, xgboost) while searching for unknown names.
    if name in recbole_models():
        return get_model(name)
    raise UnknownModelError(
        f"unknown model {name!r}; this package's models: {', '.join(available_models())}; "
        f"RecBole's: {', '.join(recbole_models())}")
