"""`python -m longctx.eval` end to end on a tiny exported model: one process and two (torchrun, gloo,
ring and Ulysses prefill) write the same results; packed prefill answers as prompt by prompt; bad
settings give one clear error line; the bench rows; figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.model import Llama, ModelConfig, save_hf

REPO = Path(__file__).resolve().parents[2]
ARGS = ["lengths=[96]", "depths=[0.0,1.0]", "samples_per_cell=1", "max_new_tokens=3", "loss.sequences=1",
        "short_loss.sequences=1", "short_loss.length=64", "tasks=[line_retrieval,needle,passkey,loss,short_loss]"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as the trainer leaves it (hf/ export) of a tiny model on the Llama-3 vocabulary."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    config = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.5)
    save_hf(Llama(config), folder / "hf")
    return folder


def load_script():
    import longctx.eval.__main__ as module
    return module


def compose(overrides):
    """The evaluation's config from command-line overrides."""
    from longctx.eval.config import parse_args
    return parse_args(overrides)


def run_script(args, launcher=(sys.executable,)):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "longctx.eval", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def test_one_and_two_processes_write_the_same_results(run_folder, tmp_path):
    out = load_script().evaluate(compose([f"model.path={run_folder}", *ARGS]))
    assert out.parent == run_folder / "eval"                 # results go to the run folder
    report = json.loads((out / "results.json").read_text())
    assert report["processes"] == 1 and report["model"] == str(run_folder / "hf") and report["stage"] == "trained"
    for task in ("line_retrieval", "needle", "passkey"):
        results = report[task]["results"]
        assert len(results) == 2 and all(isinstance(r["correct"], bool) for r in results)
        assert all(80 <= r["tokens"] <= 96 for r in results), [r["tokens"] for r in results]
        assert [r["asked_depth"] for r in results] == [0.0, 1.0]
    rows = report["loss"]["by_position"]
    assert rows[0]["start"] == 1 and rows[-1]["end"] == 96 and sum(r["tokens"] for r in rows) == 95
    assert report["short_loss"]["tokens"] == 63 and report["short_loss"]["loss"] > 0
    bench = json.loads((out / "rows.json").read_text())
    cells = [r for r in bench if r["task"] == "needle" and "depth" not in r]
    assert cells == [{"bench": "long_context_eval", "impl": "longctx", "model": run_folder.name.lower(),
                      "stage": "trained", "trained_seq_len": 8192, "task": "needle", "seqlen": 96,
                      "accuracy": report["needle"]["by_length"][0]["accuracy"], "samples": 2}]
    assert [r["kind"] for r in bench if r["task"] == "loss"][-1] == "short_context"

    # packed prefill (the default) decodes what prompt-by-prompt decoding does
    one = load_script().evaluate(compose([f"model.path={run_folder}", f"output_dir={tmp_path / 'one'}",
                                          "batch_tokens=0", *ARGS]))
    single = json.loads((one / "results.json").read_text())
    for task in ("line_retrieval", "needle", "passkey"):
        assert [r["generated"] for r in single[task]["results"]] == [r["generated"] for r in report[task]["results"]]

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    for method in ("ring", "ulysses"):   # the default, and a method the script knows only through the registry
        two = run_script([f"model.path={run_folder}", f"output_dir={tmp_path / method}", f"sp_method={method}",
                          *ARGS], torchrun)
        assert two.returncode == 0, two.stderr[-3000:]
        parallel = json.loads((tmp_path / method / "results.json").read_text())
        assert parallel["processes"] == 2 and parallel["config"]["sp_method"] == method
        for task in ("line_retrieval", "needle", "passkey"):
            assert ([r["generated"] for r in parallel[task]["results"]]
                    == [r["generated"] for r in report[task]["results"]]), method
        for a, b in zip(parallel["loss"]["by_position"], rows):
            assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5), method


