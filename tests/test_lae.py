"""EASE, RLAE, RDLAE, L3AE: closed forms against brute force and each other, RecBole parity, text embeddings."""
import pytest
import torch

from recbole_weaverec import textembed
from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.itemtext import MissingTextFieldError
from recbole_weaverec.model.lae.ease import EASE
from recbole_weaverec.model.lae.l3ae import L3AE
from recbole_weaverec.model.lae.rlae import RDLAE, RLAE
from recbole_weaverec.quick_start import build_config, run

from conftest import SHARED_DATA, needs_shared_data
from recbole_weaverec.testing import write_slice

FAST = {"state": "WARNING", "show_progress": False}
PARITY = {**FAST, "tie_break": "none", "test_history": "train"}


# ------------------------------------------------------------------ matrix level (float64, tiny)
def solver(cls, **config):
    """A model instance that only solves: ``solve(G, dataset)`` needs nothing but the config (and L3AE's F)."""
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    model.config = config
    model.dtype = torch.float64
    return model


def fit(cls, X, F=None, **config):
    model = solver(cls, **config)
    if F is not None:
        model.item_embeddings = lambda dataset: F
    B = model.solve(X.T @ X, None)
    B.fill_diagonal_(0.0)
    return B


@pytest.fixture
def X():
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(40, 9, generator=gen) < 0.3).to(torch.float64)


@pytest.fixture
def F():
    gen = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(9, 5, generator=gen, dtype=torch.float64), dim=1)


def brute_force(X, gamma, xi=None):
    """Column by column: min ‖x_j − X b‖² + Σ_i γ_i b_i² with b_j = 0 (xi None, EASE) or b_j ≤ ξ (RLAE/RDLAE)."""
    n = X.shape[1]
    G = X.T @ X
    B = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        free = [i for i in range(n) if i != j]
        if xi is not None:
            b = torch.linalg.solve(G + torch.diag(gamma), G[:, j])  # unconstrained ridge column
            if b[j] <= xi:  # the inequality is inactive
                B[:, j] = b
                continue
        fixed = 0.0 if xi is None else xi  # active constraint: b_j at its bound
        A = G[free][:, free] + torch.diag(gamma[free])
        B[free, j] = torch.linalg.solve(A, G[free, j] * (1.0 - fixed))
    B.fill_diagonal_(0.0)
    return B


def test_ease_matches_brute_force(X):
    gamma = torch.full((9,), 3.0, dtype=torch.float64)
    assert torch.allclose(fit(EASE, X, reg_weight=3.0), brute_force(X, gamma), atol=1e-10)


@pytest.mark.parametrize("xi", [0.05, 0.3, 0.6])
def test_rlae_matches_brute_force(X, xi):
    gamma = torch.full((9,), 2.0, dtype=torch.float64)
    assert torch.allclose(fit(RLAE, X, reg_weight=2.0, xi=xi), brute_force(X, gamma, xi), atol=1e-10)


@pytest.mark.parametrize("xi,p", [(0.1, 0.2), (0.4, 0.5)])
def test_rdlae_matches_brute_force(X, xi, p):
    gamma = 2.0 + torch.diagonal(X.T @ X) * p / (1 - p)
    assert torch.allclose(fit(RDLAE, X, reg_weight=2.0, xi=xi, drop_p=p), brute_force(X, gamma, xi), atol=1e-10)


def test_rlae_xi0_is_ease_and_rdlae_p0_is_rlae(X):
    ease = fit(EASE, X, reg_weight=5.0)
    assert torch.allclose(fit(RLAE, X, reg_weight=5.0, xi=0.0), ease, atol=1e-10)
    assert torch.allclose(fit(RDLAE, X, reg_weight=5.0, xi=0.3, drop_p=0.0), fit(RLAE, X, reg_weight=5.0, xi=0.3),
                          atol=1e-10)
    assert not torch.allclose(fit(RLAE, X, reg_weight=5.0, xi=0.3), ease, atol=1e-4)  # ξ does something


def l3ae(X, F, lx, lf, le):
    return fit(L3AE, X, F, reg_weight_x=lx, reg_weight_f=lf, reg_weight_e=le)


def test_l3ae_lambda_e0_is_ease(X, F):
    assert torch.allclose(l3ae(X, F, 4.0, 10.0, 0.0), fit(EASE, X, reg_weight=4.0), atol=1e-10)


def test_l3ae_text_prior_is_ease_on_item_gram(F):
    """Phase 1 (Woodbury form) equals the authors' direct form: P₁ = (F·Fᵀ + λ_F I)⁻¹ over items."""
    C = solver(L3AE, reg_weight_f=0.7).text_prior(F)
    P1 = torch.linalg.inv(F @ F.T + 0.7 * torch.eye(9, dtype=torch.float64))
    direct = P1 / -torch.diagonal(P1)
    direct.fill_diagonal_(0.0)
    assert torch.allclose(C, direct, atol=1e-10)


