"""Selection filters one by one: format, select, MinHash near-duplicates, n-gram decontamination, stage counts,
and the distill configs (every data experiment composes and validates)."""

from __future__ import annotations

import pytest

from branchmerge.config import validate
from branchmerge.config.schema import DistillConfig
from branchmerge.data.records import Record
from branchmerge.distill import filters as F
from branchmerge.distill.dedup import MinHashIndex, NgramIndex, exact_key, ngrams, words
from tests.conftest import compose


def rec(rid: str, prompt: str, response: str | None = "<think>\nok\n</think>\n\nA", **meta) -> Record:
    msgs = [{"role": "user", "content": prompt}]
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return Record(rid, "math", "test", msgs, "A", meta)


@pytest.mark.parametrize(
    "response,meta,problem",
    [
        ("<think>\nx\n</think>\n\n\\boxed{1}", {}, None),
        ("no think at all", {}, "no <think>"),
        ("<think>\nnever closed \\boxed{1}", {}, "never closed"),
        ("<think>\nx\n</think>\n\n   ", {}, "no answer after"),
        ("<think>a</think><think>b\n\\boxed{1}", {}, "unbalanced"),
        ("<think>\nx\n</think>\n\n1", {"finish_reason": "length"}, "truncated"),
        (None, {}, "no assistant turn"),
    ],
)
def test_format_check(response, meta, problem):
    got = F.check_format(rec("r", "q", response, **meta))
    assert got is None if problem is None else problem in got


def test_select_on_metadata_and_domain():
    r = rec("r", "q", question_type="proof")
    assert F.check_select(r, {"question_type": ["proof"], "domain": ["math"]}) is None
    assert "question_type='proof' not in" in F.check_select(r, {"question_type": ["math-word-problem"]})


def test_text_keys():
    assert words("What is 2+2?") == ["what", "is", "2", "2"]
    assert exact_key("Compute  $3+4$.") == exact_key("compute $3+4$.")
    assert ngrams(["a", "b", "c"], 2) == {"a b", "b c"} and ngrams(["a"], 3) == {"a"}


def test_minhash_finds_near_duplicates_but_not_different_texts_or_same_group():
    base = (
        "Let x be the number of apples that Lea buys on Monday and y the number she sells on Tuesday. "
        "Each apple costs three coins on Monday but only two coins on Tuesday, and Lea ends the week with "
        "exactly as many coins as she started with. If she bought twelve more apples than she sold, how many "
        "apples did she buy on Monday and how many coins did she spend?"
    )
    idx = MinHashIndex(num_perm=64, bands=16, shingle=3, threshold=0.8)
    assert idx.add_if_new("a", base, "g1") is None
    assert idx.add_if_new("b", base.replace("Tuesday", "Tuesday morning", 1), "g2") == "a"
    assert (
        idx.add_if_new("c", "A completely different question about prime numbers and their gaps", "g3")
        is None
    )
    assert idx.add_if_new("d", base, "g1") is None  # samples of the same question are not near-duplicates


def test_ngram_decontamination_ignores_template_text_and_finds_paraphrased_copies():
    template = "Please reason step by step, and put your final answer within boxed."
    evals = {
        "aime24": [
            f"Problem {i}: find the number of {w} such that the product is a square. {template}"
            for i, w in enumerate(["triples", "pairs", "chains", "graphs"] * 4)
        ]
    }
    evals["aime24"].append("Find the remainder when 2^10 is divided by 1000.")  # shorter than n words
    idx = NgramIndex(evals, n=5, threshold=0.5, max_df=3)
    assert idx.match(f"Some other task entirely. {template}") is None  # shared instruction only
    hit = idx.match("Find the remainder when 2^10 is divided by 1000, then add one.")
    assert hit is not None and hit[:2] == ("aime24", 16)


def test_stage_counts_add_up_with_first_failing_filter():
    recs = [rec("ok", "q1"), rec("bad-format", "q2", "plain"), rec("dup", "q1"), rec("sel", "q3", kind="x")]
    st = F.run_stage(
        "traces",
        recs,
        [("select", lambda r: "x" if r.metadata.get("kind") else None), ("format", F.check_format)],
    )
    F.dedup_stage(st, with_response=False, near=None)
    assert st.stats() == {"input": 4, "removed": {"select": 1, "format": 1, "duplicate": 1}, "kept": 1}
    assert [e["id"] for e in st.log] == ["bad-format", "sel", "dup"]


@pytest.mark.parametrize("experiment", ["toy_data", "toy_distill", "math_data", "code_data", "science_data"])
def test_data_experiments_compose_and_validate(experiment, tmp_path):
    cfg = validate(
        compose("distill", [f"+experiment={experiment}", f"paths.root_dir={tmp_path}"]), DistillConfig
    )
    if experiment == "toy_data":
        assert cfg.toy is not None and not cfg.domains and cfg.output_dir == f"{tmp_path}/outputs/toy_world"
        return
    branches = {"math_data": "math", "code_data": "code", "science_data": "science"}
    if experiment in branches:  # the files conf/data/r1_<domain>.yaml trains on
        assert cfg.output_dir == f"{tmp_path}/data/branches" and list(cfg.domains) == [branches[experiment]]
        assert cfg.selection.max_tokens == 16384 and "toy" not in cfg.selection.decontam.sets
    assert all(d.sources for d in cfg.domains.values())


def test_paper_data_files_match_the_training_configs():
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    for domain in ("math", "code", "science"):
        data = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"r1_{domain}.yaml"))
        assert data["train_files"] == [f"${{paths.data_dir}}/branches/{domain}/train.jsonl"]
        exp = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{domain}_data.yaml"))
        assert exp["output_dir"] == "${paths.data_dir}/branches" and list(exp["domains"]) == [domain]


@pytest.mark.slow
def test_math_verification_in_worker_processes_matches_the_main_thread():
    from branchmerge.distill.verify import verify_all

    answers = [("\\frac{3}{4}", "0.75"), ("7", "7"), ("12", "13"), ("", "1")]
    recs = [
        Record(
            f"r{i}",
            "math",
            "t",
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": f"<think>x</think> \\boxed{{{got}}}"},
            ],
            ref,
        )
        for i, (ref, got) in enumerate(answers)
    ]
    expected = [True, True, False, None]
    assert verify_all(recs, "math", workers=1) == expected
    assert verify_all(recs, "math", workers=2, process_batch=1) == expected
