"""Training throughput on CPU: our packed path vs a padded baseline vs TRL's SFTTrainer, side by side.

    make bench-train        # = pip install '.[bench]' + python experiments/perf/train_throughput.py

Same model (the toy Qwen2 config, same seeded initial weights), same data (the first N records of the
toy mixture), same optimizer steps, same threads; each run in its own process, one after another.
Reported: real (non-padding) tokens per second, median over steps after the first, and ratios to ours.
Writes experiments/perf/results/train_throughput.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "perf" / "results"


def ours(out: Path, packing: bool, args) -> dict:
    run = f"bench_{'packed' if packing else 'padded'}"
    micro = args.rows if packing else args.docs
    cmd = [
        sys.executable,
        "train.py",
        f"paths.output_dir={out}",
        f"paths.toy_dir={args.toy_dir}",
        "model=toy",
        "data=toy_mixture",
        f"data.max_records={args.records}",
        f"data.packing={str(packing).lower()}",
        f"data.max_length={args.max_length}",
        f"trainer.max_steps={args.steps}",
        f"trainer.global_batch_size={micro}",
        f"trainer.micro_batch_size={micro}",
        f"trainer.threads={args.threads}",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "trainer.checkpoint_every_n_steps=0",
        "export=false",
        "resume=never",
        f"run_name={run}",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    import csv

    rows = list(csv.DictReader((out / "train" / run / "logs" / "metrics.csv").read_text().splitlines()))
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    stats = json.loads((out / "train" / run / "data_stats.json").read_text())
    return {
        "tokens_per_s": statistics.median(tps),
        "steps": len(rows),
        "padding_share": 1 - stats["packing_efficiency"] if packing else None,
    }


TRL_SCRIPT = r"""
import json, sys, time, statistics, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
from branchmerge.data.records import read_records
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
tok = AutoTokenizer.from_pretrained(a["init"])
recs = []
for d in ("math", "code", "science"):
    recs += list(read_records(f"{a['toy_dir']}/data/{d}/train.jsonl"))[: a["records"]]
ds = Dataset.from_list([{"prompt": r.messages[:-1], "completion": r.messages[-1:]} for r in recs])
model = AutoModelForCausalLM.from_pretrained(a["init"])
times = []
class T(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter())
cfg = SFTConfig(output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["batch"], learning_rate=1e-4,
                logging_steps=1, save_strategy="no", report_to=[], packing=a["packing"], max_length=a["max_length"],
                gradient_checkpointing=a["gc"], dataloader_num_workers=0, use_cpu=True, seed=0, bf16=False, fp16=False)
tr = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[T()])
tr.train()
toks = [h["num_tokens"] for h in tr.state.log_history if "num_tokens" in h]
per_step = [(toks[i] - toks[i - 1]) / (times[i] - times[i - 1]) for i in range(1, len(times))]
print(json.dumps({"tokens_per_s": statistics.median(per_step), "steps": len(times)}))
"""


def trl(out: Path, init: Path, packing: bool, gc: bool, args) -> dict | None:
    try:
        import trl as _  # noqa: F401
    except ImportError:
        return None
    a = {
        "threads": args.threads,
        "init": str(init),
        "toy_dir": str(args.toy_dir),
        "records": args.records,
        "out": str(out / f"trl_{packing}_{gc}"),
        "steps": args.steps,
        "packing": packing,
        "batch": 1 if packing else args.docs,
        "max_length": args.max_length * args.rows if packing else args.max_length,
        "gc": gc,
    }
    proc = subprocess.run(
        [sys.executable, "-c", TRL_SCRIPT, json.dumps(a)], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def init_model(out: Path, toy_dir: Path) -> Path:
    """The toy model's seeded initial weights, saved once so TRL starts from the same point."""
    from omegaconf import OmegaConf

    from branchmerge.models import build_model, load_tokenizer

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "toy.yaml")
    cfg.tokenizer = str(toy_dir / "tokenizer")
    tok = load_tokenizer(cfg)
    tok.chat_template = tok.chat_template  # ChatML
    model = build_model(cfg, tok)
    path = out / "init"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy-dir", type=Path, default=ROOT / "outputs" / "toy_world")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "perf" / "train")
    ap.add_argument("--records", type=int, default=400, help="records per domain")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per step")
    ap.add_argument("--docs", type=int, default=12, help="documents per padded step (~ the same tokens)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    args.out.mkdir(parents=True, exist_ok=True)
    init = init_model(args.out, args.toy_dir)
    t0 = time.time()
    res = {
        "ours_packed": ours(args.out, True, args),
        "ours_padded": ours(args.out, False, args),
        "trl_padded": trl(args.out, init, False, False, args),
        "trl_padded_gc_default": trl(args.out, init, False, True, args),
        "trl_packed": trl(args.out, init, True, False, args),
    }
    base = res["ours_packed"]["tokens_per_s"]
    print(f"{'run':<24}{'real tokens/s':>15}{'ours packed / run':>20}")
    for name, r in res.items():
        if r is None:
            print(f"{name:<24}{'(trl not installed)':>15}")
            continue
        print(f"{name:<24}{r['tokens_per_s']:>15.0f}{base / r['tokens_per_s']:>19.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "results": res,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "wall_s": round(time.time() - t0, 1),
    }
    (RESULTS / "train_throughput.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