@pytest.mark.parametrize("lx,lf,le", [(-3.0, 0.5, 8.0), (2.0, 5.0, 1.0)])
def test_l3ae_satisfies_optimality_conditions(X, F, lx, lf, le):
    """∇(‖X − XB‖² + λ_X‖B‖² + λ_E‖B − C‖²) = 0 off the diagonal (the diagonal is constrained to 0)."""
    B = l3ae(X, F, lx, lf, le)
    C = solver(L3AE, reg_weight_f=lf).text_prior(F)
    G = X.T @ X
    grad = 2 * (-G @ (torch.eye(9, dtype=torch.float64) - B) + lx * B + le * (B - C))
    grad.fill_diagonal_(0.0)
    assert torch.diagonal(B).abs().max() == 0
    assert grad.abs().max() < 1e-9 * G.abs().max()
    # and it is a minimiser: any feasible perturbation raises the objective
    loss = lambda W: ((X - X @ W) ** 2).sum() + lx * (W ** 2).sum() + le * ((W - C) ** 2).sum()  # noqa: E731
    E = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 1e-2
    E.fill_diagonal_(0.0)
    assert loss(B + E) > loss(B) and loss(B - E) > loss(B)
    assert not torch.allclose(B, fit(EASE, X, reg_weight=lx + le), atol=1e-6)  # the prior moved B


def test_float32_default_close_to_float64(X, F):
    model = solver(L3AE, reg_weight_x=-3.0, reg_weight_f=0.5, reg_weight_e=8.0)
    model.dtype = torch.float32
    model.item_embeddings = lambda dataset: F.float()
    B32 = model.solve((X.T @ X).float(), None)
    B32.fill_diagonal_(0.0)
    assert B32.dtype == torch.float32
    assert torch.allclose(B32.double(), l3ae(X, F, -3.0, 0.5, 8.0), atol=1e-4)


# ------------------------------------------------------------------ config errors (one line, nothing written)
@pytest.mark.parametrize("model,bad,key", [
    ("EASE", {"reg_weight": -1.0}, "reg_weight"),
    ("RLAE", {"xi": "high"}, "xi"),
    ("RDLAE", {"drop_p": 1.0}, "drop_p"),
    ("L3AE", {"reg_weight_f": 0.0}, "reg_weight_f"),
    ("L3AE", {"reg_weight_e": -5.0}, "reg_weight_e"),
    ("L3AE", {"reg_weight_x": -300.0, "reg_weight_e": 200.0}, "reg_weight_x + reg_weight_e"),
    ("L3AE", {"text_fields": []}, "text_fields"),
    ("L3AE", {"text_max_length": 0}, "text_max_length"),
    ("L3AE", {"lae_dtype": "float16"}, "lae_dtype"),
])
def test_bad_hyperparameters_one_line(tiny_data, model, bad, key):
    with pytest.raises(ConfigError) as e:
        build_config(model, "tiny", config_dict={"data_path": str(tiny_data), **bad})
    assert key in str(e.value) and "\n" not in str(e.value)


