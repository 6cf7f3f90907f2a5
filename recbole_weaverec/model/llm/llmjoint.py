"""LLMJoint: one LoRA trained on target and source samples shuffled together ("data merging" baseline).

Each source is loaded as its own RecBole dataset (``source_domains``); its samples carry its own item ids and
titles. Evaluation is on the target only.
"""
from recbole_weaverec.data.crossdomain import domain_list
from recbole_weaverec.model.llm.llmrec import LLMRec
from recbole_weaverec.model.llm.samples import build_samples, load_source, mix_samples
from recbole_weaverec.model.llm.training import training_key


class LLMJoint(LLMRec):
    uses_sources = True

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        domain_list(config, "source_domains", required=True)

    def build_training_samples(self):
        lists = [build_samples(self.target, self.config["max_train_samples"], self._num_candidates(),
                               self.config["seed"])]
        for name in domain_list(self.config, "source_domains", required=True):
            source = self.domains[name] = load_source(self.config, name)
            lists.append(build_samples(source, self.config["max_train_samples"], self._num_candidates(),
                                       self.config["seed"]))
        return mix_samples(lists, self.config["seed"])

    @classmethod
    def adapter_keys(cls, config):
        return ["+".join([config["dataset"], *domain_list(config, "source_domains", required=True)])]

    def adapter_name(self):  # the folder name of the joint adapter (and its adapter_paths key)
        return "+".join([self.target.name, *domain_list(self.config, "source_domains", required=True)])

    def adapter_key(self):  # every domain's max_train_samples, shuffled together
        names = [self.target.name, *domain_list(self.config, "source_domains", required=True)]
        return training_key(self.base_name, dict.fromkeys(names, self.config["max_train_samples"]), self.settings,
                            self.builder, self._num_candidates())
