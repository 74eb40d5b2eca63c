"""The data config: the schema of the Hydra `data` group."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .long_examples import LongExamplesConfig
from .packing import ATTENTION_SPANS, OVERLONG, PACKINGS
from .sharegpt import PROJECT_ROOT as REPO_ROOT, resolve_path
from .template import CHAT_TEMPLATES, LOSS_MASKS


DATA_FORMATS = ("sharegpt", "text")
DEFAULT_TOKENIZER = "data/tokenizer"   # the Llama-3 tokenizer shipped with the repository


@dataclass
class DataConfig:
    # "sharegpt": conversations, the loss on replies; "text": plain-text documents (a `text_field`
    # in JSON Lines, parquet or a datasets folder), the loss on every token, longer ones cut into
    # seq_len pieces (continued pretraining)
    format: str = "sharegpt"
    # the field holding a document's text (format=text)
    text_field: str = "text"
    # "document": each document (conversation, text piece, long example) is its own attention span
    # (its own cu_seqlens entry); "row": the documents of a row, each ending in its separator, are
    # one span that attends across them (positions run 0.. through the row)
    attention_span: str = "document"
    # synthetic long-dependency examples made of the conversations (long_examples.py)
    long_examples: LongExamplesConfig = field(default_factory=LongExamplesConfig)
    # ShareGPT .json/.jsonl file (cut-off files are recovered), a folder of shards, a datasets
    # folder or a .parquet file. Relative paths are tried from the cwd, then the repository root.
    path: str = "data/sharegpt_sample.json"
    # a local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json); None: in training
    # the tokenizer of model.pretrained's folder if it holds one, else DEFAULT_TOKENIZER (Llama-3's)
    tokenizer: Optional[str] = None
    # "auto": the tokenizer's chat_template if it renders prefixes as prefixes, else the built-in ChatML
    # format for a tokenizer with ChatML's tokens (Qwen), else the built-in Llama-3 format;
    # "llama3" / "chatml": always that built-in format; "tokenizer": the tokenizer's template (error if none)
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
        tokenizer = resolve_path(self.tokenizer_path, "data.tokenizer")
        if tokenizer.is_dir() and not holds_tokenizer(tokenizer):
            raise FileNotFoundError(f"data.tokenizer {self.tokenizer_path!r} holds no tokenizer.json or "
                                    f"tokenizer_config.json; point it at a Hugging Face tokenizer folder")
        for name, value, allowed in (("chat_template", self.chat_template, CHAT_TEMPLATES),
                                     ("loss_mask", self.loss_mask, LOSS_MASKS),
                                     ("overlong", self.overlong, OVERLONG),
                                     ("format", self.format, DATA_FORMATS),
                                     ("attention_span", self.attention_span, ATTENTION_SPANS),
                                     ("packing", self.packing, PACKINGS)):
            if value not in allowed:
                raise ValueError(f"data.{name}={value!r} is not one of {allowed}")
        self.long_examples = LongExamplesConfig.of(self.long_examples).validate()
        if self.long_examples.ratio > 0 and self.format != "sharegpt":
            raise ValueError(f"data.long_examples are made of conversations: set data.format=sharegpt (not "
                             f"{self.format}) or data.long_examples.ratio=0")
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
        if "long_examples" in items:
            items["long_examples"] = LongExamplesConfig.of(items["long_examples"])
        return cls(**items)

    @property
    def tokenizer_path(self) -> str:
        """data.tokenizer, or the default where it is None (a trainer sets it from model.pretrained first)."""
        return self.tokenizer or DEFAULT_TOKENIZER

    def resolved_cache_dir(self) -> str:
        if self.cache_dir:
            return os.path.expanduser(self.cache_dir)
        return os.environ.get("LONGCTX_DATA_CACHE",
                              os.path.join(os.path.expanduser("~"), ".cache", "longctx", "data"))


def holds_tokenizer(folder) -> bool:
    """Whether a folder holds a Hugging Face tokenizer (its tokenizer.json or tokenizer_config.json)."""
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def config_from_args(args: list[str], extras: dict) -> tuple[DataConfig, dict]:
    """A DataConfig from Hydra-style `key=value` overrides, composed by Hydra from the `data`
    config group: `data=<name>` starts from configs/data/<name>.yaml (default: sharegpt_sample),
    `key=value` or `data.key=value` sets a field (typed and checked against DataConfig); keys in
    `extras` (name -> default) are returned apart."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .sharegpt import sharegpt_v3_path

    fields = {f.name for f in dataclasses.fields(DataConfig)}
    fields |= {f"long_examples.{f.name}" for f in dataclasses.fields(LongExamplesConfig)}
    name, overrides, others = "sharegpt_sample", [], dict(extras)
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.removeprefix("data.")
        if key == "data":
            name = value
        elif sep and key in extras:
            others[key] = type(extras[key])(value) if extras[key] is not None else value
        elif sep and key in fields:
            overrides.append(f"{key}={value}")
        else:
            raise SystemExit(f"unknown argument {arg!r}: expected key=value with key one of "
                             f"{sorted(fields) + sorted(extras)}")
    group = REPO_ROOT / "configs" / "data"
    if not (group / f"{name}.yaml").is_file():
        raise SystemExit(f"data={name}: no such data config in {group}; choose one of "
                         f"{sorted(p.stem for p in group.glob('*.yaml'))}")
    if not OmegaConf.has_resolver("sharegpt_v3_path"):
        OmegaConf.register_new_resolver("sharegpt_v3_path", sharegpt_v3_path)
    try:
        with initialize_config_dir(config_dir=str(group), version_base="1.3"):
            node = compose(config_name=name)
        # the schema first, so that the overrides are typed and may set fields the file leaves out
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), node, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged), others
    except (HydraException, OmegaConfBaseException) as error:
        raise SystemExit(f"data config: {error}") from None
