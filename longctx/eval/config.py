"""The evaluation's settings (`python -m longctx.eval key=value ...`): a typed schema, read from the
command line as `key=value` overrides (OmegaConf's dot-list syntax: `lengths=[4096,8192]`,
`needle.haystack=data/x.json`), with a plain `--help`. Nothing here changes a training run.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, is_dataclass
from typing import List, Optional

TASKS = ("needle", "passkey", "line_retrieval", "loss", "short_loss")
STAGES = ("auto", "base", "trained")


class EvalConfigError(ValueError):
    """A setting the user got wrong: reported as one line."""


@dataclass
class ModelSettings:
    path: str = "???"            # a Hugging Face LLaMA folder, or a longctx run folder holding hf/
    name: Optional[str] = None   # the model's name in the result rows; None: the folder's name, lower case
    attention: str = "auto"      # auto (flash on CUDA, sdpa on CPU) | sdpa | flash | cudnn ... (one process)
    dtype: str = "bfloat16"      # on CUDA; a CPU run computes in float32


@dataclass
class NeedleSettings:
    haystack: str = "data/sharegpt_sample.json"  # ShareGPT file or folder whose text is the haystack
    random_start: bool = False                   # each sample reads the haystack from a seeded offset


@dataclass
class LossSettings:
    # held-out documents: ShareGPT (rendered with the chat template, packed end to end) or JSON
    # Lines / parquet with a `text` field (documents joined end to end)
    data: str = "data/sharegpt_sample.json"
    length: Optional[int] = None   # tokens per sequence; None: the largest of `lengths`
    sequences: int = 4
    skip: int = 0                  # documents to skip from the start of the file (e.g. the training part)


@dataclass
class ShortLossSettings:
    data: str = "data/sharegpt_sample.json"   # held-out ShareGPT conversations
    length: int = 2048
    sequences: int = 16
    skip: int = 0


@dataclass
class EvalConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    stage: str = "auto"              # base | trained in the result rows; auto: trained for a run folder
    trained_seq_len: Optional[int] = None  # in the rows and plots; None: the run's train.seq_len, else the model's max positions
    sp_method: str = "ring"          # several processes share each prompt this way: ring | lasp | ulysses | usp ...
    ulysses: int = 1                 # usp: ranks of a Ulysses group
    tokenizer: Optional[str] = None  # None: the model folder's tokenizer if it has one, else data/tokenizer
    prompt_format: str = "auto"      # auto (chat if the tokenizer has a chat template, else plain) | plain | llama3 | chat
    tasks: List[str] = field(default_factory=lambda: ["needle", "passkey", "line_retrieval", "loss", "short_loss"])
    lengths: List[int] = field(default_factory=lambda: [1024, 2048, 4096])   # context lengths in tokens
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples_per_cell: int = 2        # samples per (task, length, depth)
    batch_tokens: int = 65536        # prompts packed into one prefill up to this many tokens (0: one at a time)
    prompt_workers: int = -1         # processes making the prompts; -1: one per core but one (up to 16) from 16K tokens
    seed: int = 0
    max_new_tokens: int = 12
    needle: NeedleSettings = field(default_factory=NeedleSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    short_loss: ShortLossSettings = field(default_factory=ShortLossSettings)
    output_dir: Optional[str] = None  # None: <run folder>/eval/<time> for a run folder, else eval_runs/<time>
    append_to: Optional[str] = None   # also merge the rows into this bench JSON ({"rows": [...], "commands": [...]})
    figures: bool = True              # draw the figures (matplotlib) beside results.json
    wandb: str = "disabled"           # disabled | offline | online
    project: str = "longctx"


def _describe(schema=EvalConfig, prefix: str = "") -> list[str]:
    lines = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            lines += _describe(type(default), f"{name}.")
        else:
            lines.append(f"  {name}={default}")
    return lines


HELP = """Long-context evaluation of a model: needle, passkey and line retrieval by length and depth,
loss by token position, short-context loss. Writes results.json (with the bench rows), rows.json
and figures.

  python -m longctx.eval model.path=<hf folder> lengths=[4096,8192] samples_per_cell=20
  python -m longctx.eval model.path=runs/<run>                  # a run folder: its hf/ export
  torchrun --nproc_per_node 4 -m longctx.eval model.path=... lengths=[262144]   # sequence-parallel prefill

Settings (key=value, lists as [a,b]) and their defaults:
"""


def parse_args(argv: list[str]) -> EvalConfig:
    """An EvalConfig from `key=value` overrides (a bare first argument is model.path); `--help`
    prints the settings and exits."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    parser = argparse.ArgumentParser(prog="python -m longctx.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=HELP + "\n".join(_describe()))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings, as listed above")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0]:
        overrides[0] = f"model.path={overrides[0]}"
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise EvalConfigError(f"{bad[0]!r} is not a key=value setting (python -m longctx.eval --help lists them)")
    schema = OmegaConf.structured(EvalConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as error:
        raise EvalConfigError(str(error).splitlines()[0] + " (python -m longctx.eval --help lists the settings)") from None
    return merged


def check_config(cfg) -> None:
    from omegaconf import OmegaConf
    from .runner import PROMPT_FORMATS
    if OmegaConf.is_missing(cfg.model, "path"):
        raise EvalConfigError("model.path is not set: name the model to evaluate, a longctx run folder "
                              "(python -m longctx.eval model.path=runs/<run>) or a Hugging Face LLaMA folder")
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise EvalConfigError(f"tasks {unknown} unknown; choose from {list(TASKS)}")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise EvalConfigError(f"prompt_format={cfg.prompt_format!r}: choose one of {PROMPT_FORMATS}")
    if cfg.stage not in STAGES:
        raise EvalConfigError(f"stage={cfg.stage!r}: choose one of {STAGES}")
    if not cfg.lengths or any(int(n) < 16 for n in cfg.lengths):
        raise EvalConfigError(f"lengths must list context sizes of at least 16 tokens, got {list(cfg.lengths)}")
    if any(not 0.0 <= float(d) <= 1.0 for d in cfg.depths):
        raise EvalConfigError(f"depths must lie in [0, 1], got {list(cfg.depths)}")
    if cfg.samples_per_cell < 1 or cfg.max_new_tokens < 1 or cfg.batch_tokens < 0:
        raise EvalConfigError("samples_per_cell and max_new_tokens must be >= 1 and batch_tokens >= 0; got "
                              f"{cfg.samples_per_cell}, {cfg.max_new_tokens}, {cfg.batch_tokens}")
    if cfg.wandb not in ("disabled", "offline", "online"):
        raise EvalConfigError(f"wandb={cfg.wandb!r}: choose disabled, offline or online")
    if cfg.sp_method != "none":
        from longctx.parallel.registry import get_method
        try:
            get_method(cfg.sp_method)
        except ValueError as error:
            raise EvalConfigError(str(error).replace("parallel.", "")) from None
