"""The data config: the schema of the Hydra `data` group."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .packing import OVERLONG, PACKINGS
from .sharegpt import resolve_path
from .template import CHAT_TEMPLATES, LOSS_MASKS

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DataConfig:
    # ShareGPT .json/.jsonl file (cut-off files are recovered), a folder of shards, a datasets
    # folder or a .parquet file. Relative paths are tried from the cwd, then the repository root.
    path: str = "data/sharegpt_sample.json"
    # a local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json)
    tokenizer: str = "data/tokenizer"
    # "auto": the tokenizer's chat_template if it has one, else the built-in Llama-3 format;
    # "llama3": always the built-in format; "tokenizer": the tokenizer's template (error if none)
    chat_template: str = "auto"
    # which tokens count for the loss: "assistant" replies, the "last" reply only, or "all"
    loss_mask: str = "assistant"
    # a conversation longer than seq_len: "truncate" (keep the whole exchanges that fit) or
    # "split" (several samples, each starting at a user turn after the system prompt)
    overlong: str = "split"
    # "best_fit" (less padding) or "greedy" (fill in order, start a new sequence when full)
    packing: str = "best_fit"
    # processes for tokenizing (datasets.map); small data sets use one
    num_proc: int = 2
    # where prepared (tokenized) data is cached; None: $LONGCTX_DATA_CACHE or ~/.cache/longctx/data
    cache_dir: Optional[str] = None
    # how long other ranks wait for the rank that prepares the data before giving up
    prepare_timeout_s: float = 6 * 3600.0
    # print the kept/skipped table and token statistics when the loader is built (rank 0)
    verbose: bool = True

    def validate(self) -> "DataConfig":
        """Cheap checks (no tokenizing): paths exist and every choice is a known one."""
        resolve_path(self.path, "data.path")
        tokenizer = resolve_path(self.tokenizer, "data.tokenizer")
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
        if tokenizer.is_dir() and not any((tokenizer / f).exists() for f in tokenizer_files):
            raise FileNotFoundError(f"data.tokenizer {self.tokenizer!r} holds no tokenizer.json or "
                                    f"tokenizer_config.json; point it at a Hugging Face tokenizer folder")
        for name, value, allowed in (("chat_template", self.chat_template, CHAT_TEMPLATES),
                                     ("loss_mask", self.loss_mask, LOSS_MASKS),
                                     ("overlong", self.overlong, OVERLONG),
                                     ("packing", self.packing, PACKINGS)):
            if value not in allowed:
                raise ValueError(f"data.{name}={value!r} is not one of {allowed}")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be at least 1")
        if self.prepare_timeout_s <= 0:
            raise ValueError(f"data.prepare_timeout_s={self.prepare_timeout_s} must be positive")
        return self

    @classmethod
    def of(cls, cfg) -> "DataConfig":
        """`cfg` as a DataConfig: itself, or built from a mapping (an OmegaConf DictConfig, a dict)."""
        if isinstance(cfg, cls):
            return cfg
        try:
            items = {str(k): cfg[k] for k in cfg.keys()}
        except AttributeError:
            raise TypeError(f"expected a DataConfig or a mapping of its fields, got {type(cfg).__name__}") from None
        return cls(**items)

    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return os.path.expanduser(self.cache_dir)
        return os.environ.get("LONGCTX_DATA_CACHE",
                              os.path.join(os.path.expanduser("~"), ".cache", "longctx", "data"))


def data_group_values(name: str) -> dict:
    """The values of the Hydra `data` group option `name` (configs/data/<name>.yaml, or a .yaml
    path), following its defaults list as Hydra does."""
    from omegaconf import OmegaConf

    from .sharegpt import sharegpt_v3_path

    if not OmegaConf.has_resolver("sharegpt_v3_path"):
        OmegaConf.register_new_resolver("sharegpt_v3_path", sharegpt_v3_path)
    file = Path(name) if name.endswith(".yaml") else REPO_ROOT / "configs" / "data" / f"{name}.yaml"
    if not file.exists():
        options = sorted(p.stem for p in (REPO_ROOT / "configs" / "data").glob("*.yaml"))
        raise SystemExit(f"data={name}: no such data config {file}; choose one of {options}")
    node = OmegaConf.load(file)
    defaults = list(node.pop("defaults", []))
    if "_self_" not in defaults:
        defaults.append("_self_")
    merged = OmegaConf.create()
    for entry in defaults:
        part = node if entry == "_self_" else OmegaConf.create(data_group_values(str(entry)))
        merged = OmegaConf.merge(merged, part)
    return OmegaConf.to_container(merged, resolve=True)


def config_from_args(args: list[str], extras: dict) -> tuple[DataConfig, dict]:
    """A DataConfig from `key=value` arguments (an optional `data.` prefix is accepted, as in the
    Hydra overrides of the trainer); `data=<name>` starts from configs/data/<name>.yaml; keys in
    `extras` (name -> default) are returned apart."""
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    values, others = {}, dict(extras)
    for arg in args:
        if arg.startswith("data="):
            values.update(data_group_values(arg.partition("=")[2]))
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "data":
            continue
        key = key.removeprefix("data.")
        if not sep or (key not in fields and key not in extras):
            raise SystemExit(f"unknown argument {arg!r}: expected key=value with key one of "
                             f"{sorted(fields) + sorted(extras)}")
        if key in extras:
            others[key] = type(extras[key])(value) if extras[key] is not None else value
            continue
        kind = fields[key].type
        if value.lower() in ("none", "null") and "Optional" in str(kind):
            values[key] = None
        elif kind in ("bool", bool):
            values[key] = value.lower() in ("1", "true", "yes")
        elif kind in ("int", int):
            values[key] = int(value)
        elif kind in ("float", float):
            values[key] = float(value)
        else:
            values[key] = value
    return DataConfig(**values), others
