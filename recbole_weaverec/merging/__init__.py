"""Adapter and task-vector arithmetic shared by LLMMerge, WeaveRec and MergeRec.

Everything works on plain dicts ``{name: tensor}``:

* **LoRA deltas** (LLMMerge, WeaveRec): ``lora_deltas`` turns a peft LoRA adapter into
  ``{module name: ΔW = scale·B·A}`` in the layout of the module's weight. Merging at the ΔW level is exact
  (mixing A and B separately is not), and it lets adapters of different ranks be merged.
* **Task vectors** (MergeRec): ``task_vector`` gives ``{parameter name: θ_k − θ_base}``.

The merge rules themselves are peft's (``peft.utils.merge_utils``: task arithmetic, TIES, DARE, magnitude
pruning). This module only adds what peft lacks: reading deltas from adapter folders, compatibility checks with
one-line errors, folding deltas into a plain model, merges whose coefficients are learned (differentiable in the
coefficients, the trim/sign masks computed once), and layer grouping for layer-wise coefficients.

Layout (imports only downward): ``rules`` (pure merge arithmetic) <- ``apply`` (folding into / patching a model)
<- ``adapters`` (peft adapter files), all re-exported here; ``streaming`` (merge and fold one layer at a time, the
learned merge in factor form: what LLMMerge and WeaveRec use) is imported from its own module.
"""
from recbole_weaverec.errors import (AdapterFileError, AdapterMismatchError, AdapterNotFoundError,
                                     MergeError, UnsupportedAdapterError)
from recbole_weaverec.merging.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraDeltas,
                                               check_adapter_folder, check_adapter_paths, check_same_base,
                                               lora_deltas)
from recbole_weaverec.merging.apply import (PEFT_PREFIX, LearnedDeltaMerge, fold_deltas, patched)
from recbole_weaverec.merging.rules import (MERGE_METHODS, SIGN_METHODS, TASK_VECTOR_METHODS,
                                            LazyDeltas, WeightedDeltas, apply_task_vectors, check_compatible,
                                            combine_task_vectors, layer_groups, merge_deltas, prepare_task_vectors,
                                            task_vector)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "MERGE_METHODS", "PEFT_PREFIX", "SIGN_METHODS", "TASK_VECTOR_METHODS",
           "AdapterFileError", "AdapterMismatchError", "AdapterNotFoundError", "LazyDeltas", "LearnedDeltaMerge",
           "LoraDeltas", "MergeError", "UnsupportedAdapterError", "WeightedDeltas", "apply_task_vectors",
           "check_adapter_folder", "check_adapter_paths", "check_compatible", "check_same_base",
           "combine_task_vectors", "fold_deltas", "layer_groups", "lora_deltas", "merge_deltas", "patched",
           "prepare_task_vectors", "task_vector"]
