"""LLMRec must learn a synthetic rule end to end: the test that fails when training or scoring is broken.

The rule: every item title is ``<w> <r> ... <r>`` (a first word w out of 15, then 1-7 words out of 4, drawn at
random), and each user's items all share one first word, so the next item is the candidate whose title starts with
the last history item's first word. A tiny randomly initialised Llama (1 layer, width 64, a word-level tokenizer
with a ChatML template, built here: nothing is downloaded) is trained through ``run("LLMRec", ...)`` on a RecBole
dataset written to tmp: the real prompts (``PromptBuilder``), training samples (``build_samples``), answer-only loss
on left-padded batches, ``LLMTrainer``/``LoraLearner``, checkpoint, peft adapter folder and KV-cache scoring with
length-normalised log-likelihoods. Its adapter is then evaluated (uni29: Hit@1 over 30 candidates) on held-out
users of a second dataset whose items were never seen in training, next to an untrained adapter (chance, 1/30).

Why it can fail (each checked by breaking the library on purpose, see the report of issue 14 §3): no loss on the
answer's first token, loss on the prompt, right-padded training batches, the answer pass of scoring started at the
wrong position, pad tokens counted in a score, or candidate scores summed instead of length-normalised (titles of
1-7 rest words, each ~log 4 nats, so a sum prefers short wrong titles). The prompts do not list the candidates
(``prompt_candidates: False``): with the 30-title list in the prompt, a 1-layer model does not find the rule
within a test's budget. ``max_history: 2`` keeps the prompts short.
"""
import numpy as np
import pytest
import torch

N_WORDS = 15  # first words: one per user sequence
# first words of three tokens: "w-7" (odd k: the token that tells candidates apart is the 3rd of the answer, scored from
# the KV cache) or "8-w" (even k: the 1st, scored from the prompt's last position)
FIRST_WORDS = [f"w-{k}" if k % 2 else f"{k}-w" for k in range(N_WORDS)]
REST_WORDS = 4  # r0..r3: the rest of every title, at random
REST_MIN, REST_MAX = 1, 7  # rest words per title
SEQ_LEN = 6  # items per user: 3 training prefixes, 1 valid row, 1 test row (leave-one-out)
TRAIN_ITEMS_PER_WORD = 20  # training catalogue: 300 titles, too many to memorise
HELDOUT_ITEMS_PER_WORD = SEQ_LEN  # held-out catalogue: a user takes all items of its word, so no other candidate
# (the 29 uni29 negatives are items the user never touched) shares the true item's first word
TRAIN_USERS, HELDOUT_USERS = 700, 150
DATA_SEED, MODEL_SEED = 14, 0
NUM_LAYERS = 1

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SETTINGS = {  # what the learning takes (all in LLMRec's own config keys)
    "max_history": 2, "max_title_tokens": 10, "prompt_candidates": False,
    "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
    "learning_rate": 6e-3, "warmup_ratio": 0.1, "weight_decay": 0.0, "lora_clip_grad_norm": 1.0,
    "epochs": 4, "train_batch_size": 8, "gradient_accumulation_steps": 1, "max_train_samples": None,
    "train_bf16": False, "llm_dtype": "float32", "seed": 2020,
}


# --- a word-level tokenizer and a tiny Llama ------------------------------------------------------------------
def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(set(words) - set(SPECIAL_TOKENS)))}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def prompt_tokenizer(titles):
    """A word-level tokenizer knowing the titles' words and every word of PromptBuilder's templates."""
    from tokenizers import pre_tokenizers

    from recbole_weaverec.model.llm.prompts import PromptBuilder

    bootstrap = word_tokenizer([])  # only to render the templates' text
    text = "".join(PromptBuilder(bootstrap, 5, 10, listed).prompt_text(["a"], ["b"]) for listed in (True, False))
    for special in SPECIAL_TOKENS:
        text = text.replace(special, " ")
    text += " " + " ".join(titles)
    tokenizer = word_tokenizer([w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)])
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    return tokenizer


