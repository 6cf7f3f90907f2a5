"""Bad input (issue 12): one line naming the bad value and what is allowed, exit 2, no traceback, nothing written.
The fast probes of the issue's suite run here; benchmarks/bad_input_probes.py runs the slower fault probes."""
import logging
import os
import time

import pytest

from recbole_weaverec.cli import main

BAD = [
    # (extra arguments, text the one line must contain)
    (["--eval_mode=uni0"], "eval_mode='uni0'"),
    (["--eval_mode=foo"], "eval_mode='foo'"),
    (["--eval_mode=uni-3"], "eval_mode='uni-3'"),
    (["--eval_args={'mode': 'uni0'}"], "eval_args.mode='uni0'"),
    (["--eval_args={'mode': {'valid': 'full', 'test': 'pop0'}}"], "eval_args.mode.test='pop0'"),
    (["--eval_args={'split': {'RS': [0.8, 0.1]}}"], "eval_args.split.RS"),
    (["--eval_args={'split': {'XX': 1}}"], "eval_args.split="),
    (["--eval_args={'order': 'XX'}"], "eval_args.order='XX'"),
    (["--eval_args={'group_by': 'item'}"], "eval_args.group_by='item'"),
    (["--eval_args={'splt': {'LS': 'valid_and_test'}}"], "unknown key(s) ['splt']"),
    (["--eval_args=[1]"], "eval_args=[1]"),
    (["--topk=0"], "topk=0"),
    (["--topk=[5,abc]"], "topk=[5, 'abc']"),
    (["--topk=abc"], "topk='abc'"),
    (["--metrics=[NoSuch]"], "unknown metric 'NoSuch'"),
    (["--metrics=[Recall,AUC]"], "mixes ranking metrics"),
    (["--metrics=Recall"], "valid_metric='NDCG@10' is not among metrics"),
    (["--valid_metric=NDCG@7"], "NDCG@10, NDCG@20"),
    (["--valid_metric=Foo@10"], "valid_metric='Foo@10'"),
    (["--valid_metric=NDCG"], "valid_metric='NDCG'"),
    (["--seed=abc"], "seed='abc'"),
    (["--seed=1.5"], "seed=1.5"),
    (["--seed=-1"], "seed=-1"),
    (["--state=LOUD"], "state='LOUD'"),
    (["--reg_weight=inf"], "reg_weight=inf is out of range"),
    (["--reg_weight=nan"], "reg_weight=nan is out of range"),
    (["--reg_weight=-1"], "reg_weight=-1 is out of range"),
    (["--reg_weight=abc"], "reg_weight='abc'"),
    (["--reg_weight=1/0"], "reg_weight='1/0' is an expression"),
    (["--reg_weight=().x"], "reg_weight='().x' is an expression"),
    (["reg_weight=3"], "--key=value"),
]


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_one_line_exit_2(tiny_data, run_dir, capfd, args, expected):
    rc = main(["--model=EASE", "--dataset=tiny", f"--data_path={tiny_data}", "--state=ERROR", *args]
              if not any(a.startswith("--state") for a in args)
              else ["--model=EASE", "--dataset=tiny", f"--data_path={tiny_data}", *args])
    err = capfd.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not (run_dir / "log").exists() and not (run_dir / "saved").exists()


def test_lists_in_brackets_accepted_like_recbole_yaml(tiny_data, run_dir, capfd):
    rc = main(["--model=EASE", "--dataset=tiny", f"--data_path={tiny_data}", "--state=ERROR",
               "--metrics=[Recall,NDCG]", "--topk=[5,10]", "--valid_metric=NDCG@5"])
    assert rc == 0, capfd.readouterr().err


def test_text_fields_list_syntax_accepted(tiny_data):
    from recbole_weaverec.quick_start import build_config

    config = build_config("L3AE", "tiny", config_dict={"data_path": str(tiny_data)},
                          cmd_args=["--text_fields=[title,brand]"])
    assert config["text_fields"] == ["title", "brand"]


def test_typo_of_a_known_key_is_named(tiny_data, caplog):
    from recbole_weaverec.quick_start import build_config

    with caplog.at_level(logging.WARNING, logger="recbole_weaverec"):
        build_config("EASE", "tiny", config_dict={"data_path": str(tiny_data)}, cmd_args=["--reg_wieght=3"])
    assert "'reg_wieght'" in caplog.text and "'reg_weight'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_weaverec"):
        build_config("EASE", "tiny", config_dict={"data_path": str(tiny_data), "my_own_note": 1})
    assert "my_own_note" not in caplog.text  # unrelated extra keys stay allowed, as in RecBole


def test_unreachable_hub_name_fails_fast(tiny_data, run_dir, capfd, monkeypatch):
    """Network unreachable and HF_HUB_OFFLINE unset: one line within seconds (transformers retried ~50 s)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("HF_HOME", str(run_dir / "hf"))  # an empty cache
    start = time.time()
    rc = main(["--model=LLMRec", "--dataset=tiny", f"--data_path={tiny_data}", "--state=ERROR",
               "--llm_path=someorg/no-such-model"])
    elapsed = time.time() - start
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: llm_path 'someorg/no-such-model'"), err
    assert "cannot be reached" in err[-1]
    assert elapsed < 40, f"took {elapsed:.0f} s"  # generous: only the retries loop is excluded
    assert not any(os.scandir(run_dir / "log")) if (run_dir / "log").exists() else True
