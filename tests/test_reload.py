"""Using a saved model again: load_data_and_model (ours and RecBole's, patched) reproduces the saved run's test result
on the bundled sample, for RecBole's models and ours, with nothing unpickled."""
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_dataset
from recbole_weaverec import compat
from recbole_weaverec.quick_start import get_trainer_class, load_data_and_model, run
from recbole_weaverec.reload import CheckpointError, MissingAdapterError

SAMPLE = "toys-sample"  # the bundled sample in recbole_weaverec/dataset/
FAST = {"epochs": 2, "show_progress": False, "state": "WARNING", "eval_sample_users": 40}
TINY_LLM = {"eval_sample_users": 6, "max_train_samples": 4, "max_history": 3, "max_title_tokens": 6, "lora_r": 4,
            "lora_alpha": 8, "learning_rate": 1e-2, "epochs": 2}


def recbole_loader():
    from recbole.quick_start import load_data_and_model as recbole_load  # imports ray: needs setuptools<81

    return recbole_load


def checkpoint(model):
    files = sorted(Path("saved").glob(f"{model.split(':')[-1]}-*.pth"))
    assert len(files) == 1, files
    return files[0]


def reload_and_test(loader, file):
    """What a RecBole user does: reload, then evaluate the test split with the model's trainer."""
    config, model, dataset, train, valid, test = loader(str(file))
    trainer = get_trainer_class(config, config.model_class)(config, model)
    return config, model, trainer.evaluate(test, load_best_model=False)


def assert_reloads_exactly(name, result, loaders=None):
    file = checkpoint(name)
    saved = torch.load(file, map_location="cpu", weights_only=True)["config"]
    for loader in loaders or (load_data_and_model, recbole_loader()):
        config, model, test_result = reload_and_test(loader, file)
        assert test_result == result["test_result"], loader
        rebuilt = compat.plain_value(config.final_config_dict)
        assert {k: v for k, v in saved.items() if k != "_run_outputs"} == \
               {k: v for k, v in rebuilt.items() if k in saved and k != "_run_outputs"}
    return model


CASES = {
    "BPR": {"eval_mode": "uni29"},
    "SASRec": {"eval_mode": "uni29", "hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1},
    "EASE": {"eval_mode": "full"},  # test_history: train_valid -> the validation rows are added again
    "recbole:EASE": {"eval_mode": "uni29"},  # RecBole's EASE, whose name ours shadows
}


@pytest.mark.parametrize("name", CASES)
def test_reloaded_model_scores_the_test_split_like_the_saved_run(run_dir, name):
    result = run(name, SAMPLE, config_dict={**FAST, **CASES[name]})
    assert result["test_result"]["hit@20"] > 0
    model = assert_reloads_exactly(name, result)
    assert type(model).__module__.startswith("recbole_weaverec." if name == "EASE" else "recbole.model.")


def test_recbole_quick_start_imports_and_routes_here():
    from recbole.quick_start import objective_function, run_recbole  # noqa: F401  (RecBole's run_hyper.py imports)
    from recbole.quick_start import quick_start
    from recbole.trainer import HyperTuning  # noqa: F401

    assert recbole_loader() is load_data_and_model and quick_start.load_data_and_model is load_data_and_model


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
    from recbole_weaverec.testing import tiny_llama

    folder = tmp_path_factory.mktemp("tinyllm")
    tokenizer = load_tokenizer(str(embedded_folder()))  # the real SmolLM2 tokenizer, a tiny random Llama
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_llmrec_reloads_its_lora_weights_folded(run_dir, tiny_llm):
    from transformers import AutoModelForCausalLM

    result = run("LLMRec", SAMPLE, config_dict={**TINY_LLM, "llm_path": tiny_llm, "show_progress": False,
                                                "state": "WARNING"})
    state = torch.load(checkpoint("LLMRec"), map_location="cpu", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)  # only the adapter is in the checkpoint
    adapters_before = sorted(Path("saved").rglob("adapter_config.json"))
    model = assert_reloads_exactly("LLMRec", result)
    assert model.folded and not any("lora_" in n for n, _ in model.llm.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_llm).model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(model.llm.model.layers[0].self_attn.q_proj.weight, base)  # the trained LoRA is in
    assert sorted(Path("saved").rglob("adapter_config.json")) == adapters_before  # reloading writes no adapter


def test_weaverec_is_merged_again_from_its_adapters(run_dir, tiny_llm):
    result = run("WeaveRec", SAMPLE, config_dict={**TINY_LLM, "llm_path": tiny_llm, "show_progress": False,
                                                  "state": "WARNING", "weave_target_samples": 4,
                                                  "weave_source_samples": 4})
    assert_reloads_exactly("WeaveRec", result, [load_data_and_model])  # (RecBole's is the same function)
    hybrid = next(Path("saved").glob("weaverec-adapters/*/toys-sample~beauty-sample"))
    shutil.rmtree(hybrid)
    with pytest.raises(MissingAdapterError, match="'toys-sample~beauty-sample' not found"):
        load_data_and_model(str(checkpoint("WeaveRec")))  # refused, never trained again silently


def test_textseqrec_reloads(run_dir):
    from test_twotower import fast, make_tiny_encoder

    data = write_tiny_dataset(run_dir / "data")
    encoder = make_tiny_encoder(run_dir / "enc")
    result = run("TextSeqRec", "tiny", config_dict=fast(data, encoder, eval_mode="uni29"))
    assert_reloads_exactly("TextSeqRec", result)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what a hostile pickle does: run code while being loaded
        return (Path.touch, (Path(self.path),))


def test_config_strings_of_a_checkpoint_never_run(run_dir):
    run("EASE", SAMPLE, config_dict={**FAST, "eval_mode": "uni29"})
    file = checkpoint("EASE")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state["config"]["note"] = "__import__('pathlib').Path('ran').touch() or 1"  # RecBole would eval() this
    torch.save(state, file)
    config = load_data_and_model(str(file))[0]
    assert config["note"] == state["config"]["note"] and not (run_dir / "ran").exists()


def test_pickled_checkpoints_are_refused_without_running_them(run_dir):
    marker = run_dir / "ran"
    torch.save({"config": _Marker(marker), "state_dict": {}}, "hostile.pth")
    for loader in (load_data_and_model, recbole_loader()):
        with pytest.raises(CheckpointError, match="hostile.pth cannot be loaded safely"):
            loader("hostile.pth")
    assert not marker.exists()
    torch.save({"weights": torch.zeros(2)}, "other.pth")
    with pytest.raises(CheckpointError, match="other.pth is not a RecBole model checkpoint"):
        load_data_and_model("other.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_data_and_model("nowhere.pth")
