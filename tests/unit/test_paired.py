"""Paired statistics between models scored on the same items, against values worked out by hand.

PYTHONPATH=$PWD python -m pytest -q tests/unit/test_paired.py
"""

from __future__ import annotations

import ast
import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch

from branchmerge.report.paired import (
    bootstrap_means,
    compare_dirs,
    load_item_scores,
    mcnemar_exact,
    paired_diff,
    paired_diff_mean,
    retention,
)

TASKS = ["toy_math", "toy_code", "toy_science"]


def write_eval(folder: Path, verdicts: dict[str, list[list[int]] | list[int]], order=None) -> Path:
    """An eval folder by hand: samples.jsonl (one row per item and sample) and results.json."""
    from branchmerge.eval.results import summarize_task

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for task, per_item in verdicts.items():
        for d, v in enumerate(per_item):
            for k, verdict in enumerate(v if isinstance(v, list) else [v]):
                q = f"{task.replace('_', '-')}-test-{d:06d}"
                rows.append({"task": task, "doc_id": d, "question": q, "sample": k, "verdict": verdict})
    tasks = {t: summarize_task([r for r in rows if r["task"] == t], 320) for t in verdicts}
    for i in order or []:
        rows.append(rows.pop(i))
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "results.json").write_text(json.dumps({"tasks": tasks}))
    return folder


def test_mcnemar_exact_matches_hand_binomials():
    """Guards against a one-sided p (no factor 2), the normal approximation, or no cap at 1.

    b=1, c=8: 2 P(X ≤ 1), X ~ Bin(9, ½) = 2 (1 + 9) / 512 = 0.0390625; b=2, c=10: 2 (1 + 12 + 66) / 4096.
    """
    assert mcnemar_exact(1, 8) == 0.0390625
    assert mcnemar_exact(8, 1) == 0.0390625
    assert mcnemar_exact(2, 10) == 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(0, 5) == 2 / 32
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_discordant_counts_and_delta():
    """Guards against counting concordant pairs as discordant or swapping which model won.

    a = 1 1 0 0 1 0, b = 1 0 1 0 0 0: A alone right on items 2 and 5, B alone on item 3; Δ = 1/6.
    """
    p = paired_diff([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0], resamples=200)
    assert (p.a_only, p.b_only, p.n) == (2, 1, 6)
    assert p.delta == pytest.approx(1 / 6)
    assert p.p_mcnemar == mcnemar_exact(2, 1) == 1.0
    assert paired_diff([0.5, 1.0], [0.0, 1.0], resamples=50).p_mcnemar is None  # n > 1: no McNemar


def test_bootstrap_means_are_the_means_of_the_drawn_items():
    """Guards against wrong resample counts (scatter vs index, dividing by the wrong N)."""
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25, 1.0], [1.0, 0.0, 0.0, 0.5, 1.0]], dtype=torch.float64)
    got = bootstrap_means(x, resamples=7, seed=3, chunk=3)
    g = torch.Generator().manual_seed(3)
    idx = torch.cat([torch.randint(5, (r, 5), generator=g) for r in (3, 3, 1)])
    assert torch.allclose(got, x[:, idx].mean(-1).T)


def test_paired_interval_is_narrower_than_unpaired_for_correlated_models():
    """Guards against resampling a and b with independent item draws (an unpaired interval).

    b agrees with a on 380 of 400 items: the shared item difficulty must cancel. The unpaired normal
    interval is 2·1.96·sqrt(var a/N + var b/N) ≈ 9.8 points; the paired one about a third of that.
    """
    rng = random.Random(0)
    a = [float(rng.random() < 0.5) for _ in range(400)]
    flip = set(rng.sample(range(400), 20))
    b = [1 - v if d in flip else v for d, v in enumerate(a)]
    p = paired_diff(a, b)
    var = [sum((v - sum(x) / len(x)) ** 2 for v in x) / (len(x) - 1) for x in (a, b)]
    unpaired = 2 * 1.96 * math.sqrt(var[0] / 400 + var[1] / 400)
    assert p.lo <= p.delta <= p.hi
    assert p.hi - p.lo < 0.5 * unpaired
    assert p.a_only + p.b_only == 20