def test_missing_encoder_one_line(tiny_data, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no-encoder")):
        build_config("L3AE", "tiny", config_dict={"data_path": str(tiny_data),
                                                  "text_encoder_path": str(tmp_path / "no-encoder")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        textembed.resolve_encoder_path("no-such-org/no-such-encoder")
    msg = str(e.value)
    assert "no-such-org/no-such-encoder" in msg and textembed.default_encoder_path() in msg and "\n" not in msg


def test_l3ae_without_text_fields_names_missing_and_present(tmp_path, run_dir):
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", name="notext", titles=False)
    with pytest.raises(MissingTextFieldError) as e:
        run("L3AE", "notext", config_dict={"data_path": str(data), **FAST})
    msg = str(e.value)
    assert "title" in msg and "categories" in msg and "brand" in msg and "\n" not in msg
    assert not list(run_dir.glob("log/**/*.log")) and not list(run_dir.glob("saved/*"))


# ------------------------------------------------------------------ text embeddings
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT with the real MiniLM tokenizer, saved as an HF folder (fast, offline)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(textembed.default_encoder_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
              ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_embedding_cache_hit(tiny_encoder, tmp_path, monkeypatch):
    loads = []
    real = textembed.load_encoder
    monkeypatch.setattr(textembed, "load_encoder", lambda *a: loads.append(a) or real(*a))
    texts = ["title: red car brand: Toyco", "title: blue boat", ""]
    kw = dict(encoder_path=tiny_encoder, cache_dir=tmp_path, cache_key="tiny.title", progress=False)
    first = textembed.encode_texts(texts, **kw)
    second = textembed.encode_texts(texts, **kw)
    assert len(loads) == 1 and torch.equal(first, second)
    assert first.shape == (3, 32) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=1), torch.ones(3))
    textembed.encode_texts(texts, **{**kw, "max_length": 8})  # another setting is another cache entry
    textembed.encode_texts(texts[:2], **kw)  # other texts too
    assert len(loads) == 3
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_mean_pooling_ignores_padding(tiny_encoder):
    """A text's embedding does not depend on what else is in its batch (padding is masked out)."""
    alone = textembed.encode_texts(["short"], tiny_encoder, cache_dir=False, progress=False)
    batched = textembed.encode_texts(["short", "a much longer text " * 5], tiny_encoder, batch_size=2,
                                     cache_dir=False, progress=False)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_embedded_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    texts = ["title: Melissa & Doug Magnetic Wooden Alphabet brand: Melissa & Doug", "title: OPI Nail Lacquer"]
    ours = textembed.encode_texts(texts, "embedded", cache_dir=False, progress=False, max_length=256)
    ref = st.SentenceTransformer(textembed.default_encoder_path(), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, ref.cpu(), atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "uni29"])
def test_l3ae_end_to_end_tiny_encoder(tiny_data, run_dir, tiny_encoder, mode):
    config = {"data_path": str(tiny_data), "text_encoder_path": tiny_encoder, "text_cache_dir": str(run_dir / "emb"),
              "eval_mode": mode, **FAST}
    result = run("L3AE", "tiny", config_dict=config)
    assert 0 < result["test_result"]["hit@20"] <= 1
    assert len(list((run_dir / "emb").glob("*.safetensors"))) == 1


def test_l3ae_end_to_end_embedded_minilm(tiny_data, run_dir):
    """The shipped default encoder, offline, on a tiny dataset; the text prior changes the scores."""
    config = {"data_path": str(tiny_data), "text_cache_dir": str(run_dir / "emb"), **FAST}
    cfg = build_config("L3AE", "tiny", config_dict=config)
    from recbole_weaverec.quick_start import prepare

    _, train_data, _, _ = prepare(cfg)
    model = L3AE(cfg, train_data._dataset)
    ease = L3AE(build_config("L3AE", "tiny", config_dict={**config, "reg_weight_x": 100.0, "reg_weight_e": 0.0}),
                train_data._dataset)
    assert not torch.allclose(model.item_similarity, ease.item_similarity, atol=1e-4)
    assert model.item_similarity[0].abs().max() == 0 and model.item_similarity[:, 0].abs().max() == 0
    result = run("L3AE", "tiny", config_dict=config)
    assert 0 < result["test_result"]["ndcg@20"] <= 1


# ------------------------------------------------------------------ parity with RecBole's EASE on real data
@needs_shared_data()
@pytest.mark.parametrize("mode", ["full", "uni29"])
def test_our_ease_equals_recboles(tmp_path, run_dir, mode):
    # A slice dense enough that few items score ~0 (on very sparse slices the order of such near-ties is rounding
    # noise, in RecBole's EASE as in ours), at RecBole's precision (float64).
    data = write_slice(SHARED_DATA, "amazon-pantry", tmp_path / "data", n_users=1500, name="pantry1500")
    config = {"data_path": str(data), "eval_mode": mode, "reg_weight": 250.0, "seed": 2020, "lae_dtype": "float64",
              **PARITY}
    ours = run("EASE", "pantry1500", config_dict=config)
    theirs = run("recbole:EASE", "pantry1500", config_dict=config)
    assert ours["test_result"]["ndcg@10"] > 0
    for key, value in theirs["test_result"].items():
        assert round(ours["test_result"][key], 4) == round(value, 4), key
    for key, value in theirs["best_valid_result"].items():
        assert round(ours["best_valid_result"][key], 4) == round(value, 4), key


def test_l3ae_llm_backbone_encoder(tiny_data, run_dir):
    """``text_encoder_path: llm:<folder>`` mean-pools a causal LM's last hidden states (tiny random Llama here)."""
    from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
    from recbole_weaverec.testing import tiny_llama

    tokenizer = load_tokenizer(str(embedded_folder()))
    folder = run_dir / "tiny-llama"
    tiny_llama(tokenizer, hidden_size=24).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    emb = textembed.encode_texts(["title: red car", "title: a much longer blue boat title", ""], f"llm:{folder}",
                                 cache_dir=run_dir / "emb", progress=False)
    assert emb.shape == (3, 24) and torch.isfinite(emb).all()
    result = run("L3AE", "tiny", config_dict={"data_path": str(tiny_data), "text_encoder_path": f"llm:{folder}",
                                              "text_cache_dir": str(run_dir / "emb"), **FAST})
    assert 0 < result["test_result"]["hit@20"] <= 1
