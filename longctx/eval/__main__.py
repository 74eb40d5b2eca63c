"""`python -m longctx.eval model.path=<folder> key=value ...`: long-context evaluation of a model.

    python -m longctx.eval model.path=/models/SmolLM2-135M-Instruct lengths=[4096,8192] samples_per_cell=20
    python -m longctx.eval model.path=runs/<run>                        # a run folder: its hf/ export
    torchrun --nproc_per_node 4 -m longctx.eval model.path=... lengths=[262144]

Settings: `python -m longctx.eval --help` (longctx/eval/config.py). With several processes the
prompt is split over all of them and prefilled through the sequence-parallel method `sp_method`;
answers are decoded against the distributed KV cache. Rank 0 writes results.json (everything),
rows.json (the bench rows of DESIGN.md: `{"bench": "long_context_eval", "stage": "base" | "trained",
"task", "seqlen", "accuracy", "samples", ...}` and loss rows), the figures and, if enabled, a
wandb run, to the output folder; `append_to=<file>` merges the rows into a bench JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from . import plots
from .config import EvalConfigError, check_config, parse_args
from .perplexity import bucket_edges, conversation_sequences, loss_by_position, packed_sequences
from .runner import answer_samples, build_prompts, encode_prompt
from .rows import bench_rows, merge_rows
from .scoring import accuracy_by
from .tasks import Haystack, haystack_text

RETRIEVAL = ("needle", "passkey", "line_retrieval")


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


def init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def load_model(folder: Path, cfg, device: torch.device):
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


def load_tokenizer(cfg, folder: Path):
    from transformers import AutoTokenizer

    from longctx.data.sharegpt import PROJECT_ROOT
    path = cfg.tokenizer
    if path is None:
        own = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        path = folder if own else PROJECT_ROOT / "data" / "tokenizer"
    return AutoTokenizer.from_pretrained(str(path))


def data_path(path: str) -> str:
    from longctx.data.sharegpt import resolve_path
    try:
        return str(resolve_path(path, "data file"))
    except FileNotFoundError as error:
        raise EvalConfigError(str(error)) from None


def trained_seq_len(cfg, model, run_dir: Path | None) -> int:
    """What the rows call the trained length: as set, the run's train.seq_len, or the model's
    max_position_embeddings (a base model's pretraining length)."""
    if cfg.trained_seq_len:
        return int(cfg.trained_seq_len)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf
        run = OmegaConf.load(run_dir / "config.yaml")
        if "train" in run and "seq_len" in run.train:
            return int(run.train.seq_len)
    return int(model.config.max_position_embeddings)


def held_out_tokens(path: str, tokenizer, skip: int) -> tuple[str, list]:
    """("sharegpt", conversations) or ("text", token lists) of a held-out file, `skip` records dropped."""
    from longctx.data import read_sharegpt
    try:
        conversations, _ = read_sharegpt(data_path(path))
        if conversations:
            return "sharegpt", conversations[skip:]
    except Exception:   # not ShareGPT: a file of plain `text` documents
        pass
    texts = _text_documents(data_path(path))[skip:]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return "text", [tokenizer.encode(t, add_special_tokens=False) + eos for t in texts]


def _text_documents(path: str) -> list[str]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    texts = []
    with open(path) as f:
        head = f.read(1)
        f.seek(0)
        records = json.load(f) if head == "[" else (json.loads(line) for line in f if line.strip())
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
    if not texts:
        raise EvalConfigError(f"{path}: neither ShareGPT conversations nor records with a `text` field")
    return texts


def sequences_of(path: str, tokenizer, length: int, count: int, skip: int, seed: int) -> list[torch.Tensor]:
    kind, documents = held_out_tokens(path, tokenizer, skip)
    if kind == "sharegpt":
        return conversation_sequences(documents, tokenizer, length, count, seed, chat_template="auto")
    return packed_sequences(documents, length, count, seed)


def evaluate(cfg) -> Path | None:
    check_config(cfg)
    folder, run_dir = resolve_model_folder(cfg.model.path)
    rank, world, device = init_distributed()
    log = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.output_dir) if cfg.output_dir else (run_dir / "eval" / stamp if run_dir else Path("eval_runs") / stamp)
    model = load_model(folder, cfg, device)
    tokenizer = load_tokenizer(cfg, folder)
    eos = model.config.eos_token_id
    lengths, depths = [int(n) for n in cfg.lengths], [float(d) for d in cfg.depths]
    stage = cfg.stage if cfg.stage != "auto" else ("trained" if run_dir else "base")
    name = cfg.model.name or (run_dir or folder).name.lower()
    trained = trained_seq_len(cfg, model, run_dir)
    log(f"evaluating {folder} ({stage}) on {world} process(es) ({model.sequence_dims.sp_method}), {device}, "
        f"attention {model.config.attention}; tasks {list(cfg.tasks)}, lengths {lengths}")
    from omegaconf import OmegaConf
    report: dict = {"model": str(folder), "name": name, "stage": stage, "trained_seq_len": trained,
                    "processes": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "command": " ".join(["python -m longctx.eval", *sys.argv[1:]]),
                    "config": OmegaConf.to_container(cfg, resolve=True), "seconds": {}}
    figures = []
    # the chat wrapper's tokens count towards the length: fit the raw prompt to what is left
    wrapper = len(encode_prompt(tokenizer, "x", cfg.prompt_format)) - len(tokenizer.encode("x", add_special_tokens=False))
    budgets = [n - wrapper for n in lengths]
    for task in [t for t in RETRIEVAL if t in cfg.tasks]:
        start = time.perf_counter()
        haystack = None
        if task == "needle":
            from longctx.data import read_sharegpt
            conversations, _ = read_sharegpt(data_path(cfg.needle.haystack))
            # about 4 characters a token in English text; 12 per token leaves room for code and Chinese
            need = None if cfg.needle.random_start else 12 * max(lengths) + 10_000
            haystack = Haystack(tokenizer, haystack_text(conversations, need))
        samples, encoded = build_prompts(task, tokenizer, budgets, depths, cfg.samples_per_cell, cfg.seed,
                                         cfg.prompt_format, haystack, cfg.needle.random_start, cfg.prompt_workers)
        for sample in samples:
            sample.meta["length"] = lengths[budgets.index(sample.meta["length"])]
        built = time.perf_counter() - start
        log(f"{task}: {len(samples)} prompts made in {built:.0f} s")
        results = answer_samples(model, tokenizer, samples, cfg.max_new_tokens, cfg.prompt_format, eos, log,
                                 batch_tokens=cfg.batch_tokens, encoded=encoded)
        report[task] = {"by_length": accuracy_by(results, "length"),
                        "by_length_depth": accuracy_by(results, "length", "asked_depth"), "results": results}
        report["seconds"][task] = {"prompts": built, "answers": time.perf_counter() - start - built}
        log(f"{task}: " + ", ".join(f"{r['length']} tokens {r['accuracy']:.2f}" for r in report[task]["by_length"])
            + f" ({time.perf_counter() - start:.0f} s)")
        figures.append((f"{task}_heatmap.png", lambda rows, path, t=task: plots.needle_heatmap(
            rows, path, title=f"{t.replace('_', ' ')}: {name} ({stage})"), results))
    if "loss" in cfg.tasks:
        start = time.perf_counter()
        length = int(cfg.loss.length or max(lengths))
        sequences = sequences_of(cfg.loss.data, tokenizer, length, cfg.loss.sequences, cfg.loss.skip, cfg.seed)
        rows = loss_by_position(model, sequences, bucket_edges(length))
        report["loss"] = {"length": length, "sequences": len(sequences), "by_position": rows}
        report["seconds"]["loss"] = time.perf_counter() - start
        for r in rows:
            log(f"loss at context {r['start']:>8}..{r['end']:<8} {r['loss']:.3f} ({r['tokens']} tokens)")
        figures.append(("loss_by_position.png", lambda rows, path: plots.loss_by_position_plot(
            rows, path, trained, title=f"Loss by position: {name} ({stage})"), rows))
    if "short_loss" in cfg.tasks:
        start = time.perf_counter()
        short = cfg.short_loss
        sequences = sequences_of(short.data, tokenizer, short.length, short.sequences, short.skip, cfg.seed)
        rows = loss_by_position(model, sequences, [1, short.length])
        report["short_loss"] = {"length": short.length, "sequences": len(sequences), **rows[0]}
        report["seconds"]["short_loss"] = time.perf_counter() - start
        log(f"short-context loss at {short.length}: {rows[0]['loss']:.4f} ({rows[0]['tokens']} tokens)")
    report["rows"] = bench_rows(report)
    if rank == 0:
        write_outputs(out, report, figures, cfg, log)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out if rank == 0 else None


