"""Long-context evaluation of a checkpoint: line retrieval, needle in a haystack, loss by position.

    python scripts/eval_long.py model.path=runs/<run>                  # a longctx run (its hf/ export)
    python scripts/eval_long.py model.path=<hf llama folder> lengths=[8192,32768] tasks=[needle]
    torchrun --nproc_per_node 4 scripts/eval_long.py model.path=... lengths=[262144]

Config: configs/eval/default.yaml. With several processes the prompt is split over all of them and
prefilled through the sequence-parallel method `sp_method` (ring by default; any registered method);
answers are decoded against the distributed KV cache. Rank 0
writes results.json, the figures (matplotlib, if installed) and, if enabled, a wandb run to the
output folder.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from longctx.eval import plots  # noqa: E402
from longctx.eval.perplexity import bucket_edges, conversation_sequences, loss_by_position  # noqa: E402
from longctx.eval.runner import (PROMPT_FORMATS, answer_samples, line_retrieval_samples,  # noqa: E402
                                 needle_samples)
from longctx.eval.scoring import accuracy_by  # noqa: E402
from longctx.eval.tasks import Haystack, haystack_text  # noqa: E402

TASKS = ("line_retrieval", "needle", "perplexity")


class EvalConfigError(ValueError):
    pass


def resolve_model_folder(path: str) -> tuple[Path, Path | None]:
    """(the Hugging Face folder to load, the run folder it belongs to or None)."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "hf" / "config.json").is_file():
        return folder / "hf", folder
    if (folder / "checkpoints").is_dir():
        raise EvalConfigError(f"{folder} is a run folder with training checkpoints but no hf/ export: "
                              "train with checkpoint.export_hf=true (the default for softmax models)")
    raise EvalConfigError(f"model.path={path}: neither a Hugging Face folder (config.json) nor a longctx "
                          "run folder (hf/config.json)")


def check_config(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg.model, "path"):
        raise EvalConfigError("model.path is not set: name the model to evaluate, a longctx run folder "
                              "(python scripts/eval_long.py model.path=runs/<run>) or a Hugging Face LLaMA folder")
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise EvalConfigError(f"tasks {unknown} unknown; choose from {list(TASKS)}")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise EvalConfigError(f"prompt_format={cfg.prompt_format!r}: choose one of {PROMPT_FORMATS}")
    if not cfg.lengths or any(int(n) < 16 for n in cfg.lengths):
        raise EvalConfigError(f"lengths must list context sizes of at least 16 tokens, got {list(cfg.lengths)}")
    if any(not 0.0 <= float(d) <= 1.0 for d in cfg.depths):
        raise EvalConfigError(f"depths must lie in [0, 1], got {list(cfg.depths)}")
    if cfg.wandb not in ("disabled", "offline", "online"):
        raise EvalConfigError(f"wandb={cfg.wandb!r}: choose disabled, offline or online")
    if cfg.sp_method != "none":
        from longctx.parallel.registry import get_method
        try:
            get_method(cfg.sp_method)
        except ValueError as error:
            raise EvalConfigError(str(error).replace("parallel.", "")) from None


def init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def load_model(folder: Path, cfg: DictConfig, device: torch.device):
    """The model, its mixers split over every process with `sp_method` when there are several."""
    from longctx.model import load_hf
    from longctx.parallel.mesh import sequence_dims
    from longctx.parallel.parallelize import apply_sequence_parallel
    try:
        dims = sequence_dims(cfg.sp_method, None, int(cfg.ulysses))   # a bad sp_method fails before loading
        dtype = getattr(torch, cfg.model.dtype) if device.type == "cuda" else torch.float32
        model = load_hf(folder, attention=cfg.model.attention, dtype=dtype, device=device).eval()
        apply_sequence_parallel(model, dims)
    except ValueError as error:
        raise EvalConfigError(f"{folder}: {error}".replace("parallel.", "")) from None
    return model


def load_tokenizer(cfg: DictConfig, folder: Path):
    from transformers import AutoTokenizer
    path = cfg.tokenizer
    if path is None:
        own = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        path = folder if own else REPO_ROOT / "data" / "tokenizer"
    return AutoTokenizer.from_pretrained(str(path))


def data_path(path: str) -> str:
    return str(path if Path(path).is_absolute() or Path(path).exists() else REPO_ROOT / path)


