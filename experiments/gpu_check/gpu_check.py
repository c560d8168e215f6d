"""The one GPU check of the real recipe's training path, and its CPU rehearsal.

    torchrun --nproc_per_node $N experiments/gpu_check/gpu_check.py --out experiments/gpu_check/results
    torchrun --nproc_per_node 2 experiments/gpu_check/gpu_check.py --tiny --out /tmp/x   # CPU, gloo
    python experiments/gpu_check/gpu_check.py --vllm-smoke --out experiments/gpu_check/results

Training check: a Qwen2 of ~1.4 B parameters built from config (random weights), FSDP2 (`fully_shard` per
decoder layer + root; bf16 compute, fp32 master weights and gradient reduction) on every rank, packed rows
of 16,384 tokens holding several documents (position_ids restart per document), varlen flash-attention
when flash_attn imports (transformers' flash_attention_2), sdpa otherwise, gradient checkpointing per
layer, the cross-entropy in chunks, 3 micro-batches of accumulation per optimizer step, AdamW. Measures
tokens/s, MFU (branchmerge.train.flops), peak memory per rank against the plan
(branchmerge.train.memory_model), and the card. --tiny runs the same code on CPU with gloo and a pico
model. --vllm-smoke generates a few tokens with vLLM from a small random Qwen2 whose tokenizer carries
an R1-style chat template (the prompt ends with `<｜Assistant｜><think>\\n`).
Writes gpu_check.json / gpu_check.md (vllm_smoke.json) under --out and under $OUT when set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from branchmerge.models import attention_implementation  # noqa: E402
from branchmerge.train.flops import model_flops_utilization, peak_bf16_flops, shape_from_config, train_flops  # noqa: E402
from branchmerge.train.memory_model import MemoryInputs, memory  # noqa: E402

FULL = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 20, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": False}  # fmt: skip
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False}  # fmt: skip
FULL_DOCS = [4096, 1024, 6144, 2048, 3072]  # one 16,384-token packed row
TINY_DOCS = [96, 32, 64, 64]  # one 256-token row
R1_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Σ -log p(label) over label positions, logits of `chunk` tokens at a time, recomputed in backward."""
    try:
        from branchmerge.lm_loss import chunked_token_loss_sum
    except ImportError:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)

        def part(hh, w, yy):
            return F.cross_entropy(F.linear(hh, w).float(), yy, ignore_index=-100, reduction="sum")

        return sum(
            checkpoint(part, h[s : s + chunk], weight, y[s : s + chunk], use_reentrant=False)
            for s in range(0, h.shape[0], chunk)
        )
    return chunked_token_loss_sum(hidden, weight, labels, chunk)


class LossModel(torch.nn.Module):
    """The causal LM and its loss in one forward, so FSDP2's root gathers the LM head for the loss."""

    def __init__(self, lm: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, position_ids, labels):
        hidden = self.lm.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return chunked_loss(hidden, self.lm.lm_head.weight, labels, self.chunk)


