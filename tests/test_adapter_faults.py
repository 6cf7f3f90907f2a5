"""Adapter faults in one line (issue 12, item 8): a folder without weights, truncated weights, malformed JSON, a
config whose rank its weights do not have, an adapter_paths key that matches no adapter (tiny random Llama)."""
import copy
import inspect
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from recbole_weaverec import merging as M
from recbole_weaverec.errors import ConfigError


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def save_adapter(base, folder, safe=True, **kw):
    torch.manual_seed(1)
    kw = {"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4, **kw}
    get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw)).save_pretrained(
        folder, safe_serialization=safe)
    return folder


def one_line(error, *words):
    msg = str(error.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def refused_everywhere(folder, cls, *words, base_model=None):
    """The folder check and lora_deltas (what LLMMerge / WeaveRec read) both refuse it the same way."""
    with pytest.raises(cls) as e:
        M.check_adapter_folder(folder)
    one_line(e, *words)
    with pytest.raises(cls) as e:
        M.lora_deltas(folder, base_model=base_model)
    return one_line(e, *words)


def test_good_adapter_passes(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a", rank_pattern={"layers.1.self_attn.q_proj": 3})
    config, weights = M.check_adapter_folder(folder)
    assert config["r"] == 2 and weights.name == "adapter_model.safetensors"
    assert len(M.lora_deltas(folder, base_model=base)) == 4


def test_folder_without_weights(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    msg = refused_everywhere(folder, M.AdapterNotFoundError, str(folder), "adapter_model.safetensors",
                             "adapter_config.json")
    assert "holds" in msg  # what the folder does hold, so a misnamed file is visible
    assert issubclass(M.AdapterNotFoundError, FileNotFoundError)  # the CLI prints it as one line, exit 2


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        M.check_adapter_folder(tmp_path / "nope", label="adapter_paths['x']")
    one_line(e, "adapter_paths['x']", str(tmp_path / "nope"), "not found")


@pytest.mark.parametrize("damage", ["half", "header", "random", "empty"])
def test_truncated_or_overwritten_safetensors(base, tmp_path, damage):
    folder = save_adapter(base, tmp_path / "a")
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes({"half": data[:len(data) // 2], "header": data[:header], "random": os.urandom(len(data)),
                      "empty": b""}[damage])
    refused_everywhere(folder, M.AdapterFileError, str(path), "unreadable", "truncated")


def test_truncated_bin_weights_are_not_unpickled(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a", safe=False)
    path = folder / "adapter_model.bin"
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:100])
    refused_everywhere(folder, M.AdapterFileError, str(path), "unreadable")


@pytest.mark.parametrize("text, words", [
    ('{"r": 2, "lora_alpha": 4,', ["line 1", "column"]),
    ('{\n  "r": 2\n  "lora_alpha": 4\n}', ["line 3", "delimiter"]),
    ("[1, 2]", ["JSON list", "object"]),
    ("", ["not valid JSON"]),
], ids=["cut", "comma", "list", "empty"])
def test_malformed_adapter_config(base, tmp_path, text, words):
    folder = save_adapter(base, tmp_path / "a")
    (folder / "adapter_config.json").write_text(text, encoding="utf-8")
    refused_everywhere(folder, M.AdapterFileError, str(folder / "adapter_config.json"), *words)
    with pytest.raises(M.AdapterFileError):  # what LLMMerge / WeaveRec call before reading the deltas
        M.check_same_base([folder])


def test_malformed_metadata_file_next_to_the_adapter(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a")
    (folder / "recbole_weaverec.json").write_text('{"base_model": "tiny"', encoding="utf-8")
    with pytest.raises(M.AdapterFileError) as e:
        M.check_adapter_folder(folder)
    one_line(e, "recbole_weaverec.json", "not valid JSON")


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_config_rank_differs_from_the_weights(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a")
    edit_config(folder, r=8)
    msg = refused_everywhere(folder, M.AdapterFileError, "rank 8", "rank 2", "different adapters", base_model=base)
    assert "q_proj" in msg or "v_proj" in msg


def test_rank_pattern_differs_from_the_weights(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a", rank_pattern={"layers.1.self_attn.q_proj": 3})
    edit_config(folder, rank_pattern={"layers.1.self_attn.q_proj": 2})
    refused_everywhere(folder, M.AdapterFileError, "model.layers.1.self_attn.q_proj", "rank 2", "rank 3")


def test_rank_that_is_not_a_positive_integer(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a")
    edit_config(folder, r="two")
    refused_everywhere(folder, M.AdapterFileError, "'two'", "positive integer")


def test_state_dict_pair_with_another_rank_is_refused(base):
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, target_modules=["q_proj"], r=2))
    config = pm.peft_config["default"].to_dict()
    config["r"] = 4
    with pytest.raises(M.AdapterFileError) as e:
        M.lora_deltas((pm.state_dict(), config))
    one_line(e, "rank 4", "rank 2")


# ---------------------------------------------------------------------------------------------- adapter_paths
def test_adapter_paths_key_that_matches_no_adapter(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a")
    with pytest.raises(ConfigError) as e:
        M.check_adapter_paths({"amazon-toy": str(folder)}, ["amazon-toys", "amazon-beauty"], "LLMMerge")
    one_line(e, "'amazon-toy'", "LLMMerge", "'amazon-toys'", "'amazon-beauty'", "did you mean 'amazon-toys'")
    with pytest.raises(ConfigError) as e:
        M.check_adapter_paths({"elsewhere": str(folder)}, ["amazon-toys"])
    assert "did you mean" not in one_line(e, "'elsewhere'")
    M.check_adapter_paths({"amazon-toys": str(folder)}, ["amazon-toys", "amazon-beauty"])  # a subset is fine


def test_adapter_paths_folder_faults_name_the_key(base, tmp_path):
    folder = save_adapter(base, tmp_path / "a")
    edit_config(folder, r=5)
    with pytest.raises(M.AdapterFileError) as e:
        M.check_adapter_paths({"amazon-toys": str(folder)}, ["amazon-toys"])
    one_line(e, "adapter_paths['amazon-toys']", "rank 5")
    with pytest.raises(FileNotFoundError) as e:
        M.check_adapter_paths({"amazon-toys": str(tmp_path / "gone")}, ["amazon-toys"])
    one_line(e, "adapter_paths['amazon-toys']")


def _wired(module, name):
    return name in inspect.getsource(module)


@pytest.mark.skipif(not _wired(__import__("recbole_weaverec.model.llm.training", fromlist=["x"]),
                               "check_adapter_folder"),
                    reason="model/llm/training.check_adapter_base does not call merging.check_adapter_folder yet")
def test_reused_adapter_without_weights_is_not_a_hub_name(base, tmp_path):
    from recbole_weaverec.model.llm.training import load_adapter

    folder = save_adapter(base, tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_adapter(copy.deepcopy(base), folder)
    one_line(e, "adapter_model.safetensors", str(folder))


def test_corrupt_reused_module_is_named_and_trained_again(base, tmp_path, monkeypatch, caplog):
    """A cached WeaveRec/LLMMerge module whose weights were cut short: warned about by name, retrained, reused."""
    import logging

    from recbole_weaverec.model.llm import training

    trained = []

    def fake_train(base_model, samples, builder, domains, settings, folder, progress=False, logger=None, **meta):
        trained.append(folder)
        save_adapter(base_model, folder)
        (folder / training.META_FILE).write_text(json.dumps({"key": meta["key"]}))
        return folder, None

    monkeypatch.setattr(training, "train_adapter", fake_train)

    def ensure():
        return training.ensure_adapter(base, tmp_path / "mod", lambda: ([], {}), None, {}, None, {"k": 1},
                                       logger=logging.getLogger("t"))

    ensure()
    weights = tmp_path / "mod" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        ensure()
    assert len(trained) == 2 and str(tmp_path / "mod") in caplog.text and "training it again" in caplog.text
    ensure()
    assert len(trained) == 2  # the rebuilt module is reused
    M.check_adapter_folder(tmp_path / "mod")
