"""Checkpoints: our format (float32 and float16) and the original release format round trip,
the original loads with the "embd" attention scale unless overridden, and every kind of broken
checkpoint fails at load time with a message that names the file or tensor and the mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tinyllm_trio.model import checkpoint
from tinyllm_trio.model.checkpoint import (
    CheckpointError,
    default_model_path,
    load_model,
    read_checkpoint,
    save_checkpoint,
    save_original,
)
from tinyllm_trio.model.tokenizer import HybridTokenizer, build_vocab
from tinyllm_trio.model.transformer import ModelConfig, Transformer

TEXT = "the cat sat on the mat. the dog ran to the park, and the bird sang a song!"
SEED_VOCAB = Path("/work/shared/seed/tinystories_tokenizer_vocab.json")


@pytest.fixture(scope="module")
def tok() -> HybridTokenizer:
    return build_vocab([TEXT], n_words=40, n_chars=30)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_embd=32, n_head=4, n_layer=2, max_context=48)
    return Transformer.random(cfg, seed=5, std=0.2)


# The structural faults are found alike by the full load and by the light read the server
# process does (config, tokenizer and the tensors' names and shapes from the headers).
both_readers = pytest.mark.parametrize("read", [load_model, read_checkpoint])


def _same_weights(a: Transformer, b: Transformer) -> bool:
    wa, wb = a.weights(), b.weights()
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


# ---- round trips -----------------------------------------------------------------------


def test_our_format_round_trips_float32(tmp_path, model, tok):
    save_checkpoint(tmp_path, model, tok, dtype="float32")
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == checkpoint.FORMAT and config["n_embd"] == 32
    loaded = load_model(tmp_path)
    assert loaded.path == tmp_path
    assert loaded.transformer.config == model.config
    assert _same_weights(loaded.transformer, model)
    assert loaded.tokenizer.to_dict() == tok.to_dict()
    ids = tok.encode("the cat ran to the park")
    assert np.array_equal(loaded.transformer.forward(ids), model.forward(ids))


def test_our_format_float16_is_half_size_and_loads_as_float32(tmp_path, model, tok):
    save_checkpoint(tmp_path / "f16", model, tok)  # float16 is the default
    save_checkpoint(tmp_path / "f32", model, tok, dtype="float32")
    on_disk = load_file(tmp_path / "f16" / "model.safetensors")
    assert all(w.dtype == np.float16 for w in on_disk.values())
    size16 = (tmp_path / "f16" / "model.safetensors").stat().st_size
    size32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded = load_model(tmp_path / "f16").transformer
    for name, w in model.weights().items():
        got = loaded.weights()[name]
        assert got.dtype == np.float32
        assert np.array_equal(got, w.astype(np.float16).astype(np.float32))
    ids = tok.encode("the dog sat")
    assert np.abs(loaded.forward(ids) - model.forward(ids)).max() < 0.05


def test_original_format_round_trips_and_defaults_to_embd(tmp_path, model, tok):
    save_original(tmp_path, model, tok)
    meta = (tmp_path / "weights" / "metadata.txt").read_text().splitlines()
    assert len(meta) == len(model.weights())
    assert f"token_embedding.weight {tok.vocab_size} 32 float32 {tok.vocab_size * 32}" in meta
    assert "ln_f.weight 32 float32 32" in meta
    raw = (tmp_path / "weights" / "blocks_1_sa_heads_3_query_weight.bin").read_bytes()
    assert np.array_equal(
        np.frombuffer(raw, "<f4").reshape(8, 32),
        model.weights()["blocks.1.sa.heads.3.query.weight"],
    )
    assert (tmp_path / "tinystories_tokenizer_vocab.json").is_file()

    loaded = load_model(tmp_path)
    cfg = loaded.transformer.config
    assert cfg.attention_scale == "embd"  # what the original weights were trained with
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer) == (tok.vocab_size, 32, 4, 2)
    assert cfg.max_context == 512
    assert _same_weights(loaded.transformer, model)
    assert loaded.tokenizer.to_dict() == tok.to_dict()

    as_head = load_model(tmp_path, attention_scale="head").transformer
    assert as_head.config.attention_scale == "head"
    ids = tok.encode("the bird sang")
    assert np.array_equal(as_head.forward(ids), model.forward(ids))  # model is "head"
    assert np.abs(loaded.transformer.forward(ids) - model.forward(ids)).max() > 1e-3


def test_original_release_top_directory_is_accepted(tmp_path, model, tok):
    save_original(tmp_path / "model", model, tok)
    assert load_model(tmp_path).path == tmp_path / "model"


def test_attention_scale_override_of_our_format(tmp_path, model, tok):
    save_checkpoint(tmp_path, model, tok, dtype="float32")
    assert load_model(tmp_path).transformer.config.attention_scale == "head"
    assert load_model(tmp_path, attention_scale="embd").transformer.config.attention_scale == "embd"
    with pytest.raises(CheckpointError, match="attention_scale"):
        load_model(tmp_path, attention_scale="both")


def test_seed_vocabulary_with_default_shapes_in_the_original_format(tmp_path):
    """The release's shapes: 154 tensors, dims inferred (3266 x 192, 6 heads, 6 layers)."""
    tok = HybridTokenizer.from_file(SEED_VOCAB)
    model = Transformer.random(ModelConfig(), seed=0)
    save_original(tmp_path, model, tok)
    assert len((tmp_path / "weights" / "metadata.txt").read_text().splitlines()) == 154
    loaded = load_model(tmp_path)
    assert loaded.transformer.config == ModelConfig(attention_scale="embd")
    assert loaded.tokenizer.vocab_size == 3266