def evaluate(cfg: DictConfig) -> Path | None:
    check_config(cfg)
    folder, run_dir = resolve_model_folder(cfg.model.path)
    rank, world, device = init_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.output_dir) if cfg.output_dir else (run_dir / "eval" / stamp if run_dir else Path("eval_runs") / stamp)
    model = load_model(folder, cfg, device)
    tokenizer = load_tokenizer(cfg, folder)
    eos = model.config.eos_token_id
    lengths, depths = [int(n) for n in cfg.lengths], [float(d) for d in cfg.depths]
    log(f"evaluating {folder} on {world} process(es) ({model.sequence_dims.sp_method}), {device}, attention {model.config.attention}; "
        f"tasks {list(cfg.tasks)}, lengths {lengths}")
    report: dict = {"model": str(folder), "processes": world,
                    "config": OmegaConf.to_container(cfg, resolve=True)}
    figures = []
    if "line_retrieval" in cfg.tasks:
        samples = line_retrieval_samples(tokenizer, lengths, depths, cfg.samples_per_cell, cfg.seed)
        results = answer_samples(model, tokenizer, samples, cfg.max_new_tokens, cfg.prompt_format, eos, log)
        report["line_retrieval"] = {"by_length": accuracy_by(results, "length"),
                                    "by_length_depth": accuracy_by(results, "length", "asked_depth"),
                                    "results": results}
        figures.append(("line_retrieval_by_depth.png", plots.accuracy_by_depth, results))
    if "needle" in cfg.tasks:
        from longctx.data import read_sharegpt
        conversations, _ = read_sharegpt(data_path(cfg.needle.haystack))
        # about 4 characters a token in English text; 12 per token leaves room for code and Chinese
        need = None if cfg.needle.random_start else 12 * max(lengths) + 10_000
        haystack = Haystack(tokenizer, haystack_text(conversations, need))
        samples = needle_samples(haystack, lengths, depths, cfg.samples_per_cell, cfg.seed,
                                 random_start=cfg.needle.random_start)
        results = answer_samples(model, tokenizer, samples, cfg.max_new_tokens, cfg.prompt_format, eos, log)
        report["needle"] = {"by_length": accuracy_by(results, "length"),
                            "grid": accuracy_by(results, "length", "asked_depth"),
                            "haystack_tokens": len(haystack.ids), "results": results}
        figures.append(("needle_heatmap.png", plots.needle_heatmap, results))
    if "perplexity" in cfg.tasks:
        from longctx.data import read_sharegpt
        conversations, _ = read_sharegpt(data_path(cfg.perplexity.data))
        length = int(cfg.perplexity.length or max(lengths))
        sequences = conversation_sequences(conversations, tokenizer, length, cfg.perplexity.sequences, cfg.seed)
        rows = loss_by_position(model, sequences, bucket_edges(length))
        report["perplexity"] = {"length": length, "sequences": len(sequences), "by_position": rows}
        for r in rows:
            log(f"loss at context {r['start']:>8}..{r['end']:<8} {r['loss']:.3f} ({r['tokens']} tokens)")
        trained = cfg.perplexity.trained_length
        figures.append(("loss_by_position.png",
                        lambda rows, path: plots.loss_by_position_plot(rows, path, trained), rows))
    if rank == 0:
        write_outputs(out, report, figures, cfg, log)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out if rank == 0 else None


def write_outputs(out: Path, report: dict, figures: list, cfg: DictConfig, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    drawn = []
    for name, draw, data in figures:
        try:
            drawn.append(draw(data, out / name))
        except ImportError as error:
            log(f"no figures: {error}")
            break
    summary = {f"{task}/accuracy/{row['length']}": row["accuracy"]
               for task in ("line_retrieval", "needle") if task in report for row in report[task]["by_length"]}
    for task in ("line_retrieval", "needle"):
        if task in report:
            log(f"{task}: " + ", ".join(f"{r['length']} tokens {r['accuracy']:.2f}" for r in report[task]["by_length"]))
    if cfg.wandb != "disabled":
        import wandb  # imported only when the evaluation logs to it
        run = wandb.init(project=cfg.project, dir=str(out), mode=cfg.wandb, job_type="eval",
                         config=report["config"], settings=wandb.Settings(console="off"))
        run.summary.update(summary)
        if "perplexity" in report:
            rows = report["perplexity"]["by_position"]
            run.log({"perplexity/by_position": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.log({path.stem: wandb.Image(str(path)) for path in drawn})
        run.finish()
    log(f"results in {out}")


@hydra.main(config_path=str(REPO_ROOT / "configs" / "eval"), config_name="default", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except EvalConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