def write_outputs(out: Path, report: dict, figures: list, cfg, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "rows.json").write_text(json.dumps(report["rows"], indent=1))
    if cfg.append_to:
        merge_rows(cfg.append_to, report["rows"], report["command"], report["device"])
        log(f"rows merged into {cfg.append_to}")
    drawn = []
    for name, draw, data in figures if cfg.figures else []:
        try:
            drawn.append(draw(data, out / name))
        except ImportError as error:
            log(f"no figures: {error}")
            break
    if cfg.wandb != "disabled":
        import wandb  # imported only when the evaluation logs to it
        run = wandb.init(project=cfg.project, dir=str(out), mode=cfg.wandb, job_type="eval",
                         config=report["config"], settings=wandb.Settings(console="off"))
        run.summary.update({f"{task}/accuracy/{row['length']}": row["accuracy"]
                            for task in RETRIEVAL if task in report for row in report[task]["by_length"]})
        if "loss" in report:
            rows = report["loss"]["by_position"]
            run.log({"loss/by_position": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.log({path.stem: wandb.Image(str(path)) for path in drawn})
        run.finish()
    log(f"results in {out}")


def main(argv: list[str] | None = None) -> None:
    try:
        evaluate(parse_args(sys.argv[1:] if argv is None else argv))
    except EvalConfigError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
