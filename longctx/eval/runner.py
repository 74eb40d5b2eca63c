"""Run the retrieval tasks on a model: prompts -> greedy answers -> scored results.

Prompts are wrapped for the model: "plain" (the begin-of-text token, then the text: a base model
continues "Answer: <"), "llama3" (one user turn in the built-in Llama-3 format, then the assistant
header), or "chat" (one user turn through the tokenizer's own chat template, e.g. ChatML); "auto"
picks "chat" when the tokenizer has a chat template, else "plain". In the chat forms the sample's
cue ("Answer: <", " The pass key is") starts the assistant's reply, so that a chat model answers
with the number, as a base model does, instead of a sentence around it.
Every rank of a sequence-parallel group runs the same samples and gets the same results.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from longctx.data.template import render_llama3
from longctx.model.llama import Llama

from .decode import greedy_generate, greedy_generate_packed, sequence_dims
from .scoring import score_answer
from .tasks import Haystack, Sample, fit_line_retrieval, fit_passkey, make_needle

PROMPT_FORMATS = ("auto", "plain", "llama3", "chat")


def resolve_prompt_format(tokenizer, prompt_format: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {prompt_format!r}; expected one of {PROMPT_FORMATS}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format=chat needs a tokenizer with a chat_template; this one has none "
                         "(use plain, or llama3 for a Llama-3 chat model)")
    return prompt_format


def encode_prompt(tokenizer, text: str, prompt_format: str = "plain", cue: str = "") -> list[int]:
    """Token ids of the prompt as the model reads it; `cue`, the end of `text` that starts the
    answer, becomes the start of the assistant's reply in the chat formats."""
    prompt_format = resolve_prompt_format(tokenizer, prompt_format)
    if prompt_format == "plain":
        ids = tokenizer.encode(text, add_special_tokens=False)
        bos = getattr(tokenizer, "bos_token_id", None)
        return ([bos] if bos is not None else []) + ids
    user = text[:len(text) - len(cue)].rstrip() if cue and text.endswith(cue) else text
    reply = cue.lstrip() if cue and text.endswith(cue) else ""
    if prompt_format == "llama3":
        chat = render_llama3([{"role": "user", "content": user}]).text
        chat += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    else:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(chat + reply, add_special_tokens=False)


def answer_samples(model: Llama, tokenizer, samples: list[Sample], max_new_tokens: int = 12,
                   prompt_format: str = "plain", eos_token_id=None, log=None, batch_tokens: int = 0,
                   encoded: list[list[int]] | None = None) -> list[dict]:
    """Greedy answers to `samples`, scored: one result dict per sample.

    `batch_tokens` > 0 packs prompts up to that many tokens into one prefill (one process only;
    the answers are those of prompt-by-prompt decoding: each prompt is its own document).
    `encoded`: the prompts' token ids if already made (`build_prompts`)."""
    device = next(model.parameters()).device
    if encoded is None:
        encoded = [encode_prompt(tokenizer, s.prompt, prompt_format, s.cue) for s in samples]
    ends = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if batch_tokens > 0 and sequence_dims(model) is None:
        start = time.perf_counter()
        generated_ids = greedy_generate_packed(model, encoded, max_new_tokens, ends, batch_tokens)
        seconds = [(time.perf_counter() - start) / max(len(samples), 1)] * len(samples)   # the pack's mean
    else:
        generated_ids, seconds = [], []
        for ids in encoded:
            start = time.perf_counter()
            generated_ids.append(greedy_generate(model, torch.tensor([ids], device=device), max_new_tokens,
                                                 eos_token_id=eos_token_id)[0].tolist())
            seconds.append(time.perf_counter() - start)
    results = []
    for sample, ids, new, took in zip(samples, encoded, generated_ids, seconds):
        cut = next((i for i, t in enumerate(new) if t in ends), len(new))      # up to the first end token
        generated = tokenizer.decode(new[:cut])
        result = {"task": sample.task, "length": sample.meta.get("length", len(ids)), "tokens": len(ids),
                  "depth": round(sample.depth, 4), "answer": sample.answer, "generated": generated,
                  "correct": score_answer(generated, sample.answer), "seconds": took}
        result.update({k: v for k, v in sample.meta.items() if k in ("asked_depth", "line", "num_lines",
                                                                       "haystack_repeated", "seed", "fillers")})
        results.append(result)
        if log:
            log(f"{sample.task} length {result['length']} depth {result['depth']:.2f}: "
                f"{'ok ' if result['correct'] else 'NO '} answer {sample.answer} generated {generated!r}")
    return results


