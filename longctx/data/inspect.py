"""See what the model will be trained on before spending GPU hours.

    python -m longctx.data.inspect [data.]path=data/sharegpt_sample.json sample=3 seq_len=2048
    python -m longctx.data.inspect data=sharegpt_v3 loss_mask=last     # a configs/data option

Prints one formatted conversation with the tokens that count for the loss marked (green, or
between >>> and <<< when the output is not a terminal), its first tokens one by one with their
labels, the data report (kept/skipped, token statistics) and how the data packs at seq_len.
Arguments: data=<configs/data option>, any DataConfig field as key=value, plus sample
(conversation index), seq_len, tokens (how many tokens to list) and color (auto, always, never).
A mistake (a missing file, an unknown argument, a sample out of range) is one line and exit 1.
"""
from __future__ import annotations

import sys

import numpy as np

from longctx.cli import exit_with_line, one_line_errors, show_help_and_exit

from .config import config_from_args
from .loader import PackedLoader
from .cache import format_report, prepare
from .sharegpt import DataError, resolve_path

EXTRAS = {"sample": 0, "seq_len": 2048, "tokens": 40, "color": "auto"}


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
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(cfg.tokenizer, "data.tokenizer")))
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

    loader = PackedLoader(store, extra["seq_len"], packing=cfg.packing, overlong=cfg.overlong,
                          pad_id=prepared.pad_id, key=prepared.key, report=prepared.report)
    print("\n=== data ===")
    print(format_report(loader.report))
    batch = next(loader)
    cu = batch["cu_seqlens"].tolist()
    print(f"\nfirst packed sequence: {len(cu) - 1} documents, lengths {np.diff(cu).tolist()}, "
          f"{int((batch['labels'] != -100).sum())} loss tokens")
    print(f"cache: {prepared.path}")


if __name__ == "__main__":
    main()
