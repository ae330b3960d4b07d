"""Test-wide settings and shared fixtures. Never reach a model hub (a lookup would hang ~45 s
before failing)."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama-style model and its tokenizer (vocabulary 512, seed 0), saved once
    per test session; tests only read it."""
    from dpolab.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", vocab_size=512, seed=0)


@pytest.fixture(scope="session")
def persona_tiny_dir(tmp_path_factory):
    """The tiny model of `tiny_dir` with " Yes" and " No" added to its tokenizer as single
    tokens (the persona-statement format of the diverse-values experiments needs them)."""
    from tokenizers import AddedToken

    from dpolab.tiny import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("persona_tiny")
    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken(" Yes", normalized=False), AddedToken(" No", normalized=False)])
    model = tiny_model(vocab_size=len(tok))
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A fresh $DPOLAB_CACHE (reference store, cached states) for one test."""
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