def test_seed_determinism():
    """Guards against drawing from torch's global generator (results change with unrelated seeding)."""
    rng = random.Random(1)
    a, b = [float(rng.random() < 0.6) for _ in range(300)], [float(rng.random() < 0.5) for _ in range(300)]
    torch.manual_seed(123)
    first = paired_diff(a, b, resamples=2000, seed=7)
    torch.manual_seed(456)
    assert paired_diff(a, b, resamples=2000, seed=7) == first
    assert paired_diff(a, b, resamples=2000, seed=8) != first


def test_retention_constructed_example():
    """Guards against an inverted ratio, (M − B)/E, or unpaired draws of the three models.

    Items u_d vary; base = u, expert = u + 0.4, merge = u + 0.1: every paired resample gives exactly
    ρ = 0.1/0.4 = 0.25, so the interval collapses to 0.25 (independent draws would spread it).
    """
    u = [0.05 * (d % 11) for d in range(60)]
    r = retention(u, [x + 0.1 for x in u], [x + 0.4 for x in u], resamples=500)
    assert r.value == pytest.approx(0.25)
    assert r.lo == pytest.approx(0.25) and r.hi == pytest.approx(0.25)
    binary = retention([0] * 8 + [1] * 2, [0] * 5 + [1] * 5, [0] * 2 + [1] * 8, resamples=500)
    assert binary.value == pytest.approx((0.5 - 0.2) / (0.8 - 0.2))
    assert math.isnan(retention([0, 1], [1, 1], [0, 1], resamples=50).value)  # no expert gain


def test_mean_over_tasks_is_the_mean_of_task_deltas():
    """Guards against pooling items of tasks of different sizes instead of the table's unweighted mean."""
    p = paired_diff_mean([([1, 1, 0, 0], [0, 0, 0, 0]), ([1] * 10, [1] * 10)], resamples=500)
    assert p.delta == pytest.approx((0.5 + 0.0) / 2)
    assert p.n == 14 and p.p_mcnemar is None


def test_items_match_by_id_not_by_line_order(tmp_path):
    """Guards against pairing items by their position in samples.jsonl instead of by question id."""
    v = {"toy_math": [1, 0, 1, 1, 0, 0, 1, 0], "toy_code": [0, 1, 0, 0]}
    a = write_eval(tmp_path / "a", v)
    b = write_eval(tmp_path / "b", v, order=[0, 0, 1, 5])  # same verdicts, lines shuffled
    for p in compare_dirs(a, b).values():
        assert p.delta == 0 and p.a_only == p.b_only == 0


def test_item_sets_that_differ_are_refused(tmp_path):
    """Guards against silently comparing different items (zip truncation, positional pairing)."""
    a = write_eval(tmp_path / "a", {"toy_math": [1, 0, 1, 1]})
    b = write_eval(tmp_path / "b", {"toy_math": [1, 0, 1]})
    with pytest.raises(ValueError) as e:
        compare_dirs(a, b)
    msg = str(e.value)
    assert (
        "toy-math-test-000003" in msg and str(a / "samples.jsonl") in msg and str(b / "samples.jsonl") in msg
    )


