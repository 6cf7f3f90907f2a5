"""Domains with their own field names (issue 21): each domain describes itself in a YAML file beside its atomic files,
or in ``domain_settings``; a cross-domain model reads every source the way that source describes itself."""
import pytest

from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.crossdomain import domain_config
from recbole_weaverec.quick_start import build_config

from conftest import SHARED_DATA, needs_shared_data, write_tiny_dataset

FILMS_YAML = """\
TIME_FIELD: when
load_col:
  inter: [user_id, item_id, when]
  item: [item_id, movie_title, genre]
title_field: movie_title
text_fields: [movie_title, genre]
"""


@pytest.fixture()
def two_platforms(tmp_path):
    """'shop' in the Amazon layout (title, brand, categories; timestamp); 'films' with other names for its time and
    text fields (when; movie_title, genre) and a YAML beside its files that says so."""
    write_tiny_dataset(tmp_path, name="shop", seed=1)
    write_tiny_dataset(tmp_path, name="films", seed=2)
    films = tmp_path / "films"
    inter = (films / "films.inter").read_text().replace("timestamp:float", "when:float")
    (films / "films.inter").write_text(inter)
    lines = (films / "films.item").read_text().splitlines()
    rows = ["item_id:token\tmovie_title:token_seq\tgenre:token_seq"] + [
        f"{r.split(chr(9))[0]}\tFilm {i} the movie\tDrama" for i, r in enumerate(lines[1:])]
    (films / "films.item").write_text("\n".join(rows) + "\n")
    (films / "films.yaml").write_text(FILMS_YAML)
    return tmp_path


def test_each_domain_is_read_with_its_own_fields(two_platforms):
    from recbole_weaverec.data.crossdomain import load_domain
    from recbole_weaverec.data.itemtext import item_texts

    common = {"data_path": str(two_platforms), "show_progress": False}
    films = build_config("LLMRec", "films", config_dict=common)
    assert films["title_field"] == "movie_title" and films["TIME_FIELD"] == "when"
    shop = build_config("LLMJoint", "shop", config_dict={**common, "source_domains": ["films"]})
    assert shop["title_field"] == "title" and shop["TIME_FIELD"] == "timestamp"
    # the source, loaded for the shop target, keeps its own fields
    source = domain_config(shop, "films")
    assert source["title_field"] == "movie_title" and source["load_col"]["item"] == ["item_id", "movie_title", "genre"]
    _, dataset, _ = load_domain(shop, "films")  # what LLMJoint / WeaveRec / LLMMerge load
    texts = item_texts(dataset, [source["title_field"]], labelled=False)
    assert len(texts) == dataset.item_num and all(t.startswith("Film") for t in texts[1:])
    # and the other way round: films as the target, shop as its source
    back = domain_config(build_config("LLMJoint", "films", config_dict={**common, "source_domains": ["shop"]}), "shop")
    assert back["title_field"] == "title" and back["TIME_FIELD"] == "timestamp"


def test_domain_settings_override_one_domain_only(two_platforms):
    over = {"data_path": str(two_platforms), "source_domains": ["films"],
            "domain_settings": {"films": {"title_fallback_field": "genre"}, "shop": {"title_fallback_field": "brand"}}}
    shop = build_config("LLMJoint", "shop", config_dict=over)
    assert shop["title_fallback_field"] == "brand"
    assert domain_config(shop, "films")["title_fallback_field"] == "genre"


