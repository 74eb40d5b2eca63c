"""Preparing a data set once: read and clean, tokenize with `datasets.map`, cache, report.

The cache folder is named after the data (paths, sizes, modification times), the tokenizer
(a hash of its files) and the settings that change tokens or masks, so a second run with the same
inputs loads it in well under a second (memory-mapped arrays, no tokenizer, no `datasets`).

    <cache_dir>/<data name>-<key>/
      dataset/            the tokenized `datasets` cache (arrow), as `datasets.map` wrote it
      tokens.npy ...      the same tokens as flat arrays, memory-mapped by every rank
      report.json         kept/skipped counts, repairs, token statistics
      meta.json           pad id, the resolved chat template, the key
      done                written last: the cache is complete

In a distributed run one process per node (LOCAL_RANK 0) builds the cache while the others poll
the file system for `done`: no collective runs during preparation, so a slow preparation cannot
trip a NCCL/gloo timeout. The build goes to a temporary folder renamed into place, so concurrent
builders (several nodes on a shared file system) never see half a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .packing import TokenStore
from .sharegpt import DataError, read_sharegpt, resolve_path

PIPELINE_VERSION = 2  # bump when tokens or masks of the same inputs would change (2: first_user.json)
_ARRAYS = ("tokens", "loss_mask", "offsets", "exchange_starts", "exchange_offsets")
_SMALL_DATA = 2000  # conversations below which one process tokenizes faster than a pool starts
# A failure marker older than this process (less a launch skew) is a previous run's: ignore it.
_PROCESS_START = time.time()
_LAUNCH_SKEW_S = 60.0


@dataclass
class Prepared:
    store: TokenStore
    report: dict
    pad_id: int
    key: str
    path: Path
    max_token_id: int   # the largest id a batch holds (tokens or padding): the model needs an embedding for it


def _file_identity(path: Path) -> list:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _tokenizer_hash(path: Path) -> str:
    """The hash of a tokenizer's files. A model folder (data.tokenizer following model.pretrained)
    holds gigabytes of weights beside them, which are not read: only files that are not weights."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()
                                                 and p.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_path(cfg: DataConfig) -> Path:
    data, tokenizer = resolve_path(cfg.path, "data.path"), resolve_path(cfg.tokenizer_path, "data.tokenizer")
    identity = {"version": PIPELINE_VERSION, "data": [str(data.resolve())] + _file_identity(data),
                "tokenizer": _tokenizer_hash(tokenizer), "chat_template": cfg.chat_template,
                "loss_mask": cfg.loss_mask}
    if cfg.format != "sharegpt":   # today's keys stay as they were for conversations
        identity.update(format=cfg.format, text_field=cfg.text_field)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.resolved_cache_dir()) / f"{data.stem}-{key}"


def _rank() -> tuple[int, int]:
    """(global rank, local rank) from torch.distributed or the launcher's environment."""
    rank = int(os.environ.get("RANK", 0))
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
    except ImportError:
        pass
    return rank, int(os.environ.get("LOCAL_RANK", rank))


def token_stats(lengths: np.ndarray, loss_tokens: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"conversations": 0}
    edges = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    histogram, low = {}, 0
    for edge in edges:
        histogram[f"{low + 1}-{edge}"] = int(((lengths > low) & (lengths <= edge)).sum())
        low = edge
    histogram[f">{low}"] = int((lengths > low).sum())
    p50, p90, p99 = (int(v) for v in np.percentile(lengths, [50, 90, 99]))
    return {"conversations": int(len(lengths)), "tokens": int(lengths.sum()),
            "loss_tokens": int(loss_tokens.sum()), "min": int(lengths.min()),
            "mean": float(lengths.mean()), "p50": p50, "p90": p90, "p99": p99,
            "max": int(lengths.max()), "histogram": histogram}


def _arrow_flat(column, dtype) -> np.ndarray:
    chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)