def tiny_model(tokenizer, num_layers=1, seed=0):
    """A randomly initialised Llama (width 64, 4 heads, tied embeddings) with ``tokenizer``'s vocabulary.
    ``initializer_range`` 1/sqrt(width) (not transformers' 0.02): logits can reach a few nats, and outputs depend on
    positions (with 0.02, scoring an answer one position off moves its score by only ~1e-4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, initializer_range=0.125, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def tiny_llm_folder(folder, tokenizer, seed=0):
    """The 1-layer model the rule is learnt with, saved with ``tokenizer`` as a local HF folder (``llm_path``)."""
    tiny_model(tokenizer, NUM_LAYERS, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# --- synthetic RecBole datasets ---------------------------------------------------------------------------------
def catalogue(rng, items_per_word):
    """Titles ``w<k> r.. r..`` grouped by first word: {k: [title, ...]}."""
    def title(k):
        return " ".join([FIRST_WORDS[k]] + [f"r{x}" for x in rng.integers(0, REST_WORDS,
                                                                          rng.integers(REST_MIN, REST_MAX + 1))])

    return {k: [title(k) for _ in range(items_per_word)] for k in range(N_WORDS)}


def write_domain(root, name, titles_by_word, n_users, rng):
    """RecBole atomic files: each user buys SEQ_LEN distinct items of one first word, in random order."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    item_rows = ["item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq"]
    ids = {}
    for k, titles in titles_by_word.items():
        for j, title in enumerate(titles):
            ids[k, j] = f"i{k}_{j}"
            item_rows.append(f"{ids[k, j]}\t{title}\tb{k}\tc")
    inter_rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        k = int(rng.integers(N_WORDS))
        for t, j in enumerate(rng.choice(len(titles_by_word[k]), SEQ_LEN, replace=False)):
            inter_rows.append(f"u{u}\t{ids[k, int(j)]}\t{t + 1}")
    (out / f"{name}.item").write_text("\n".join(item_rows) + "\n", encoding="utf-8")
    (out / f"{name}.inter").write_text("\n".join(inter_rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def rule_world(tmp_path_factory):
    """(data_path, llm folder): a training domain 'rules', a held-out domain 'heldout', the tiny model."""
    root = tmp_path_factory.mktemp("rule_world")
    rng = np.random.default_rng(DATA_SEED)
    train_titles, heldout_titles = catalogue(rng, TRAIN_ITEMS_PER_WORD), catalogue(rng, HELDOUT_ITEMS_PER_WORD)
    write_domain(root / "data", "rules", train_titles, TRAIN_USERS, rng)
    write_domain(root / "data", "heldout", heldout_titles, HELDOUT_USERS, rng)
    every_title = [t for titles in (train_titles, heldout_titles) for ts in titles.values() for t in ts]
    llm = tiny_llm_folder(root / "llm", prompt_tokenizer(every_title), MODEL_SEED)
    return root / "data", llm


def run_llmrec(dataset, data_path, llm, out, **overrides):
    from recbole_weaverec.quick_start import run

    config = {"data_path": str(data_path), "llm_path": llm, "checkpoint_dir": str(out / "saved"),
              "eval_mode": "uni29", "metrics": ["Hit"], "topk": [1], "valid_metric": "Hit@1",
              "eval_sample_users": None, "show_progress": False, **SETTINGS, **overrides}
    return run("LLMRec", dataset, config_dict=config)


def untrained_adapter(llm, folder):
    """A fresh LoRA (B = 0, so the model is the random base) saved as a peft folder of ``llm``."""
    from recbole_weaverec.model.llm.backbone import load_backbone
    from recbole_weaverec.model.llm.training import LoraSettings, add_lora, save_adapter

    model, _, _ = load_backbone(llm)
    return str(save_adapter(add_lora(model, LoraSettings(r=SETTINGS["lora_r"], alpha=SETTINGS["lora_alpha"])),
                            folder))


def learn_and_evaluate(rule_world, out):
    """(Hit@1 on held-out users before training, after training, the training run's result)."""
    data, llm = rule_world
    trained = run_llmrec("rules", data, llm, out / "train", eval_step=0, eval_sample_users=5,
                         adapter_dir=str(out / "adapters"))
    adapter = out / "adapters" / "rules"
    assert (adapter / "adapter_model.safetensors").is_file()
    after = run_llmrec("heldout", data, llm, out / "after", adapter_paths={"heldout": str(adapter)})
    before = run_llmrec("heldout", data, llm, out / "before",
                        adapter_paths={"heldout": untrained_adapter(llm, out / "untrained")})
    return before["test_result"]["hit@1"], after["test_result"]["hit@1"], trained


def test_llmrec_learns_first_word_rule_on_held_out_users(rule_world, run_dir):
    before, after, trained = learn_and_evaluate(rule_world, run_dir)
    assert before <= 0.12, f"untrained model already at Hit@1 {before} (chance 1/30): the rule leaks"
    assert after >= 0.9, f"LLMRec did not learn the rule: held-out Hit@1 {after} after training (untrained {before})"


# --- the same positions in training, cached scoring and one forward pass ----------------------------------------
def test_cached_scoring_and_padded_training_see_the_positions_of_one_sequence():
    """Scores from the KV cache (answers batched, chunked) equal one forward pass per candidate, and the left-padded
    training loss equals the single-sequence losses, on a model whose outputs depend on positions (so an answer
    pass one position off, pads that are attended, or a mask off by one cannot hide in the tolerance)."""
    from recbole_weaverec.model.llm.prompts import IGNORE_INDEX, PromptBuilder
    from recbole_weaverec.model.llm.scoring import score_candidates
    from recbole_weaverec.testing import naive_scores
    from recbole_weaverec.model.llm.training import answer_loss
    from recbole_weaverec.model.llm.samples import collate

    titles = [t for ts in catalogue(np.random.default_rng(0), 2).values() for t in ts]
    tokenizer = prompt_tokenizer(titles)
    model = tiny_model(tokenizer, num_layers=2, seed=1)
    builder = PromptBuilder(tokenizer, 5, 10, True)
    prompt = builder.prompt_ids(titles[:3], titles[3:12])
    answers = [builder.answer_ids(t) for t in titles[3:12]] + [[tokenizer.eos_token_id]]  # 2 to 9 tokens, and 1
    reference = naive_scores(model, prompt, answers)

    def off_by_one(answer):  # the reference with the answer placed one position later
        ids = torch.tensor([prompt + answer])
        n = len(prompt)
        positions = torch.cat([torch.arange(n), torch.arange(n + 1, n + 1 + len(answer))])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, position_ids=positions).logits[0].float(), -1)
        return logp[n - 1:n - 1 + len(answer)].gather(-1, ids[0, n:, None]).mean()

    shifted = torch.stack([off_by_one(a) for a in answers[:-1]])
    assert (shifted - reference[:-1]).abs().max() > 1e-2  # this model tells positions apart
    for chunk_size in (1, 4, 64):
        fast = score_candidates(model, prompt, answers, chunk_size=chunk_size, pad_id=tokenizer.pad_token_id)
        assert torch.allclose(fast, reference, atol=1e-4), (chunk_size, (fast - reference).abs().max())

    encoded = [builder.training_ids(titles[i:i + h], titles[i + h], titles[5:9] if i % 2 else None)
               for i, h in ((0, 1), (2, 3), (7, 2), (10, 4))]  # prompts and answers of different lengths
    batch = collate(encoded, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # there is padding to get wrong
    total, count = 0.0, 0
    with torch.no_grad():
        loss = answer_loss(model, batch)
        for ids, labels in encoded:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            total -= float(logp[keep].gather(-1, target[keep][:, None]).sum())
            count += int(keep.sum())
    assert count == sum(len(builder.answer_ids(titles[i + h])) for i, h in ((0, 1), (2, 3), (7, 2), (10, 4)))
    assert abs(float(loss) - total / count) < 1e-4
