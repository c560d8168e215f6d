"""lm-eval's HF model with greedy `generate_until` on the slot decoder (branchmerge/eval/slots.py).

    lm = SlotHFLM(pretrained="branchmerge/toy/assets/toy_base", batch_size=64, dtype="float32")
    lm_eval --model hf-slots --model_args pretrained=<folder>,batch_size=64 ...   # registered name

Everything but greedy generation is HFLM's own (tokenisation, chat template, log-likelihoods). A
greedy request group is encoded row by row exactly as HFLM encodes it (left truncation to
max_length - max_gen_toks included), decoded with `batch_size` rows in flight, and turned into text
by HFLM's post-processing (special tokens skipped, cut at the first `until` string, think-end
handling). Requests that sample (`do_sample` / temperature > 0), carry other generation settings,
or target a model the slot decoder does not support go to HFLM's `generate_until` (HF `generate`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from branchmerge.eval.slots import greedy_decode, unsupported

log = logging.getLogger(__name__)
GREEDY_KEYS = {"do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks"}


@register_model("hf-slots")
class SlotHFLM(HFLM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot_problems = unsupported(self.model) if self.backend == "causal" else ["seq2seq backend"]
        if self.slot_problems:
            log.warning("greedy requests go to HF generate: %s", "; ".join(self.slot_problems))

    @property
    def slots(self) -> int:
        return self.batch_size if isinstance(self.batch_size, int) else 64

    def is_greedy(self, gen_kwargs: dict) -> bool:
        """True when HF `generate` would decode these settings greedily with no other processor."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        return not self.slot_problems and kw["do_sample"] is False and set(kw) <= GREEDY_KEYS

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        outs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        other: list[int] = []
        for i, req in enumerate(requests):
            if self.is_greedy(req.args[1]):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True), []).append(i)
            else:
                other.append(i)
        if other:
            for i, o in zip(other, super().generate_until([requests[i] for i in other], disable_tqdm)):
                outs[i] = o
        pbar = tqdm(total=sum(map(len, groups.values())), disable=disable_tqdm or self.rank != 0,
                    desc="Running generate_until requests (slots)")  # fmt: skip
        for idx in groups.values():
            texts = self._greedy_group([requests[i].args[0] for i in idx], requests[idx[0]].args[1], pbar)
            for i, t in zip(idx, texts):
                outs[i] = t
        pbar.close()
        return outs  # type: ignore[return-value]

    def _greedy_group(self, contexts: list[str], gen_kwargs: dict, pbar) -> list[str]:
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        max_gen = kw.pop("max_gen_toks")
        max_ctx = self.max_length - max_gen
        if max_ctx <= 0:
            raise ValueError(
                f"max_gen_toks={max_gen} leaves no room for the prompt in max_length={self.max_length}"
            )
        prompts = [
            self.tok_batch_encode([c], left_truncate_len=max_ctx, truncation=self.truncation)[0][0].tolist()
            for c in contexts
        ]
        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        texts: list[str] = [""] * len(contexts)

        def done(i: int, toks: list[int]) -> None:
            texts[i] = self._text(toks, until)
            self.cache_hook.add_partial("generate_until", (contexts[i], gen_kwargs), texts[i])
            pbar.update(1)

        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            greedy_decode(self.model, prompts, max_gen, eos_ids, self.slots, self._stopper(until, eos), done)
        return texts

    def _stopper(self, until: list[str], eos: str) -> Callable[[list[int]], bool] | None:
        """A row may stop once its text holds a stop string at p and len(text) >= p + longest + 1:
        the cut at the first stop string (HFLM's post-processing) can no longer change."""
        terms = [t for t in until if t and t != eos]
        if not terms:
            return None
        longest = max(map(len, terms))

        def finished(toks: list[int]) -> bool:
            text = self.tok_decode(toks)
            hits = [p for p in (text.find(t) for t in terms) if p >= 0]
            return bool(hits) and len(text) >= min(hits) + longest + 1

        return finished

    def _text(self, toks: list[int], until: list[str]) -> str:
        """HFLM's text of a continuation: think-end handling, special tokens skipped, stop-string cut."""
        if isinstance(self.think_end_token, int):
            ends = [i for i, t in enumerate(toks) if t == self.think_end_token]
            if ends:
                toks = toks[ends[-1] + 1 :]
        s = self.tok_decode(toks)
        if isinstance(self.think_end_token, int):
            s = s.lstrip()
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        return postprocess_generated_text(generation=s, stop=until, think_end_token=think)