def _build(cfg: DataConfig, target: Path) -> None:
    from transformers import AutoTokenizer

    from .template import resolve_chat_template

    started = time.perf_counter()
    if cfg.format == "text":
        from .text import read_text_documents
        documents, report = read_text_documents(cfg.path, cfg.text_field)
    else:
        documents, report = read_sharegpt(cfg.path)
    report["read_s"] = round(time.perf_counter() - started, 2)
    if not documents and cfg.format == "text":
        raise DataError(f"data.path={cfg.path}: {why_unusable(report)}; data.format=text reads records with a "
                        f'"{cfg.text_field}" string (JSON Lines {{"{cfg.text_field}": ...}}, parquet or a datasets '
                        f"folder): point data.path at such data, or set data.text_field to the field that holds the text")
    conversations = documents
    if not conversations:
        raise DataError(f"data.path={cfg.path}: {why_unusable(report)}; point data.path at ShareGPT records "
                        '{"conversations": [{"from": "human", "value": ...}, ...]} or OpenAI records '
                        '{"messages": [{"role": "user", "content": ...}, ...]}')
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(cfg.tokenizer_path, "data.tokenizer")))
    # a text has no turns: no chat template to resolve (nor to demand of the tokenizer)
    chat_template = resolve_chat_template(tokenizer, cfg.chat_template) if cfg.format == "sharegpt" else "none"
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "dataset").mkdir(parents=True)
    try:
        _tokenize_into(tmp, target, cfg, conversations, tokenizer, chat_template, pad_id, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, target)


def _publish(tmp: Path, target: Path) -> None:
    """Move a complete cache into place in one step, so that no reader sees half of it."""
    try:
        os.rename(tmp, target)
    except OSError:  # another builder finished first: theirs is the same data
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize_into(tmp: Path, target: Path, cfg: DataConfig, conversations: list, tokenizer,
                   chat_template: str, pad_id: int, report: dict) -> None:
    import datasets

    from .long_examples import FIRST_USER_FILE, first_sentence
    from .template import tokenize_conversations
    from .text import tokenize_texts

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("int8")),
        "exchange_starts": datasets.Sequence(datasets.Value("int32")),
        "length": datasets.Value("int32"), "loss_tokens": datasets.Value("int32")})
    if cfg.format == "text":
        column, encode = "text", lambda batch: tokenize_texts(batch["text"], tokenizer)
    else:
        column = "messages"
        encode = lambda batch: tokenize_conversations(batch["messages"], tokenizer, chat_template,  # noqa: E731
                                                      cfg.loss_mask)
        # what data.long_examples' recall questions ask for, per conversation
        (tmp / FIRST_USER_FILE).write_text(json.dumps([first_sentence(c) for c in conversations]))
    raw = datasets.Dataset.from_dict({column: conversations})
    started = time.perf_counter()
    num_proc = cfg.num_proc if len(raw) >= _SMALL_DATA else 1
    with _quiet_datasets(datasets):
        tokenized = raw.map(
            encode, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
            remove_columns=[column], features=features, desc="tokenizing",
            cache_file_name=str(tmp / "dataset" / "tokenized.arrow"), new_fingerprint=target.name[-16:])
    report["tokenize_s"] = round(time.perf_counter() - started, 2)

    table = tokenized.data
    lengths = table.column("length").to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    exchange_counts = np.concatenate([chunk.value_lengths().to_numpy(zero_copy_only=False)
                                      for chunk in table.column("exchange_starts").chunks] or [[]])
    exchange_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(exchange_counts, out=exchange_offsets[1:])
    arrays = {"tokens": _arrow_flat(table.column("input_ids"), np.int32),
              "loss_mask": _arrow_flat(table.column("loss_mask"), np.int8), "offsets": offsets,
              "exchange_starts": _arrow_flat(table.column("exchange_starts"), np.int32),
              "exchange_offsets": exchange_offsets}
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    report["tokens"] = token_stats(lengths, table.column("loss_tokens").to_numpy())
    report["chat_template"] = chat_template
    report["format"] = cfg.format
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    (tmp / "meta.json").write_text(json.dumps({"pad_id": int(pad_id), "chat_template": chat_template,
                                               "loss_mask": cfg.loss_mask, "key": target.name,
                                               "max_token_id": max(int(arrays["tokens"].max(initial=0)), pad_id)}))
    (tmp / "done").write_text("")


class _quiet_datasets:
    """Progress bars off while tokenizing (they garble multi-rank logs)."""
    def __init__(self, datasets):
        self.datasets = datasets

    def __enter__(self):
        self.was_enabled = self.datasets.is_progress_bar_enabled()
        self.datasets.disable_progress_bars()

    def __exit__(self, *exc):
        if self.was_enabled:
            self.datasets.enable_progress_bars()