def test_bad_domain_settings_are_named(two_platforms):
    common = {"data_path": str(two_platforms)}
    with pytest.raises(ConfigError, match=r"domain_settings\['films'\]: \['epochs'\] are not domain settings"):
        build_config("EASE", "shop", config_dict={**common, "domain_settings": {"films": {"epochs": 3}}})
    with pytest.raises(ConfigError, match="domain_settings=.* expected"):
        build_config("EASE", "shop", config_dict={**common, "domain_settings": ["films"]})
    (two_platforms / "films" / "films.yaml").write_text(FILMS_YAML + "learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"films.yaml: \['learning_rate'\] are not domain settings"):
        build_config("EASE", "films", config_dict=common)


def test_a_source_without_its_title_field_fails_before_anything_trains(two_platforms, tmp_path, monkeypatch):
    """films without its YAML: title_field=title is not among its fields -> one line naming the domain and the
    field, raised while the model is built (before θ0 trains), and no training step is taken."""
    from recbole_weaverec.data.itemtext import MissingTextFieldError
    from recbole_weaverec.model.llm import training
    from recbole_weaverec.quick_start import run

    (two_platforms / "films" / "films.yaml").unlink()
    steps = []
    monkeypatch.setattr(training.LoraLearner, "_step", lambda *a, **k: steps.append(1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingTextFieldError, match=r"domain 'films': title_field='title' is not one of its item "
                                                    r"fields \(its .item file has \['item_id', 'movie_title', 'genre'\]\)"):
        run("WeaveRec", "shop", config_dict={"data_path": str(two_platforms), "source_domains": ["films"],
                                             "show_progress": False})
    assert not steps


SMALL = {"max_train_samples": 6, "weave_target_samples": 5, "weave_source_samples": 3, "max_history": 3,
         "max_title_tokens": 5, "num_prompt_candidates": 6, "train_batch_size": 4, "eval_sample_users": 4,
         "show_progress": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.01,
         "eval_mode": "uni29"}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
    from recbole_weaverec.testing import tiny_llama

    tokenizer = load_tokenizer(str(embedded_folder()))
    folder = tmp_path_factory.mktemp("tinyllm")
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def recorded_prompts(monkeypatch):
    """(domain, first history title) of every training prompt encoded from now on."""
    from recbole_weaverec.model.llm import training

    seen, encode = [], training.encode_sample

    def recording(sample, builder, domains):
        seen.append((sample.domain, domains[sample.domain].titles[sample.history[0]]))
        return encode(sample, builder, domains)

    monkeypatch.setattr(training, "encode_sample", recording)
    return seen


@pytest.mark.parametrize("target, source", [("shop", "films"), ("films", "shop")])
def test_weaverec_runs_end_to_end_across_two_platforms(two_platforms, tiny_llm, tmp_path, monkeypatch, target,
                                                        source):
    """θ0 on the target and the hybrid on target + source, each domain read with its own fields, merged and
    evaluated: the source's prompts carry the source's own titles."""
    import json

    from recbole_weaverec.model.llm.weaverec import HYBRID_SEP
    from recbole_weaverec.quick_start import run

    monkeypatch.chdir(tmp_path)
    prompts = recorded_prompts(monkeypatch)
    adapters = tmp_path / "adapters"
    out = run("WeaveRec", target, config_dict={"data_path": str(two_platforms), "source_domains": [source],
                                               "llm_path": tiny_llm, "adapter_dir": str(adapters), **SMALL},
              per_user=True)
    assert 0 <= out["test_result"]["ndcg@5"] <= 1
    # per-user values of WeaveRec's own test evaluation (not of the θ0 / zero-shot / Pop comparisons after it)
    per_user = out["test_per_user"]["metrics"]
    assert len(out["test_per_user"]["users"]) == SMALL["eval_sample_users"]
    assert all(round(float(per_user[k].mean()), 4) == out["test_result"][k] for k in ("ndcg@5", "hit@5"))
    meta = json.loads((adapters / f"{target}{HYBRID_SEP}{source}" / "recbole_weaverec.json").read_text())
    assert meta["samples"] == {target: SMALL["weave_target_samples"], source: SMALL["weave_source_samples"]}
    assert (adapters / target / "adapter_model.safetensors").is_file()
    word = {"films": "Film", "shop": "Widget"}
    assert {d for d, _ in prompts} == {"shop", "films"}
    assert all(title.startswith(word[d]) for d, title in prompts), prompts[:5]


def test_a_source_with_empty_titles_fails_before_anything_trains(two_platforms, tiny_llm, tmp_path, monkeypatch):
    """A source whose title field is empty for some items (and no fallback): one line naming the domain and the
    field before the first module trains; no training step, no adapter folder."""
    from recbole_weaverec.data.itemtext import MissingTextFieldError
    from recbole_weaverec.model.llm import training
    from recbole_weaverec.quick_start import run

    item = two_platforms / "films" / "films.item"
    item.write_text(item.read_text().replace("Film 0 the movie", "").replace("Film 3 the movie", ""))
    steps = []
    monkeypatch.setattr(training.LoraLearner, "_step", lambda *a, **k: steps.append(1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingTextFieldError, match=r"2 item\(s\) of dataset 'films' have an empty 'movie_title'"):
        run("WeaveRec", "shop", config_dict={"data_path": str(two_platforms), "source_domains": ["films"],
                                             "llm_path": tiny_llm, "adapter_dir": str(tmp_path / "adapters"),
                                             **SMALL})
    assert not steps
    assert not list((tmp_path / "adapters").glob("*")) if (tmp_path / "adapters").exists() else True


@pytest.mark.parametrize("model", ["WeaveRec", "LLMMerge"])
def test_a_source_too_short_to_train_on_fails_before_anything_trains(two_platforms, tiny_llm, tmp_path, monkeypatch,
                                                                      model):
    from recbole_weaverec.errors import DataFileError
    from recbole_weaverec.model.llm import training
    from recbole_weaverec.quick_start import run

    inter = two_platforms / "films" / "films.inter"
    lines = inter.read_text().splitlines()
    kept, per_user = [lines[0]], {}
    for line in lines[1:]:  # one interaction per user: no sequence to train on
        user = line.split("\t")[0]
        per_user[user] = per_user.get(user, 0) + 1
        if per_user[user] <= 1:
            kept.append(line)
    inter.write_text("\n".join(kept) + "\n")
    steps = []
    monkeypatch.setattr(training.LoraLearner, "_step", lambda *a, **k: steps.append(1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFileError, match="domain 'films' has no training prefixes"):
        run(model, "shop", config_dict={"data_path": str(two_platforms), "source_domains": ["films"],
                                        "llm_path": tiny_llm, "adapter_dir": str(tmp_path / "adapters"), **SMALL})
    assert not steps


@needs_shared_data()
def test_ml_100k_is_read_from_data_path_with_all_its_item_fields():
    """The real second platform: no load_col and no YAML needed to get its text fields."""
    from recbole.data import create_dataset

    from recbole_weaverec.data.itemtext import item_titles

    config = build_config("EASE", "ml-100k", config_dict={
        "data_path": str(SHARED_DATA), "domain_settings": {"ml-100k": {"title_field": "movie_title"}}})
    dataset = create_dataset(config)
    dataset.build()  # (RecBole turns the frames into tensors here)
    assert dataset.item_num == 1683  # 1,682 movies + padding: the shared copy, not RecBole's bundled one
    assert {"movie_title", "release_year", "class"} <= set(dataset.item_feat.columns)
    titles = item_titles(dataset, config["title_field"])
    assert "Toy Story" in titles
