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