# ---- load-time validation --------------------------------------------------------------


def _ours(tmp_path, model, tok) -> Path:
    save_checkpoint(tmp_path, model, tok, dtype="float32")
    return tmp_path


@both_readers
def test_missing_tensor(read, tmp_path, model, tok):
    path = _ours(tmp_path, model, tok)
    w = load_file(path / "model.safetensors")
    del w["blocks.1.ffwd.net.2.weight"]
    save_file(w, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): blocks.1.ffwd.net.2.weight"):
        read(path)


@both_readers
def test_extra_tensor(read, tmp_path, model, tok):
    path = _ours(tmp_path, model, tok)
    w = load_file(path / "model.safetensors")
    w["blocks.2.ln1.weight"] = np.ones(32, np.float32)
    save_file(w, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): blocks.2.ln1.weight"):
        read(path)


@both_readers
def test_wrong_shape(read, tmp_path, model, tok):
    path = _ours(tmp_path, model, tok)
    w = load_file(path / "model.safetensors")
    w["blocks.0.sa.proj.weight"] = np.zeros((32, 31), np.float32)
    save_file(w, path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"blocks.0.sa.proj.weight has shape \[32, 31\], expected \[32, 32\]",
    ):
        read(path)


def test_non_finite_weights(tmp_path, model, tok):
    path = _ours(tmp_path, model, tok)
    w = load_file(path / "model.safetensors")
    w["ln_f.bias"][3] = np.nan
    save_file(w, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"ln_f.bias holds NaN"):
        load_model(path)
    # The light read never sees the values: the workers' load reports this one.
    assert read_checkpoint(path).config == model.config


@pytest.mark.parametrize("fmt", ["ours", "original"])
def test_read_checkpoint_gives_what_load_model_gives_without_the_weights(tmp_path, model, tok, fmt):
    if fmt == "ours":
        save_checkpoint(tmp_path, model, tok, dtype="float32")
    else:
        save_original(tmp_path, model, tok)
    info, loaded = read_checkpoint(tmp_path), load_model(tmp_path)
    assert info.path == loaded.path == tmp_path
    assert info.config == loaded.transformer.config
    assert info.tokenizer.encode(TEXT) == loaded.tokenizer.encode(TEXT)
    assert read_checkpoint(tmp_path, attention_scale="head").config.attention_scale == "head"


@both_readers
def test_vocabulary_mismatch(read, tmp_path, model):
    other = build_vocab([TEXT], n_words=40, n_chars=10)
    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        save_checkpoint(tmp_path, model, other)
    good = build_vocab([TEXT], n_words=40, n_chars=30)
    save_checkpoint(tmp_path, model, good)
    other.save(tmp_path / "tokenizer.json")
    with pytest.raises(
        CheckpointError,
        match=rf"tokenizer has {other.vocab_size} tokens .* vocab_size is {good.vocab_size}",
    ):
        read(tmp_path)


@both_readers
def test_bad_config(read, tmp_path, model, tok):
    path = _ours(tmp_path, model, tok)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(CheckpointError, match="'format' must be"):
        read(path)
    (path / "config.json").write_text(json.dumps({**cfg, "n_head": 5}))
    with pytest.raises(CheckpointError, match="divisible"):
        read(path)
    del cfg["max_context"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \['max_context'\]"):
        read(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read JSON"):
        read(path)


@both_readers
def test_missing_and_corrupt_files(read, tmp_path, model, tok):
    path = _ours(tmp_path, model, tok)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        read(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing"):
        read(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer.json: missing"):
        read(path)


@both_readers
def test_truncated_original_bin(read, tmp_path, model, tok):
    save_original(tmp_path, model, tok)
    f = tmp_path / "weights" / "blocks_0_ffwd_net_0_weight.bin"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(
        CheckpointError,
        match=r"blocks.0.ffwd.net.0.weight needs 16384 bytes \(4096 float32\), the file has 16380",
    ):
        read(tmp_path)


@both_readers
def test_original_missing_tensor_and_bad_metadata(read, tmp_path, model, tok):
    save_original(tmp_path, model, tok)
    meta = tmp_path / "weights" / "metadata.txt"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(x for x in lines if not x.startswith("blocks.1.ln2.bias")) + "\n")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): blocks.1.ln2.bias"):
        read(tmp_path)
    meta.write_text("\n".join([*lines, "ln_f.weight 32 float16 32"]) + "\n")
    with pytest.raises(CheckpointError, match="dtype 'float16', expected float32"):
        read(tmp_path)
    meta.write_text("\n".join([*lines, "oops"]) + "\n")
    with pytest.raises(CheckpointError, match=r"metadata.txt:\d+: malformed line 'oops'"):
        read(tmp_path)
    meta.write_text("\n".join(lines) + "\n")
    (tmp_path / "weights" / "lm_head_weight.bin").unlink()
    with pytest.raises(CheckpointError, match=r"lm_head_weight.bin: cannot read tensor lm_head"):
        read(tmp_path)


@both_readers
def test_not_a_checkpoint(read, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        read(tmp_path / "nowhere")


def test_missing_default_model(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "default")
    with pytest.raises(CheckpointError, match="packaged default model is missing"):
        load_model(None)


def test_default_model_path_is_in_the_package():
    assert default_model_path() == Path(checkpoint.__file__).parent / "default"