def packed_row(docs: list[int], vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """input_ids, position_ids (restarting per document), labels (-100 on each document's first token)."""
    ids = torch.randint(0, vocab, (1, sum(docs)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def build(args, device: torch.device, world: int):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(TINY if args.tiny else FULL), max_position_embeddings=32768)
    config._attn_implementation = attention_implementation("auto", device)
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    model = LossModel(lm, args.chunk)
    kw = {"reshard_after_forward": True}
    if device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in lm.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model, config


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def train(args) -> dict:
    dist.init_process_group("gloo" if args.tiny else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.tiny else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, config = build(args, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01, foreach=True)
    docs = TINY_DOCS if args.tiny else FULL_DOCS
    gen = torch.Generator().manual_seed(rank)
    times, losses = [], []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for _micro in range(args.accumulation):  # gradients reduce-scattered every micro-batch
            batch = {k: v.to(device) for k, v in packed_row(docs, config.vocab_size, gen).items()}
            n_labels = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**batch) / (n_labels * args.accumulation)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        dist.all_reduce(total)
        losses.append(total.item() / world)
    result = _measure(args, model, opt, config, device, world, docs, times, losses)
    dist.destroy_process_group()
    return result if rank == 0 else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(args, model, opt, config, device, world, docs, times, losses) -> dict:
    shape = shape_from_config(config)
    step_s = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first step
    tokens = sum(docs) * args.accumulation * world
    flops = train_flops(shape, docs * args.accumulation * world)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name) if device.type == "cuda" else None
    planned = memory(
        MemoryInputs(
            shape=shape,
            shards=world,
            fsdp=True,
            tokens=sum(docs),
            compute_bytes=2 if device.type == "cuda" else 4,
            loss_chunk_tokens=args.chunk,
        )  # fmt: skip
    )
    stats = torch.tensor(
        [
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
            torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0,
            local_bytes(model.parameters()),
            local_bytes(t for s in opt.state.values() for k, t in s.items() if k != "step"),
        ],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return {
        "mode": "tiny (CPU, gloo)" if args.tiny else "full",
        "device": name,
        "world_size": world,
        "torch": torch.__version__,
        "attention": config._attn_implementation,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "params": shape.n_params(),
        "docs_per_row": docs,
        "tokens_per_micro_batch": sum(docs),
        "accumulation": args.accumulation,
        "loss_chunk_tokens": args.chunk,
        "steps": args.steps,
        "losses": losses,
        "step_seconds": step_s,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tokens / step_s / world,
        "model_flops_per_step": flops,
        "peak_bf16_flops": peak,
        "mfu": model_flops_utilization(flops, step_s, peak, world),
        "max_memory_allocated_gib": stats[0].item() / 2**30,
        "max_memory_reserved_gib": stats[1].item() / 2**30,
        "planned_peak_allocated_gib": planned.peak_allocated / 2**30,
        "param_bytes_per_rank": int(stats[2].item()),
        "adamw_state_bytes_per_rank": int(stats[3].item()),
        "planned_param_bytes_per_rank": int(
            next(v for k, v in planned.components.items() if k.startswith("params"))
        ),
        "planned_adamw_bytes_per_rank": int(
            next(v for k, v in planned.components.items() if k.startswith("AdamW"))
        ),
    }


def vllm_smoke() -> dict:
    """Generate a few tokens with vLLM (if it imports) from a small random Qwen2 and an R1-style template."""
    if importlib.util.find_spec("vllm") is None:
        return {"vllm": "not installed: smoke skipped"}
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from branchmerge.toy.tokenizer import padded_vocab_size, train_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="gpu_check_vllm_"))
    try:
        tok = train_tokenizer(["Solve 12 + 30. <think> 12 + 30 = 42 </think> The answer is 42."] * 50, 512)
        tok.chat_template = R1_TEMPLATE
        tok.bos_token, tok.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
        tok.save_pretrained(folder)
        config = Qwen2Config(
            vocab_size=padded_vocab_size(len(tok)), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=str(folder),
            dtype="bfloat16",
            gpu_memory_utilization=0.3,
            max_model_len=1024,
            enforce_eager=True,
        )
        messages = [{"role": "user", "content": "What is 12 + 30?"}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        t0 = time.perf_counter()
        out = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0.6, top_p=0.95, seed=0))
        import vllm

        return {
            "vllm": vllm.__version__,
            "prompt_ends_inside_think": prompt.endswith("<｜Assistant｜><think>\n"),
            "generated_tokens": len(out[0].outputs[0].token_ids),
            "seconds": time.perf_counter() - t0,
        }
    except Exception as e:  # recorded, not fatal: the training check's results still count
        return {"vllm": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def markdown(r: dict) -> str:
    keys = [k for k in r if not isinstance(r[k], (list, dict))]
    rows = [f"| {k} | {r[k]:.4g} |" if isinstance(r[k], float) else f"| {k} | {r[k]} |" for k in keys]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def write(result: dict, out: Path, stem: str) -> None:
    for folder in [out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (folder / f"{stem}.md").write_text(markdown(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: gloo, pico model, 256-token rows")
    p.add_argument("--vllm-smoke", action="store_true", help="only the vLLM generation smoke")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 5; tiny 2)")
    p.add_argument("--accumulation", type=int, default=3)
    p.add_argument("--chunk", type=int, default=None, help="loss chunk tokens (default 4096; tiny 64)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "gpu_check" / "results")
    args = p.parse_args()
    if args.vllm_smoke:
        result = vllm_smoke()
        print(json.dumps(result, indent=2))
        write(result, args.out, "vllm_smoke")
        return
    args.steps = args.steps or (2 if args.tiny else 5)
    args.chunk = args.chunk or (64 if args.tiny else 4096)
    result = train(args)
    if result:
        assert all(math.isfinite(x) for x in result["losses"]), result["losses"]
        print(markdown(result))
        write(result, args.out, "gpu_check")


if __name__ == "__main__":
    main()