def line_retrieval_samples(tokenizer, lengths: list[int], depths: list[float], samples_per_cell: int,
                           seed: int = 0, **kwargs) -> list[Sample]:
    """A line-retrieval sample for every (length, depth, repeat), lengths in prompt tokens."""
    samples = []
    for length in lengths:
        hint = None
        for depth in depths:
            for repeat in range(samples_per_cell):
                samples.append(fit_line_retrieval(tokenizer, length, depth, seed * 100003 + repeat,
                                                  lines_hint=hint, **kwargs))
                hint = samples[-1].meta["num_lines"]
    return samples


def needle_samples(haystack: Haystack, lengths: list[int], depths: list[float], samples_per_cell: int,
                   seed: int = 0, **kwargs) -> list[Sample]:
    """A needle sample for every (length, depth, repeat); the `depth` of a result is where the
    needle landed (the start of a sentence), `asked_depth` the grid's value."""
    return [make_needle(haystack, length, depth, seed * 100003 + repeat, **kwargs)
            for length in lengths for depth in depths for repeat in range(samples_per_cell)]


def passkey_samples(tokenizer, lengths: list[int], depths: list[float], samples_per_cell: int,
                    seed: int = 0) -> list[Sample]:
    """A passkey sample for every (length, depth, repeat): a different key each repeat."""
    return [fit_passkey(tokenizer, length, depth, seed * 100003 + repeat)
            for length in lengths for depth in depths for repeat in range(samples_per_cell)]


# ------------------------------------------------------------------------------------------------
# prompts made by several processes: at 64K tokens a sample costs ~1 s of tokenizing (fitting the
# length tries several whole prompts), minutes for a grid of hundreds, while the GPU waits
# ------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _start_worker(tokenizer, haystack, prompt_format):
    _WORKER.update(tokenizer=tokenizer, haystack=haystack, prompt_format=prompt_format)


def _make_prompt(job) -> tuple[Sample, list[int]]:
    task, length, depth, seed, random_start = job
    tokenizer = _WORKER["tokenizer"]
    if task == "line_retrieval":
        sample = fit_line_retrieval(tokenizer, length, depth, seed)
    elif task == "passkey":
        sample = fit_passkey(tokenizer, length, depth, seed)
    elif task == "needle":
        sample = make_needle(_WORKER["haystack"], length, depth, seed, random_start=random_start)
    else:
        raise ValueError(f"unknown retrieval task {task!r}")
    return sample, encode_prompt(tokenizer, sample.prompt, _WORKER["prompt_format"], sample.cue)


def prompt_workers(lengths: list[int], workers: int = -1) -> int:
    """-1 (auto): a process per core but one, up to 16, when the longest prompt is long enough to pay
    for starting them (16K tokens); else as given (1: in this process)."""
    if workers >= 1:
        return workers
    return min(16, max(1, (os.cpu_count() or 1) - 1)) if max(lengths) >= 16384 else 1


def build_prompts(task: str, tokenizer, lengths: list[int], depths: list[float], samples_per_cell: int,
                  seed: int = 0, prompt_format: str = "plain", haystack: Haystack | None = None,
                  random_start: bool = False, workers: int = -1) -> tuple[list[Sample], list[list[int]]]:
    """The samples of `task` ("needle", "passkey", "line_retrieval") for every (length, depth,
    repeat), and their prompts' token ids as the model reads them; made by `workers` processes
    (`prompt_workers`); the same samples whatever the number of processes."""
    jobs = [(task, length, depth, seed * 100003 + repeat, random_start)
            for length in lengths for depth in depths for repeat in range(samples_per_cell)]
    workers = min(prompt_workers(lengths, workers), len(jobs))
    state = (tokenizer, haystack, prompt_format)
    if workers <= 1:
        _start_worker(*state)
        made = [_make_prompt(job) for job in jobs]
    else:
        # spawn, not fork: the parent may hold CUDA, which a forked child must not touch
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=state) as pool:
            made = list(pool.map(_make_prompt, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    return [sample for sample, _ in made], [ids for _, ids in made]