def test_bad_config_is_one_clear_line(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    result = run_script([f"model.path={tmp_path}", "tasks=[needle]"])
    assert result.returncode != 0
    assert "no hf/ export" in result.stderr and "Traceback" not in result.stderr
    typo = run_script([f"model.path={tmp_path}", "sample_per_cell=3"])
    assert typo.returncode != 0 and "sample_per_cell" in typo.stderr and "Traceback" not in typo.stderr
    assert "--help" in typo.stderr.strip().splitlines()[-1]
    helped = run_script(["--help"])
    assert helped.returncode == 0 and "samples_per_cell=2" in helped.stdout and "short_loss.length=2048" in helped.stdout
    script = load_script()
    for override, message in [("tasks=[recall]", r"tasks \['recall'\] unknown"), ("depths=[1.5]", "depths must"),
                              ("lengths=[8]", "at least 16"), ("prompt_format=chatml", "prompt_format"),
                              ("stage=final", "stage='final'"),
                              ("model.path=/nonexistent", "neither a Hugging Face folder"),
                              ("sp_method=tree", "sp_method='tree': choose one of none, lasp, ")]:
        with pytest.raises(script.EvalConfigError, match=message):
            script.evaluate(compose([f"model.path={tmp_path}", override]))


def test_figures(tmp_path):
    from longctx.eval import plots
    results = [{"length": n, "asked_depth": d, "depth": d, "correct": (n + int(10 * d)) % 3 == 0}
               for n in (1024, 2048, 4096) for d in (0.0, 0.5, 1.0)]
    rows = [{"start": 1 << i, "end": 2 << i, "tokens": 10, "loss": 3.0 - 0.1 * i, "ppl": 1.0} for i in range(8)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:   # then drawing says how to get it
        with pytest.raises(ImportError, match="pip install matplotlib"):
            plots.needle_heatmap(results, tmp_path / "heat.png")
        return
    for path in (plots.needle_heatmap(results, tmp_path / "heat.png"),
                 plots.accuracy_by_depth(results, tmp_path / "depth.png"),
                 plots.loss_by_position_plot(rows, tmp_path / "loss.png", trained_length=16)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_json_collects_both_stages_and_report_draws_them(tmp_path):
    """Rows of a base and a trained evaluation merge into one bench JSON (a rerun replaces its own
    stage's rows); the report writes the before/after table and figures."""
    from longctx.eval.report import main as report
    from longctx.eval.rows import bench_rows, merge_rows

    def evaluation(stage, accuracy, loss):
        cells = [{"length": n, "asked_depth": d, "accuracy": accuracy(n), "count": 4}
                 for n in (4096, 8192) for d in (0.0, 1.0)]
        return {"name": "smol", "stage": stage, "trained_seq_len": 8192 if stage == "base" else 65536,
                "needle": {"by_length": [{"length": n, "accuracy": accuracy(n), "count": 8} for n in (4096, 8192)],
                           "by_length_depth": cells},
                "loss": {"length": 8192, "by_position": [{"start": 1, "end": 4096, "loss": loss, "tokens": 10},
                                                         {"start": 4096, "end": 8192, "loss": loss - 0.1, "tokens": 10}]},
                "short_loss": {"length": 2048, "loss": loss, "tokens": 100, "sequences": 1}}

    bench = tmp_path / "bench.json"
    merge_rows(bench, bench_rows(evaluation("base", lambda n: 0.5, 2.0)), "eval base", "cpu")
    merge_rows(bench, bench_rows(evaluation("trained", lambda n: 0.25, 2.5)), "eval trained", "cpu")
    merge_rows(bench, bench_rows(evaluation("trained", lambda n: 1.0 if n == 4096 else 0.75, 2.1)), "eval trained", "cpu")
    data = json.loads(bench.read_text())
    assert data["commands"] == ["eval base", "eval trained"] and len(data["rows"]) == 2 * (2 + 4 + 2 + 1)
    report([str(bench), str(tmp_path / "out")])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| needle | base | 50% | 50% |" in table and "| needle | trained | 100% | 75% |" in table
    assert "short-context loss: base 2.0000, trained 2.1000" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("retrieval_before_after.png", "loss_by_position_before_after.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
