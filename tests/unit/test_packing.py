"""Packing: best-fit determinism and efficiency; packed == unpacked logits; no leakage across documents."""

import pytest
import torch

from branchmerge.data.packing import collate_packed, collate_padded, pack, packing_efficiency
from branchmerge.data.tokenize import encode_messages
from branchmerge.models import build_model, load_tokenizer
from tests.conftest import load_model_entry


def test_pack_is_deterministic_complete_and_fits():
    lengths = [((i * 37) % 200) + 5 for i in range(500)]
    rows = pack(lengths, 256, seed=1)
    assert rows == pack(lengths, 256, seed=1) and rows != pack(lengths, 256, seed=2)
    assert sorted(d for r in rows for d in r) == list(range(500))
    assert all(sum(lengths[d] for d in r) <= 256 for r in rows)
    assert packing_efficiency(lengths, rows, 256) > 0.95
    with pytest.raises(ValueError, match="300 tokens > max_length 256"):
        pack([300], 256, seed=0)


def _docs(tok, n=3):
    convs = [
        [
            {"role": "user", "content": f"What is {i} + {i + 1}?"},
            {
                "role": "assistant",
                "content": f"<think>\n{i} + {i + 1} = {2 * i + 1}.\n</think>\n\n\\boxed{{{2 * i + 1}}}",
            },
        ]
        for i in range(n)
    ]
    return [encode_messages(c, tok, "chatml") for c in convs]


@pytest.fixture(scope="module", params=["pico", "pico_untied"])
def pico(request, toy_world):
    cfg = load_model_entry(request.param, toy_world)
    tok = load_tokenizer(cfg)
    model = build_model(cfg, tok)
    model.eval()
    return model, tok


def test_collate_layout(toy_tokenizer):
    docs = _docs(toy_tokenizer)
    batch = collate_packed([docs], 128, toy_tokenizer.pad_token_id)
    lens = [len(d["input_ids"]) for d in docs]
    pos = batch["position_ids"][0].tolist()
    starts = [0, lens[0], lens[0] + lens[1]]
    assert all(pos[s] == 0 for s in starts) and pos[starts[1] - 1] == lens[0] - 1
    assert all(batch["labels"][0, s] == -100 for s in starts)
    assert batch["labels"][0, sum(lens) :].eq(-100).all()
    plain = collate_packed([docs], 128, toy_tokenizer.pad_token_id, cross_document_attention=True)
    assert plain["position_ids"][0].tolist() == list(range(128))


def test_packed_and_unpacked_logits_match(pico):
    model, tok = pico
    docs = _docs(tok)
    packed = collate_packed([docs], 160, tok.pad_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        pos = 0
        for d in docs:
            n = len(d["input_ids"])
            alone = model(input_ids=torch.tensor([d["input_ids"]]), use_cache=False).logits
            assert (logits[0, pos : pos + n] - alone[0]).abs().max() <= 1e-5
            pos += n
        padded = collate_padded(docs, tok.pad_token_id)
        plog = model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits
        for i, d in enumerate(docs):
            n = len(d["input_ids"])
            alone = model(input_ids=torch.tensor([d["input_ids"]]), use_cache=False).logits
            assert (plog[i, :n] - alone[0]).abs().max() <= 1e-5


def test_no_gradient_flows_across_documents(pico):
    model, tok = pico
    docs = _docs(tok)
    packed = collate_packed([docs], 160, tok.pad_token_id)
    emb = model.get_input_embeddings()(packed["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, position_ids=packed["position_ids"], use_cache=False).logits
    n0, n1 = len(docs[0]["input_ids"]), len(docs[1]["input_ids"])
    logits[0, n0 : n0 + n1].sum().backward()  # outputs of the second document only
    grad = emb.grad[0].abs().sum(-1)
    assert grad[:n0].max() == 0  # nothing from the first document
    assert grad[n0 + n1 :].max() == 0  # nor from later ones
    assert grad[n0 : n0 + n1].min() > 0


def test_default_cache_would_leak_across_documents(pico):
    """Why the trainer passes use_cache=False: with a cache transformers ignores position_ids restarts."""
    model, tok = pico
    docs = _docs(tok)
    packed = collate_packed([docs], 160, tok.pad_token_id)
    with torch.no_grad():
        safe = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        leaky = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=True
        ).logits
    n0 = len(docs[0]["input_ids"])
    assert (safe[0, n0:] - leaky[0, n0:]).abs().max() > 1e-3
