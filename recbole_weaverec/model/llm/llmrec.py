"""LLMRec: a causal LM fine-tuned with LoRA on the target domain only (WeaveRec's "target-only" baseline, θ0)."""
from recbole_weaverec.model.llm.base import LLMRecommender
from recbole_weaverec.model.llm.training import add_lora, load_adapter
from recbole_weaverec.model.llm.samples import build_samples


class LLMRec(LLMRecommender):
    min_epochs = 0  # epochs: 0 scores the embedded LM as it is: no LoRA, nothing trained or saved (zero-shot)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        reuse = self.adapter_paths.get(self.adapter_name())
        if reuse:  # an adapter trained earlier (e.g. by LLMMerge or WeaveRec): evaluate it, train nothing
            self.llm = load_adapter(self.llm, reuse)
            self.samples = []
        elif config["epochs"] == 0:  # the trainer finds nothing to train (LLMTrainer's LLMMerge path)
            self.samples = []
        else:
            self.samples = self.build_training_samples()
            self.llm = add_lora(self.llm, self.settings)

    def build_training_samples(self):
        return build_samples(self.target, self.config["max_train_samples"], self._num_candidates(),
                             self.config["seed"])

    def training_samples(self):
        return self.samples