def test_loader_means_samples_and_names_bad_rows(tmp_path):
    """Guards against p_d taken from one sample only, and a KeyError with no file or line."""
    f = write_eval(tmp_path / "a", {"toy_math": [[1, 0, 1, 1], [0, 0, 0, 1]]})
    assert load_item_scores(f) == {"toy_math": {"toy-math-test-000000": 0.75, "toy-math-test-000001": 0.25}}
    (tmp_path / "a" / "samples.jsonl").write_text('{"task": "toy_math", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"samples\.jsonl:1: row lacks \['verdict'\]"):
        load_item_scores(f)


def test_cli_prints_one_line_per_task(tmp_path, capsys):
    """Guards against the CLI losing the interval, the McNemar p or the discordant counts."""
    from branchmerge.report.__main__ import main

    a = write_eval(tmp_path / "a", {"toy_math": [1] * 10 + [0] * 10, "toy_code": [1, 0] * 10})
    b = write_eval(tmp_path / "b", {"toy_math": [1] * 2 + [0] * 18, "toy_code": [1, 0] * 10})
    main(["paired", str(a), str(b), "--tasks", "toy_math", "--resamples", "2000"])
    out = capsys.readouterr().out.splitlines()
    math_line = [line for line in out if line.startswith("toy_math:")]
    assert len(math_line) == 1 and not any(line.startswith("toy_code") for line in out)
    assert "Δ = +40.0 pts" in math_line[0] and " *" in math_line[0]
    assert f"McNemar p = {2 / 256:.3g}, A only right 8, B only right 0" in math_line[0]
    with pytest.raises(SystemExit):
        main(["paired", str(a), str(tmp_path / "nowhere")])
    assert "no samples.jsonl" in capsys.readouterr().err


# ---- the toy table's paired comparisons, on hand-written eval folders with the demo's labels ----

N = 40
BASE_V = [int(i % 4 == 0) for i in range(N)]  # 25 %
EXPERT_V = [int(i % 4 in (0, 1)) for i in range(N)]  # 50 %: gains 10 items over the base
HALF_V = [int(i % 4 == 0 or i % 8 == 1) for i in range(N)]  # gains 5 of the expert's 10


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory) -> dict[str, Path]:
    from branchmerge import demo

    root = tmp_path_factory.mktemp("eval")
    own = {label: task for task, label in demo.EXPERTS.items()}
    special = {  # label -> {task: verdicts}; everything else is the base's verdicts
        **{label: {task: EXPERT_V} for label, task in own.items()},
        demo.MIXTURE: {"toy_math": EXPERT_V},
        "math + science: TIES": {"toy_math": EXPERT_V},
        "math + science: model soup": {"toy_math": HALF_V},
    }
    labels = [demo.BASE, *demo.EXPERTS.values(), demo.MIXTURE, *demo.MERGES]
    return {
        label: write_eval(root / f"m{i}", {t: special.get(label, {}).get(t, BASE_V) for t in TASKS})
        / "results.json"
        for i, label in enumerate(labels)
    }


@pytest.fixture(scope="module")
def paired_table(demo_results, tmp_path_factory):
    from branchmerge import demo

    out = tmp_path_factory.mktemp("demo")
    md = demo.write_paired(demo_results, out)
    with (out / "paired.csv").open() as f:
        rows = list(csv.DictReader(f))
    return md, rows, out


def _row(rows, block_start, a, domain, b=None):
    hit = [
        r
        for r in rows
        if r["block"].startswith(block_start)
        and r["a"] == a
        and r["domain"] == domain
        and b in (None, r["b"])
    ]
    assert len(hit) == 1, (block_start, a, domain, b, len(hit))
    return hit[0]


def test_toy_paired_table_values(paired_table):
    """Guards against wrong comparison partners, signs, the mean, and retention in the demo's table.

    TIES − base on math: Δ = +25 pts, A alone right on 10 items, B on none, p = 2/2^10; mean Δ = 25/3;
    TIES keeps the whole math gain (ρ = 1), the soup half of it (ρ = 0.5); soup − TIES = −12.5 pts.
    """
    _, rows, out = paired_table
    ties = _row(rows, "merge − base", "math + science: TIES", "math")
    assert float(ties["value"]) == 25.0 and ties["excludes_zero"] == "True"
    assert (ties["a_only"], ties["b_only"], float(ties["mcnemar_p"])) == ("10", "0", 2 / 1024)
    assert float(_row(rows, "merge − base", "math + science: TIES", "mean")["value"]) == pytest.approx(
        25 / 3, abs=1e-3
    )
    same = _row(rows, "merge − base", "math + science: DARE-linear", "code")
    assert (float(same["value"]), float(same["ci_lo"]), float(same["ci_hi"]), same["excludes_zero"]) == (
        0,
        0,
        0,
        "False",
    )
    vs_expert = _row(rows, "merge − the domain's expert", "math + science: TIES", "code", b="code expert")
    assert float(vs_expert["value"]) == -25.0
    assert float(_row(rows, "merge − data mixture", "math + science: TIES", "math")["value"]) == 0.0
    ret = _row(rows, "gain retention", "math + science: TIES", "math")
    assert (float(ret["value"]), float(ret["ci_lo"]), float(ret["ci_hi"])) == (1.0, 1.0, 1.0)
    assert float(_row(rows, "gain retention", "math + science: model soup", "math")["value"]) == 0.5
    soup = _row(rows, "Figure 2: method − math + science: TIES", "math + science: model soup", "math")
    assert float(soup["value"]) == -12.5 and soup["b_only"] == "5"
    assert len(rows) == 8 * (4 + 3 + 4) + 3 + 2 * 4 * 3 + 8 * 3


