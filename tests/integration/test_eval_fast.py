"""The fast evaluation path: the slot decoder against lm-eval's HFLM on the shipped toy base, the
persistent generation cache, and the toy code reference programs run beside generation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from omegaconf import OmegaConf

from branchmerge.config import validate
from branchmerge.config.schema import EvalRunnerConfig
from branchmerge.errors import ConfigError
from branchmerge.eval.gencache import GenerationStore, cache_generations, model_key
from branchmerge.eval.harness import build_lm, resolve_decoder
from branchmerge.eval.slots_lm import SlotHFLM
from tests.conftest import TOY_BASE

GREEDY = {"until": [], "do_sample": False, "max_gen_toks": 320}
PER_DOMAIN = 4


@pytest.fixture(scope="module")
def lms():
    """HFLM (batch 8) and SlotHFLM with 3 slots (rows leave and refill many times), float32 on CPU,
    one torch thread (two spinning threads on a loaded 2-core machine run many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = {"pretrained": str(TOY_BASE), "device": "cpu", "dtype": "float32"}
    yield HFLM(**args, batch_size=8), SlotHFLM(**args, batch_size=3)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_prompts(lms, toy_world) -> list[str]:
    """The first PER_DOMAIN test prompts of each toy domain, rendered with the model's chat template."""
    hf, _ = lms
    prompts = []
    for domain in ("math", "code", "science"):
        lines = (toy_world / "data" / domain / "test.jsonl").read_text().splitlines()[:PER_DOMAIN]
        for line in lines:
            user = json.loads(line)["messages"][0]
            prompts.append(hf.apply_chat_template([user], add_generation_prompt=True))
    return prompts


def _requests(prompts: list[str], gen: dict) -> list[Instance]:
    return [Instance("generate_until", {}, (p, dict(gen)), i) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def hf_greedy(lms, toy_prompts) -> list[str]:
    return lms[0].generate_until(_requests(toy_prompts, GREEDY), disable_tqdm=True)


def test_slot_decoder_outputs_equal_hflm_greedy_on_every_toy_domain(lms, toy_prompts, hf_greedy):
    """String-equal greedy outputs, 4 items per domain, 3 slots so rows leave and refill mid-batch.
    Bug planted: a decode step at position len(prompt) + len(tokens) (one past the last token) ->
    rotary positions shift and every output changes; also caught: compaction leaving out a
    stored column of the moved row, and the first generated token dropped after the prefill."""
    got = lms[1].generate_until(_requests(toy_prompts, GREEDY), disable_tqdm=True)
    assert got == hf_greedy
    assert len({len(w) for w in hf_greedy}) > 3  # rows of different lengths: rows really left early


def test_slot_decoder_cuts_at_stop_strings_like_hflm(lms, toy_prompts, hf_greedy):
    """`until` strings end a row early; the text is still HFLM's (cut at the first stop string).
    Bug planted: rows not stopped by `until` and the cut skipped -> text after the stop string."""
    hf, slots = lms
    gen = {**GREEDY, "until": ["\n\n", "="]}
    want = hf.generate_until(_requests(toy_prompts, gen), disable_tqdm=True)
    assert slots.generate_until(_requests(toy_prompts, gen), disable_tqdm=True) == want
    assert sum(map(len, want)) < 0.5 * sum(map(len, hf_greedy))  # the stop strings really cut


def test_a_row_stops_only_once_the_cut_cannot_move(lms):
    """Stop strings "1 2 3" and "2": on "1 2" the cut would be "1 " but "1 2 3" may still complete
    (then the cut is ""). Bug planted: stopping at the first stop string found -> "1 " returned."""
    _, slots = lms
    finished = slots._stopper(["1 2 3", "2", "<|endoftext|>"], "<|endoftext|>")
    enc = slots.tokenizer
    assert not finished(enc("1 2", add_special_tokens=False)["input_ids"])
    assert finished(enc("1 2 3 and more", add_special_tokens=False)["input_ids"])
    assert slots._stopper([], "<|endoftext|>") is None  # EOS alone: the EOS id ends the row


def test_sampled_requests_go_to_hf_generate(lms, toy_prompts):
    """temperature > 0: the same seeded samples as HFLM. Bug planted: sampled requests treated as
    greedy (is_greedy ignoring do_sample) -> the argmax continuation instead of the sample."""
    hf, slots = lms
    gen = {"until": [], "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 64}
    prompts = toy_prompts[::PER_DOMAIN]  # 3 prompts: one batch in both (sampling moves with batching)
    torch.manual_seed(7)
    want = hf.generate_until(_requests(prompts, gen), disable_tqdm=True)
    torch.manual_seed(7)
    assert slots.generate_until(_requests(prompts, gen), disable_tqdm=True) == want
    greedy = hf.generate_until(_requests(prompts, {**GREEDY, "max_gen_toks": 64}), disable_tqdm=True)
    assert want != greedy


class CountingLM:
    """generate_until returns '<prompt>|<max_gen_toks>|<call number>', one number per request."""

    def __init__(self):
        self.asked: list[str] = []

    def generate_until(self, requests, disable_tqdm=False):
        outs = []
        for r in requests:
            self.asked.append(r.args[0])
            outs.append(f"{r.args[0]}|{r.args[1].get('max_gen_toks')}|{len(self.asked)}")
        return outs


def test_generation_cache_hits_return_the_same_text_and_changes_miss(tmp_path):
    """A second run of the same model and settings is served from the store, identical; other
    settings, another model key, or sampling run the model. Bugs planted: the request key without
    the generation settings (max_gen_toks 64 served the 320-token text); sampled requests cached
    (the n samples of a prompt collapse into one)."""
    store = GenerationStore(tmp_path / "cache")
    first = cache_generations(CountingLM(), store, "model-a")
    reqs = _requests(["p1", "p2", "p1"], GREEDY)
    out1 = first.generate_until(reqs)
    again = cache_generations(CountingLM(), GenerationStore(tmp_path / "cache"), "model-a")
    assert again.generate_until(reqs) == out1 and again.asked == []
    assert out1[0] == out1[2] and first.asked == ["p1", "p2"]
    assert again.generation_cache | {"path": None} == {"path": None, "hits": 3, "misses": 0, "sampled": 0}
    shorter = again.generate_until(_requests(["p1"], {**GREEDY, "max_gen_toks": 64}))
    assert again.asked == ["p1"] and shorter[0].startswith("p1|64")
    other = cache_generations(CountingLM(), store, "model-b")
    other.generate_until(reqs)
    assert other.asked == ["p1", "p2"]  # another model: runs (a repeated prompt once)
    sampled = {"until": [], "do_sample": True, "temperature": 0.6, "max_gen_toks": 320}
    s1 = again.generate_until(_requests(["p1", "p1"], sampled))
    s2 = again.generate_until(_requests(["p1", "p1"], sampled))
    assert len(set(s1 + s2)) == 4  # every sample ran


def test_model_key_moves_with_weights_tokenizer_and_settings(tmp_path):
    """Bug planted: the key from the weights alone -> an edited chat template reuses old outputs."""
    folder = tmp_path / "m"
    shutil.copytree(TOY_BASE, folder)
    key = model_key(folder, "w1", {"dtype": "float32"})
    assert model_key(folder, "w1", {"dtype": "float32"}) == key
    assert model_key(folder, "w2", {"dtype": "float32"}) != key
    assert model_key(folder, "w1", {"dtype": "bfloat16"}) != key
    (folder / "chat_template.jinja").write_text((folder / "chat_template.jinja").read_text() + " ")
    assert model_key(folder, "w1", {"dtype": "float32"}) != key


def _settings(model_path, **kw):
    return OmegaConf.create(
        {**OmegaConf.to_container(validate(kw, EvalRunnerConfig)), "model_path": str(model_path)}
    )


def test_build_lm_serves_a_rerun_from_the_cache_and_misses_on_new_weights(tmp_path, toy_prompts):
    """Through build_lm (what evaluate.py runs): a second build on the same folder generates nothing
    and returns the same text; after the weights change every request runs. Bug planted: the
    model key without the weights hash -> the changed model is scored with the old model's text."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(TOY_BASE, folder)
    cfg = _settings(folder, generation_cache=str(tmp_path / "cache"), batch_size=8)
    reqs = _requests(toy_prompts[:: PER_DOMAIN // 2], {**GREEDY, "max_gen_toks": 48})
    first = build_lm(cfg).generate_until(reqs, disable_tqdm=True)
    lm = build_lm(cfg)
    assert lm.generate_until(reqs, disable_tqdm=True) == first
    assert lm.generation_cache["hits"] == len(reqs) and lm.generation_cache["misses"] == 0
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    lm = build_lm(cfg)
    lm.generate_until(reqs, disable_tqdm=True)
    assert lm.generation_cache["misses"] == len(reqs) and lm.generation_cache["hits"] == 0


def test_decoder_choice(tmp_path):
    """auto: slots on CPU, HF generate on GPUs, vLLM on its backend. Bugs planted: auto picking
    slots on cuda (an untested path by default); decoder=slots accepted on vllm and ignored."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert resolve_decoder(_settings(tmp_path)) == "slots"
    assert resolve_decoder(_settings(tmp_path, device="cuda")) == "hf"
    assert resolve_decoder(_settings(tmp_path, decoder="hf")) == "hf"
    assert resolve_decoder(_settings(tmp_path, backend="vllm")) == "vllm"
    with pytest.raises(ConfigError, match="decoder=slots runs on backend=hf only"):
        resolve_decoder(_settings(tmp_path, backend="vllm", decoder="slots"))


def test_reference_programs_run_beside_generation_feed_the_grader(toy_world):
    """The toy code grader then finds every reference output already computed and verdicts are
    unchanged. Bug planted: ReferenceRuns calling sandbox.run_python instead of graders.run_program
    -> nothing is remembered and grading runs every program again."""
    from branchmerge.data.benchmarks import load_toy
    from branchmerge.eval.prefetch import ReferenceRuns, reference_programs
    from branchmerge.verify import graders

    docs = [load_toy("code", str(toy_world))["test"][i] for i in range(4)]
    programs = reference_programs(docs + docs[:1])  # a repeated document runs once
    assert len(programs) == 4
    graders.run_program.cache_clear()
    runs = ReferenceRuns(programs, workers=2)
    outputs = [f.result() for f in runs.futures.values()]
    runs.close()
    assert graders.run_program.cache_info().misses == 4 and all(o is not None for o in outputs)
    answers = [f"```\n{o}```" for o in reversed(outputs)]  # futures run last document first
    verdicts = [
        graders.grade_toy("code", a, d["answer"], json.loads(d["meta"])) for a, d in zip(answers, docs)
    ]
    assert verdicts == [True] * 4
    assert graders.run_program.cache_info().misses == 4  # grading ran nothing new


def test_reference_outputs_persist_in_the_store_and_grade_the_same(toy_world, tmp_path, monkeypatch):
    """A later evaluation on the same store runs no reference program (the grader is handed the
    stored outputs) and every verdict is unchanged; a program that failed is not stored; another
    sandbox setup runs them again. Bugs planted: stored outputs not handed to the grader
    (remember_outputs skipped) -> grading runs the sandbox again; the key without the sandbox
    identity -> another interpreter reuses these outputs; failed runs stored as an output."""
    from branchmerge.data.benchmarks import load_toy
    from branchmerge.eval import prefetch
    from branchmerge.eval.prefetch import ReferenceRuns, reference_programs
    from branchmerge.verify import graders

    docs = [load_toy("code", str(toy_world))["test"][i] for i in range(4)]
    bad = "raise SystemExit(3)"
    programs = reference_programs(docs) + [bad]
    store = GenerationStore(tmp_path / "cache")

    def fresh_process():
        graders.run_program.cache_clear()
        monkeypatch.setattr(graders, "_known_outputs", {})

    def verdicts():
        outs = [graders.run_program(json.loads(d["meta"])["program"]) for d in docs]
        answers = [f"```\n{o}```" for o in outs]
        return [
            graders.grade_toy("code", a, d["answer"], json.loads(d["meta"])) for a, d in zip(answers, docs)
        ]

    fresh_process()
    with ReferenceRuns(programs, workers=2, store=store) as first:
        assert [f.result() is None for f in first.futures.values()] == [True, False, False, False, False]
    want = verdicts()
    assert want == [True] * 4 and first.stored == 0

    fresh_process()

    def no_sandbox(*a, **k):
        raise AssertionError("a stored reference program ran again")

    monkeypatch.setattr(graders, "run_python", no_sandbox)
    with ReferenceRuns(programs, workers=2, store=store) as again:
        assert list(again.futures) == [bad]  # only the failed one runs again (and fails here)
    assert again.stored == 4 and verdicts() == want
    monkeypatch.undo()

    fresh_process()
    other = prefetch.sandbox_identity() | {"interpreter": "/opt/other/python3"}
    monkeypatch.setattr(prefetch, "sandbox_identity", lambda: other)
    with ReferenceRuns(programs, workers=2, store=store) as elsewhere:
        assert len(elsewhere.futures) == 5 and elsewhere.stored == 0
        [f.result() for f in elsewhere.futures.values()]
