"""Model entries build real Qwen2 models: tied and untied, padded vocabulary, clear errors."""

import pytest
import torch
from omegaconf import OmegaConf

from branchmerge.models import build_model, load_tokenizer
from tests.conftest import load_model_entry


def _model_cfg(name, toy_world, **over):
    return OmegaConf.merge(load_model_entry(name, toy_world), over)


@pytest.mark.parametrize(("name", "tied"), [("pico", True), ("pico_untied", False)])
def test_pico_models(name, tied, toy_world):
    cfg = _model_cfg(name, toy_world)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    assert model.config.hidden_size == 32
    assert model.config.vocab_size % 128 == 0 and model.config.vocab_size > len(tok)  # padded vocabulary
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    ids = torch.tensor([tok("<think>\n1 + 2 = 3\n</think>")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    again = build_model(cfg, tok)  # same init_seed, same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_toy_model_is_a_few_million_parameters(toy_world):
    cfg = _model_cfg("toy", toy_world)
    model = build_model(cfg, load_tokenizer(cfg))
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 10e6
    assert not model.config.tie_word_embeddings


def test_missing_tokenizer_folder_says_how_to_build_it(tmp_path, toy_world):
    cfg = _model_cfg("pico", toy_world)
    cfg.tokenizer = str(tmp_path / "toy_world" / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*distill.py \+experiment=toy_data"):
        load_tokenizer(cfg)


def test_missing_model_path(tmp_path, toy_world):
    cfg = _model_cfg("pico", toy_world, path=str(tmp_path / "no_such_model"), arch=None)
    with pytest.raises(FileNotFoundError, match="no_such_model does not exist"):
        build_model(cfg, load_tokenizer(cfg))


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, toy_world):
    from transformers import Qwen2Config

    Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path / "small_vocab")
    cfg = _model_cfg("pico", toy_world, path=str(tmp_path / "small_vocab"), arch=None)
    with pytest.raises(
        ValueError, match=r"tokenizer has \d+ tokens but model 'pico' has only 64 embedding rows"
    ):
        build_model(cfg, load_tokenizer(cfg))
