"""scripts/bench_train.py: its --smoke run writes a row of every side (longctx, HF + Liger, HF) at
both precisions with the shape keys and the figures; Liger's patch of transformers does not leak
into later HF rows; --set reaches the longctx rows' builder; a bad --set stops with one line before
any model is built."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_train.py"
SHAPE_KEYS = ("bench", "impl", "model", "seqlen", "gpus", "mode", "checkpoint", "precision", "lora")
FIGURES = ("ms", "tok_s", "peak_gib", "host_peak_gib")


def run_script(*args, timeout=600, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def test_smoke_rows_carry_both_sides_settings_and_figures(tmp_path):
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel (a dependency of longctx)")
    out = tmp_path / "train.json"
    result = run_script("--smoke", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "torch", "triton", "commit", "command", "transformers", "liger_kernel"} <= set(report)
    rows = report["rows"]
    for row in rows:
        assert set(SHAPE_KEYS) <= set(row), row
        assert set(FIGURES) <= set(row), row
        assert "error" not in row and not row.get("oom"), row
        assert row["ms"] > 0 and row["tok_s"] > 0 and row["host_peak_gib"] > 0
        assert row["lora"] is False and row["checkpoint"] == "full"
    timed = {(r["impl"], r["precision"]): r for r in rows if r["layers"] == 2}
    assert set(timed) == {(impl, precision) for impl in ("longctx", "hf_liger", "hf")
                          for precision in ("bf16_autocast", "bf16_pure")}
    # the two sides of each precision: longctx keeps fp32 masters in both, HF's bf16_pure is bf16 throughout
    assert timed["longctx", "bf16_pure"]["master_weights"] == "fp32"
    assert timed["hf", "bf16_pure"]["master_weights"] == "bf16"
    assert timed["hf", "bf16_autocast"]["master_weights"] == "fp32"
    assert timed["hf_liger", "bf16_pure"]["liger"] == "rope,fused_linear_cross_entropy"
    assert "liger" not in timed["hf", "bf16_pure"]
    assert all(r["plan_gib"] > 0 for r in rows if r["impl"] == "longctx")
    # the --layers-at row: one layer, its override recorded
    cut = [r for r in rows if r["layers"] == 1]
    assert len(cut) == 1 and "model.num_hidden_layers=1" in cut[0]["overrides"].split()


def test_liger_patch_is_undone_after_its_rows():
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel (a dependency of longctx)")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from transformers.models.llama import modeling_llama
    sys.path.insert(0, str(SCRIPT.parent))   # where a script finds benchlib when run
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plain_norm, plain_rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    plain_forward = modeling_llama.LlamaForCausalLM.forward
    with bench.liger_patched(bench.LIGER_KERNELS):
        assert modeling_llama.LlamaRMSNorm is LigerRMSNorm
        assert modeling_llama.apply_rotary_pos_emb is not plain_rope
        assert modeling_llama.LlamaForCausalLM.forward is not plain_forward
    assert modeling_llama.LlamaRMSNorm is plain_norm and modeling_llama.apply_rotary_pos_emb is plain_rope
    assert modeling_llama.LlamaForCausalLM.forward is plain_forward


def test_bad_override_is_one_line_before_any_work(tmp_path):
    result = run_script("--smoke", "--set", "train.activation_checkpoint=sometimes", "--out", str(tmp_path / "t.json"),
                        timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.activation_checkpoint" in last, result.stderr[-2000:]
    assert not (tmp_path / "t.json").exists()


def test_set_passes_a_data_parallel_backend_through_to_longctx_rows(tmp_path):
    """--set parallel.* reaches the trainer's builder: DeepSpeed ZeRO-2 with its optimizer on the
    host, over a one-rank process group, as the 8B runs on one GPU use it."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "train.json"
    result = run_script("--smoke", "--impls", "longctx", "--precisions", "bf16_autocast",
                        "--set", "parallel.dp_backend=deepspeed", "--set", "parallel.zero_stage=2",
                        "--set", "parallel.cpu_offload=true", "--out", str(out), env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2   # the timed row and the --layers-at row
    for row in rows:
        assert "error" not in row and row["ms"] > 0, row
        assert row["dp_backend"] == "deepspeed" and row["cpu_offload"] is True
        assert "parallel.zero_stage=2" in row["overrides"].split()
