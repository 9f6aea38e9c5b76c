"""Training path: torch/numpy parity, a toy end-to-end train + eval, the R reader, the baselines.

The parity test is what keeps training and serving from drifting apart: the torch module that
trains the model and the numpy Transformer that serves it must give the same logits on the same
weights. The toy run goes through the real CLI (a few steps on a few KB of text) so the documented
training command cannot rot.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from tinyllm_trio.model.transformer import ModelConfig, Transformer
from tinyllm_trio.training import corpus, evaluate

torch = pytest.importorskip("torch")

from tinyllm_trio.training.torch_model import TorchTransformer  # noqa: E402

# ----------------------------------------------------------------------------- parity


def _randomized_torch_model(config: ModelConfig, seed: int) -> TorchTransformer:
    torch.manual_seed(seed)
    model = TorchTransformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "ln" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.3)  # larger than init, so attention is far from uniform
    return model


@pytest.mark.parametrize("scale", ["head", "embd"])
@pytest.mark.parametrize(
    "config_kw",
    [
        {"vocab_size": 97, "n_embd": 32, "n_head": 4, "n_layer": 2, "max_context": 48},
        {},  # the shipped shape: 3266 vocab, 6 x 192, 6 heads, 512 context
    ],
)
def test_numpy_and_torch_give_the_same_logits(scale: str, config_kw: dict) -> None:
    config = ModelConfig(attention_scale=scale, **config_kw)
    model = _randomized_torch_model(config, seed=1)
    weights = model.numpy_weights()
    numpy_model = Transformer(config, weights)
    assert sorted(weights) == sorted(numpy_model.weights())  # same 154 (or fewer) names
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 40).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    got = numpy_model.forward(ids)
    assert got.shape == expected.shape == (40, config.vocab_size)
    assert np.abs(got - expected).max() < 1e-4
    # the scale matters: the other scale must give visibly different logits
    other = "embd" if scale == "head" else "head"
    swapped = Transformer(ModelConfig(**{**config.to_dict(), "attention_scale": other}), weights)
    assert np.abs(swapped.forward(ids) - expected).max() > 1e-3


def test_torch_state_dict_uses_the_original_names() -> None:
    model = TorchTransformer(ModelConfig())
    names = set(model.state_dict())
    assert len(names) == 154
    assert "blocks.5.sa.heads.5.value.weight" in names
    assert "positions" not in names  # a buffer, not a weight
    assert sum(p.numel() for p in model.parameters()) == 3_913_344


def test_dropout_only_in_training_mode() -> None:
    config = ModelConfig(vocab_size=50, n_embd=16, n_head=2, n_layer=1, max_context=16)
    model = TorchTransformer(config, dropout=0.5)
    x = torch.randint(0, 50, (2, 10))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# ------------------------------------------------------------------- toy end-to-end run

_TOY = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)


def test_toy_train_export_load_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinyllm_trio.cli import main
    from tinyllm_trio.model.checkpoint import load_model

    data = tmp_path / "data"
    data.mkdir()
    chapters = [f"CHAPTER {i}\n{_TOY}\n{_TOY.upper()[:120]}" for i in range(12)]
    (data / "train.txt").write_text("\n\n".join(chapters) + "\n")
    (data / "heldout.txt").write_text(f"CHAPTER X\n{_TOY}\n")
    out = tmp_path / "run"
    toy = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-context", "32"]
    toy += ["--n-words", "40", "--n-chars", "30", "--block-size", "16", "--batch-size", "4"]
    toy += ["--warmup", "5", "--lr", "2e-2", "--eval-interval", "40", "--dropout", "0"]
    toy += ["--threads", "1"]
    common = ["train", "--data", str(data), "--out", str(out), *toy]
    assert main([*common, "--steps", "80"]) == 0

    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 80 and log["tokens_seen"] > 0
    assert [h["step"] for h in log["history"]] == [40, 80]
    # it learned something: loss well under a uniform guess over the vocabulary
    loaded = load_model(out)
    vocab = loaded.tokenizer.vocab_size
    assert vocab == 6 + 40 + 30
    assert log["final_train_loss"] < math.log(vocab) - 0.5

    # the exported checkpoint is the best-held-out weights, readable by the numpy server
    best = torch.load(out / "best.pt")
    exported = loaded.transformer.weights()
    for name, tensor in best.items():
        np.testing.assert_allclose(exported[name], tensor.numpy(), atol=2e-3, rtol=2e-3)

    # resume continues from the saved state (step count carries over)
    assert main([*common, "--steps", "84", "--resume", str(out / "train_state.pt")]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 84 and [h["step"] for h in log["history"]] == [40, 80, 84]

    # --init starts a new run (fresh schedule, step 0) from the checkpoint's weights: with a
    # learning rate too small to move them, its first evaluation is the checkpoint's own loss
    cont = tmp_path / "cont"
    frozen = ["--lr", "1e-12", "--min-lr", "1e-12", "--eval-interval", "1"]
    init = ["train", "--data", str(data), "--out", str(cont), *toy, *frozen, "--steps", "1"]
    assert main([*init, "--init", str(out)]) == 0
    cont_log = json.loads((cont / "train_log.json").read_text())
    assert cont_log["steps"] == 1 and cont_log["config"] == log["config"]
    assert cont_log["history"][0]["heldout_loss"] == pytest.approx(
        log["exported_heldout_loss"], abs=0.02
    )
    assert load_model(cont).tokenizer.to_dict() == loaded.tokenizer.to_dict()
    assert main([*init, "--init", str(out), "--resume", str(out / "train_state.pt")]) == 2

    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"heldout_loss", "heldout_ppl", "unigram_ppl", "bigram_ppl"}
    assert result["heldout_ppl"] == pytest.approx(math.exp(result["heldout_loss"]), rel=1e-3)
    assert all(math.isfinite(v) and v > 0 for v in result.values())


def test_eval_without_corpus_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tinyllm_trio.cli import main

    assert main(["eval", "--data", str(tmp_path)]) == 1
    assert "tinyllm-trio corpus" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays() -> None:
    from tinyllm_trio.training.train import lr_at

    kw = {"peak": 1e-3, "floor": 1e-4, "warmup": 10, "total": 110}
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)
    assert lr_at(110, **kw) == pytest.approx(1e-4)


# ------------------------------------------------------------------------- R reader


def _int(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(s: str | None, latin1: bool = False) -> bytes:
    if s is None:
        return _int(9) + _int(-1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    levels = 4 if latin1 else 8
    return _int(9 | (levels << 12)) + _int(len(raw)) + raw


def _header(version: int = 3) -> bytes:
    h = b"X\n" + _int(version) + _int(0x040201) + _int(0x030500)
    return h + (_int(5) + b"UTF-8" if version == 3 else b"")


def _names_attr(names: list[str], *, ref: bool = False) -> bytes:
    """A pairlist holding one tagged attribute, `names`; the symbol can be a back-reference."""
    tag = _int(255 | (1 << 8)) if ref else _int(1) + _charsxp("names")
    strs = _int(16) + _int(len(names)) + b"".join(_charsxp(n) for n in names)
    return _int(2 | (1 << 10)) + tag + strs + _int(254)


@pytest.mark.parametrize("version", [2, 3])
def test_r_reader_decodes_a_character_vector(version: int) -> None:
    lines = ["It is a truth", "", "caf\u00e9", None]
    body = _int(16) + _int(4) + b"".join(_charsxp(s) for s in lines[:3]) + _charsxp(None)
    obj = corpus.unserialize(_header(version) + body)
    assert obj.type == corpus.STRSXP
    assert obj.value == lines
    latin = corpus.unserialize(_header() + _int(16) + _int(1) + _charsxp("na\u00efve", latin1=True))
    assert latin.value == ["na\u00efve"]
    with pytest.raises(corpus.RDataError):
        corpus.unserialize(b"A\n" + body)
    with pytest.raises(corpus.RDataError):
        corpus.unserialize(_header() + body[:-3])


def test_r_lazyload_database_round_trip(tmp_path: Path) -> None:
    """A hand-built Rdata.rdx/.rdb pair, laid out as R writes them, read back by name."""
    books = {"emma": ["CHAPTER I", "Emma Woodhouse,", "handsome,", "", "clever."], "p": ["x"]}
    rdb = b""
    offsets = {}
    for name, lines in books.items():
        ser = _header() + _int(16) + _int(len(lines)) + b"".join(_charsxp(s) for s in lines)
        entry = struct.pack(">I", len(ser)) + zlib.compress(ser)
        offsets[name] = (len(rdb), len(entry))
        rdb += entry
    # index: list(variables = list(emma = c(off, len), ...), references = list(), compressed = TRUE)
    variables = _int(19 | (1 << 9)) + _int(len(books))
    for off, length in offsets.values():
        variables += _int(13) + _int(2) + _int(off) + _int(length)
    variables += _names_attr(list(books))
    index = _int(19 | (1 << 9)) + _int(3) + variables + _int(19) + _int(0)
    index += _int(10) + _int(1) + _int(1)
    index += _names_attr(["variables", "references", "compressed"], ref=True)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_header() + index))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert corpus.read_package_texts(tmp_path) == books


def test_chapters_split_and_hold_out_is_deterministic(tmp_path: Path) -> None:
    lines = ["SENSE AND SENSIBILITY", "", "by Jane Austen", ""]
    for i in range(1, 41):
        lines += [f"CHAPTER {i}", "", f"Para {i} line one", "line two.", "", f"Second {i}.", ""]
    chapters = corpus.split_chapters(lines)
    assert len(chapters) == 40
    assert chapters[0] == ["CHAPTER 1", "Para 1 line one line two.", "Second 1."]
    info = corpus.write_split({"book": lines}, tmp_path)
    held = corpus.read_documents(tmp_path / "heldout.txt")
    train = corpus.read_documents(tmp_path / "train.txt")
    assert [d.splitlines()[0] for d in held] == ["CHAPTER 8", "CHAPTER 28"]
    assert len(train) == 38 and info["heldout_chapters"] == 2
    assert not set(held) & set(train)


# ------------------------------------------------------------------------ baselines


def test_unigram_and_bigram_math_on_a_toy_corpus() -> None:
    train = np.array([0, 1, 0, 1, 2])
    heldout = np.array([0, 1, 3])
    v = 4
    nll, n = evaluate.unigram_nll(train, heldout, v)
    # counts [2, 2, 1, 0], N = 5: p(1) = 3/9, p(3) = 1/9
    assert n == 2
    assert nll == pytest.approx(-(math.log(3 / 9) + math.log(1 / 9)))
    nll, n = evaluate.bigram_nll(train, heldout, v)
    # after 0: c=2, T=1, c(0,1)=2 -> (2 + 3/9) / 3; after 1: c=2, T=2, c(1,3)=0 -> (2/9) / 4
    assert nll == pytest.approx(-(math.log((2 + 3 / 9) / 3) + math.log((2 / 9) / 4)))


def test_bigram_is_a_distribution_for_every_context() -> None:
    rng = np.random.default_rng(0)
    v = 7
    train = rng.integers(0, v - 1, 200)  # token 6 never seen: an unseen context and target
    for prev in range(v):
        total = 0.0
        for w in range(v):
            nll, _ = evaluate.bigram_nll(train, np.array([prev, w]), v)
            total += math.exp(-nll)
        assert total == pytest.approx(1.0)


# -------------------------------------------------------------------- shipped model


def test_the_shipped_default_model_loads_and_fits_the_budget() -> None:
    """The committed checkpoint: the seed's shape, float16 on disk within 16 MB, a model card."""
    from tinyllm_trio.model.checkpoint import default_model_path, load_model

    path = default_model_path()
    assert (path / "model.safetensors").stat().st_size <= 16 * 1024 * 1024
    card = (path / "MODEL_CARD.md").read_text()
    assert "r-cran-janeaustenr" in card and "tinyllm-trio train" in card
    loaded = load_model()
    assert loaded.transformer.config == ModelConfig()
    assert loaded.tokenizer.vocab_size == 3266
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife."
    )
    ids = loaded.tokenizer.encode(text)
    logp = evaluate._log_softmax(loaded.transformer.forward(ids[:-1]))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    # a trained model, not a random one (which would score about ln(3266) = 8.1 nats)
    assert nll < 5.0
