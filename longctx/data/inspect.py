"""See what the model will be trained on before spending GPU hours.

    python -m longctx.data.inspect [data.]path=data/sharegpt_sample.json sample=3 seq_len=2048
    python -m longctx.data.inspect data=sharegpt_v3 loss_mask=last     # a configs/data option
    python -m longctx.data.inspect seq_len=65536 long_examples.ratio=0.5 long_examples.min_tokens=16384

Prints one formatted conversation with the tokens that count for the loss marked (green, or
between >>> and <<< when the output is not a terminal), its first tokens one by one with their
labels, the data report (kept/skipped, token statistics) and how the data packs at seq_len; with
data.long_examples, what the rows of the first epoch are (counts per task, lengths, answer depths,
the answers' share of the loss) and one example's closing questions.
Arguments: data=<configs/data option>, any DataConfig field as key=value, plus sample
(conversation index), seq_len, seed (train.seed), tokens (how many tokens to list) and color
(auto, always, never). A mistake (a missing file, an unknown argument, a sample out of range) is one
line and exit 1.
"""
from __future__ import annotations

import sys

import numpy as np

from longctx.cli import exit_with_line, one_line_errors, show_help_and_exit

from .config import config_from_args
from .loader import PackedLoader, loader_of
from .cache import format_report, prepare
from .sharegpt import DataError, resolve_path

EXTRAS = {"sample": 0, "seq_len": 2048, "seed": 0, "tokens": 40, "color": "auto"}
LONG_STATS_LIMIT = 400   # long examples made for the statistics (each takes milliseconds)


def marked_text(tokenizer, ids: np.ndarray, mask: np.ndarray, color: bool) -> str:
    """The decoded tokens, with each run of loss tokens marked."""
    start_mark, end_mark = ("\033[42;30m", "\033[0m") if color else (">>>", "<<<")
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    parts = []
    for run in np.split(np.arange(len(ids)), edges):
        if len(run) == 0:
            continue
        text = tokenizer.decode(ids[run].tolist(), clean_up_tokenization_spaces=False)
        parts.append(f"{start_mark}{text}{end_mark}" if mask[run[0]] else text)
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    show_help_and_exit(__doc__, argv)
    try:
        with one_line_errors(DataError, ValueError, OSError):
            inspect(argv)
    except SystemExit as stop:   # the argument parser's refusals, as every entry point words them
        if isinstance(stop.code, str):
            exit_with_line(stop.code)
        raise


def inspect(argv: list[str]) -> None:
    cfg, extra = config_from_args(argv, EXTRAS)
    from transformers import AutoTokenizer

    prepared = prepare(cfg)
    store = prepared.store
    index = extra["sample"]
    if not 0 <= index < len(store):
        raise SystemExit(f"sample={index} is out of range: the data has {len(store)} conversations")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(cfg.tokenizer_path, "data.tokenizer")))
    begin, end = store.offsets[index], store.offsets[index + 1]
    ids, mask = np.asarray(store.tokens[begin:end]), np.asarray(store.loss_mask[begin:end])
    color = extra["color"] == "always" or (extra["color"] == "auto" and sys.stdout.isatty())

    print(f"=== conversation {index}: {len(ids)} tokens, {int(mask.sum())} count for the loss "
          f"({cfg.loss_mask} mask, {prepared.report.get('chat_template')} template) ===")
    print(marked_text(tokenizer, ids, mask, color))
    count = min(extra["tokens"], len(ids))
    print(f"\n=== first {count} tokens: position, id, token, label ===")
    for position in range(count):
        label = int(ids[position]) if mask[position] else -100
        token = tokenizer.convert_ids_to_tokens(int(ids[position]))
        print(f"{position:6d} {int(ids[position]):7d} {token!r:32} {label}")

    loader = loader_of(prepared, cfg, extra["seq_len"], seed=extra["seed"])
    print("\n=== data ===")
    print(format_report(loader.report))
    print(rows_report(loader))
    if loader.long_count:
        print(long_examples_report(loader, tokenizer))
    batch = next(loader)
    cu = batch["cu_seqlens"].tolist()
    print(f"\nfirst packed sequence: {len(cu) - 1} attention spans ({cfg.attention_span}), lengths "
          f"{np.diff(cu).tolist()}, {int((batch['labels'] != -100).sum())} loss tokens")
    print(f"cache: {prepared.path}")


def rows_report(loader: PackedLoader) -> str:
    """What the rows of the first epoch are made of, in one line."""
    rows = loader._sequences(0)
    long_rows = int((loader._plan_long >= 0).sum())
    spans = ("one attention span per row (documents see each other, each ending in its separator)"
             if loader.attention_span == "row" else "one attention span per document")
    return (f"rows (epoch 0): {len(rows)} of {loader.seq_len} tokens: {long_rows} open with a long example "
            f"({100 * long_rows / max(len(rows), 1):.1f}%), {len(rows) - long_rows} ordinary; {spans}"
            + (f"; {loader._left_out} pieces beyond the long rows' room left out this epoch" if loader._left_out else ""))


def long_examples_report(loader: PackedLoader, tokenizer) -> str:
    """Counts per task, lengths, answer depths and the answers' share of the loss, over the long
    examples of epoch 0 (the first LONG_STATS_LIMIT), and one example's closing questions."""
    maker, lengths = loader.long_examples, loader._long_lengths
    examples = [maker.make(0, i, int(lengths[i])) for i in range(min(len(lengths), LONG_STATS_LIMIT))]
    tasks: dict = {}
    for example in examples:
        tasks[example.task] = tasks.get(example.task, 0) + 1
    depths = np.array([a["depth"] for e in examples for a in e.answers])
    histogram = np.histogram(depths, bins=10, range=(0.0, 1.0))[0]
    answer_tokens = sum(int(e.loss_mask.sum()) for e in examples) * len(lengths) / max(len(examples), 1)
    # the loss tokens of the ordinary pieces placed in epoch 0's rows (about: a piece's first
    # token opens a span and is not trained, a split piece's copied prefix never is)
    placed = np.concatenate(loader._sequences(0))
    mask = np.concatenate([[0], np.cumsum(loader.store.loss_mask, dtype=np.int64)])
    base = loader.store.offsets[loader.pieces.doc[placed]]
    ordinary = int((mask[base + loader.pieces.end[placed]] - mask[base + loader.pieces.start[placed]]).sum())
    p50 = int(np.median(lengths))
    low, high = maker.cfg.length_range(loader.seq_len)
    lines = [f"long examples (epoch 0, {len(examples)} of {len(lengths)} made for these figures): "
             f"{', '.join(f'{k} {v}' for k, v in sorted(tasks.items()))}; lengths {maker.cfg.distribution} in "
             f"[{low}, {high}]: min {int(lengths.min())} p50 {p50} max {int(lengths.max())}",
             f"  answers: {len(depths)} ({len(depths) / max(len(examples), 1):.1f} an example), depth in the "
             f"context by tenths: {histogram.tolist()} (min {depths.min():.2f}, max {depths.max():.2f})",
             f"  loss tokens: answers ~{answer_tokens:.0f} of ~{answer_tokens + ordinary:.0f} an epoch "
             f"({100 * answer_tokens / max(answer_tokens + ordinary, 1):.2f}%; the rest the conversations' replies)"]
    example = examples[0]
    lines.append(f"  example 0 ({example.task}, {len(example.tokens)} tokens, context {example.context_tokens}):")
    for answer in example.answers:
        lines.append(f"    at depth {answer['depth']:.2f}: {answer['question']!r} -> {answer['answer']!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