def _wait_for(target: Path, failed: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (target / "done").exists():
        if failed.exists() and failed.stat().st_mtime > _PROCESS_START - _LAUNCH_SKEW_S:
            why = failed.read_text()
            if why.startswith(f"{DataError.__name__}: "):   # the user's data: the same one line on every rank
                raise DataError(why.removeprefix(f"{DataError.__name__}: "))
            raise RuntimeError(f"the rank preparing the data failed: {why}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {target} to be prepared by local rank 0; "
                               f"raise data.prepare_timeout_s, or prepare it first with "
                               f"python scripts/prepare_data.py")
        time.sleep(0.5)


def prepare(cfg: DataConfig) -> Prepared:
    """Tokenized data for `cfg`, built and cached on first use (once per node)."""
    cfg = DataConfig.of(cfg).validate()
    target = cache_path(cfg)
    failed = target.with_name(target.name + ".failed")
    if not (target / "done").exists():
        _, local_rank = _rank()
        if local_rank == 0:
            failed.unlink(missing_ok=True)
            try:
                _build(cfg, target)
            except BaseException as error:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(error).__name__}: {error}")
                raise
        else:
            _wait_for(target, failed, cfg.prepare_timeout_s)
    arrays = {name: np.load(target / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    meta = json.loads((target / "meta.json").read_text())
    report = json.loads((target / "report.json").read_text())
    pad_id = int(meta["pad_id"])
    max_token_id = meta.get("max_token_id")   # caches written before it was recorded: read the tokens once
    if max_token_id is None:
        max_token_id = max(int(arrays["tokens"].max(initial=0)), pad_id)
    return Prepared(TokenStore(**arrays), report, pad_id, meta["key"], target, int(max_token_id))


def why_unusable(report: dict) -> str:
    """Why a data set gave no conversation, in a few words (the middle of a one-line error)."""
    if report["records"] == 0:
        if report["truncations"]:
            cut = report["truncations"][0]
            return f"{cut['file']} is not JSON or JSON Lines ({cut['error']} at byte {cut['byte_offset']})"
        if report["empty_files"]:
            return f"{', '.join(report['empty_files'])} is empty"
        return "it holds no records"
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(report["skipped"].items()))
    return f"none of its {report['records']} records is a usable conversation (skipped: {skipped})"


def format_report(report: dict) -> str:
    """The kept/skipped table, repairs, truncation, token statistics and packing, as text."""
    lines = [f"data: {report['records']} records read from {len(report.get('files', []))} file(s), "
             f"{report['kept']} kept"]
    rows = [("kept", report["kept"])] + [(f"skipped: {k}", v) for k, v in sorted(report["skipped"].items())]
    rows += [(f"repaired: {k}", v) for k, v in sorted(report.get("repaired", {}).items())]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {count:>9}" for name, count in rows]
    for cut in report.get("truncations", []):
        lines.append(f"  file cut off: {cut['file']} stops parsing at byte {cut['byte_offset']} "
                     f"({cut['error']}; {cut['unparsed_bytes']} bytes after it ignored)")
    for empty in report.get("empty_files", []):
        lines.append(f"  empty file: {empty}")
    for bad in report.get("invalid_lines", []):
        lines.append(f"  invalid line: {bad}")
    for ignored in report.get("ignored_files", []):
        lines.append(f"  not a data file, ignored: {ignored}")
    stats = report.get("tokens")
    if stats and stats.get("conversations"):
        lines.append(f"tokens ({report.get('chat_template')} template): {stats['tokens']} in "
                     f"{stats['conversations']} conversations, {stats['loss_tokens']} for the loss; "
                     f"per conversation min {stats['min']} p50 {stats['p50']} mean {stats['mean']:.0f} "
                     f"p90 {stats['p90']} p99 {stats['p99']} max {stats['max']}")
        lines.append("  length histogram: " + ", ".join(f"{k}: {v}" for k, v in stats["histogram"].items() if v))
    packing = report.get("packing")
    if packing:
        lines.append(f"packing ({packing['method']}, seq_len {packing['seq_len']}): {packing['pieces']} "
                     f"samples into {packing['sequences']} sequences, "
                     f"padding {100 * packing['padding_fraction']:.2f}%; "
                     f"{packing['steps_per_epoch']} steps per epoch of {packing['sequences_per_step']} "
                     f"sequences, {packing['dropped_sequences']} left over per epoch")
        if packing.get("long_examples"):
            lines.append(f"  long examples: {packing['long_examples']} rows an epoch open with one (made anew each "
                         f"epoch; python -m longctx.data.inspect shows them)")
        if packing.get("attention_span") == "row":
            lines.append("  attention: one span per row (data.attention_span=row)")
        overlong = packing.get("overlong", {})
        if overlong.get("overlong_documents"):
            lines.append("  longer than seq_len: " + ", ".join(f"{k} {v}" for k, v in sorted(overlong.items())))
    return "\n".join(lines)
