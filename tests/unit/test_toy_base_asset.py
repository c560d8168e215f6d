"""The shipped toy base is what its README says: same bytes, loadable, with the tokenizer it was trained with."""

import hashlib
import json
import re

from tests.conftest import TOY_BASE


def test_shipped_toy_base_matches_its_readme():
    readme = (TOY_BASE / "README.md").read_text()
    want = re.search(r"sha256\(model\.safetensors\) = ([0-9a-f]{64})", readme).group(1)
    assert hashlib.sha256((TOY_BASE / "model.safetensors").read_bytes()).hexdigest() == want
    assert "python train.py +experiment=toy_base" in readme
    prov = json.loads((TOY_BASE / "branchmerge.json").read_text())
    assert prov["config"]["run_name"] == "toy_base" and prov["config"]["seed"] == 0


def test_shipped_toy_base_loads_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TOY_BASE)
    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    assert model.config.vocab_size >= len(tok) and not model.config.tie_word_embeddings
    assert 1.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    prompt = tok.apply_chat_template(
        [
            {
                "role": "user",
                "content": "Ava has 3 eggs. Then Ava finds 4 more eggs. How many "
                "eggs does Ava have now?\nPlease reason step by step, and put your final answer "
                "within \\boxed{}.",
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = tok.decode(
        model.generate(**ids, max_new_tokens=60, do_sample=False)[0, ids["input_ids"].shape[1] :]
    )
    assert out.startswith("<think>") and "</think>" in out and "\\boxed{" in out