def test_toy_paired_table_blocks(paired_table):
    """Guards against self-comparisons in Figure 2, experts scored off their domain, unmarked intervals."""
    md, rows, out = paired_table
    experts = [r for r in rows if r["block"].startswith("expert − ")]
    assert {(r["a"], r["domain"]) for r in experts} == {
        ("math expert", "math"),
        ("code expert", "code"),
        ("science expert", "science"),
    }
    fig2 = [r for r in rows if r["block"].startswith("Figure 2")]
    assert all(r["a"] != r["b"] and r["a"].startswith("math + science") for r in fig2)
    assert {r["b"] for r in fig2} == {"math + science: TIES", "math + science: Arcee Fusion"}
    ties_line = next(line for line in md.splitlines() if line.startswith("| math + science: TIES |"))
    assert ties_line.split(" | ")[1].startswith("**+25.0 [")
    assert (out / "paired.md").read_text() == md


def test_toy_paired_table_opens_with_the_papers_pattern_checked(paired_table):
    """Guards against the demo's verdict lines reading the wrong rows or signs: each expert gains 25
    points (10 of 40 items) on its own domain; the TinyR1-order row scores as the base, so it keeps 0%
    of every gain and its mean is 25/3 points below the best expert's; TIES and the soup differ on math."""
    md, _, _ = paired_table
    block = md.split("\n\n### merge − ")[0]
    assert block.startswith("### The paper's pattern on this run")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in block.splitlines() if line.startswith("| ")}
    for name in ("math", "code", "science"):
        gain = lines[f"{name} expert − base on {name} ≥ +5, interval above 0"]
        assert "**+25.0 [" in gain and gain.endswith("| yes |")
        keep = lines[f"(math & science) & code = TinyR1 order: retention on {name} ≥ 0.70"]
        assert "0.00 [" in keep and keep.endswith("| **no** |")
    mean = lines["(math & science) & code = TinyR1 order mean − best expert's mean (math expert) ≥ 0"]
    assert "-8.3 [" in mean and mean.endswith("| **no** |")
    assert "math + science: model soup vs math + science: TIES on math" in block


def test_toy_table_intervals_equal_the_cli_ones(paired_table, demo_results):
    """Guards against the table bootstrapping a comparison differently from `report paired` (task t: seed t)."""
    _, rows, _ = paired_table
    base = load_item_scores(demo_results["base (toy R1-Distill stand-in)"].parent)
    moved = []
    for t, (task, name) in enumerate(zip(TASKS, ["math", "code", "science"])):
        expert = load_item_scores(demo_results[f"{name} expert"].parent)
        ids = sorted(base[task])
        p = paired_diff([expert[task][q] for q in ids], [base[task][q] for q in ids], seed=t)
        r = _row(rows, "expert − base", f"{name} expert", name)
        assert (float(r["ci_lo"]), float(r["ci_hi"])) == (round(100 * p.lo, 3), round(100 * p.hi, 3))
        seed0 = paired_diff([expert[task][q] for q in ids], [base[task][q] for q in ids], seed=0)
        moved.append((p.lo, p.hi) != (seed0.lo, seed0.hi))
    assert any(moved)  # the seed moves some interval here, so the check is not vacuous


def test_demo_row_labels_line_up():
    """Guards against renaming a row in the demo's stage 4 without the paired table (a KeyError at the
    end of a 17-minute demo): every label the paired table asks for is a key of `models` or MERGES."""
    from branchmerge import demo

    tree = ast.parse(Path(demo.__file__).read_text())
    models = next(
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "models" for t in n.targets)
    )
    keys = {k.value for k in models.keys if isinstance(k, ast.Constant)} | set(demo.MERGES)
    keys |= {getattr(demo, k.id) for k in models.keys if isinstance(k, ast.Name)}  # e.g. BASE
    assert {demo.BASE, demo.MIXTURE, *demo.EXPERTS.values(), *demo.FIG2_REFS} <= keys
