"""scripts/bench_train.py: its --smoke run writes a row of every side (longctx, HF + Liger, HF) at
both precisions with the shape keys and the figures; the offloaded optimizer, LoRA, checkpoint
groups, activation offload, --layers and --documents-of reach the trainer's builder and the rows;
--append adds to a file; a row that runs out of memory is an "oom" row and the next row runs;
--check and --plan-only run on a CPU; Liger's patch of transformers does not leak into later HF
rows; --set reaches the longctx rows' builder; a bad --set stops with one line before any model is
built."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_train.py"
SHAPE_KEYS = ("bench", "impl", "model", "seqlen", "documents_of", "heads", "kv_heads", "head_dim", "causal", "gpus",
              "layers", "mode", "checkpoint", "checkpoint_group", "activation_offload", "precision", "lora", "optimizer")
FIGURES = ("ms", "optim_ms", "tok_s", "loss", "peak_gib", "host_peak_gib", "params", "trainable_params")


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
        assert row["ms"] > 0 and 0 < row["optim_ms"] < row["ms"] and row["tok_s"] > 0 and row["host_peak_gib"] > 0
        assert row["lora"] is False and row["checkpoint"] == "full" and row["checkpoint_group"] == 1
        assert row["optimizer"] == "adamw_gpu" and row["documents_of"] == row["seqlen"] == 64 and row["build_s"] > 0
        assert row["trainable_params"] == row["params"] > 0
    timed = {(r["impl"], r["precision"]): r for r in rows}
    assert len(rows) == 6 and set(timed) == {(impl, precision) for impl in ("longctx", "hf_liger", "hf")
                          for precision in ("bf16_autocast", "bf16_pure")}
    # the two sides of each precision: longctx keeps fp32 masters in both, HF's bf16_pure is bf16 throughout
    assert timed["longctx", "bf16_pure"]["master_weights"] == "fp32"
    assert timed["hf", "bf16_pure"]["master_weights"] == "bf16"
    assert timed["hf", "bf16_autocast"]["master_weights"] == "fp32"
    assert timed["hf_liger", "bf16_pure"]["liger"] == "rope,fused_linear_cross_entropy"
    assert "liger" not in timed["hf", "bf16_pure"]
    assert all(r["plan_gib"] > 0 and r["plan_host_gib"] > 0 for r in rows if r["impl"] == "longctx")
    assert timed["longctx", "bf16_pure"]["dp_backend"] == "fsdp"


def test_offloaded_optimizer_lora_groups_layers_and_documents_reach_the_rows(tmp_path):
    """Two invocations into one file, as scripts/bench_train_8b_h200.sh makes train_8b_h200.json."""
    out = tmp_path / "train.json"
    first = run_script("--smoke", "--impls", "longctx", "hf", "--precisions", "bf16_pure", "--offload-optimizer",
                       "--seqlens", "64", "128", "--hf-seqlens", "64", "--checkpoint-group", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script("--smoke", "--impls", "longctx", "hf", "--precisions", "bf16_pure", "--offload-optimizer",
                        "--lora", "--seqlens", "128", "--layers", "4", "--checkpoint-group", "2",
                        "--activation-offload", "--documents-of", "32", "--out", str(out), "--append")
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].count("bench_train.py") == 2 and " && " in report["command"]
    rows = report["rows"]
    for row in rows:
        assert "error" not in row and not row.get("oom"), row
        assert set(SHAPE_KEYS) <= set(row) and set(FIGURES) <= set(row), row
    full = [r for r in rows if r["impl"] == "longctx" and not r["lora"]]
    peers = [r for r in rows if r["impl"] == "hf"]
    (lora,) = [r for r in rows if r["lora"]]
    assert [r["seqlen"] for r in full] == [64, 128] and [r["seqlen"] for r in peers] == [64]   # no peer of LoRA
    for row in full:
        assert row["optimizer"] == "offloaded_adamw" and row["precision"] == "bf16_pure" and row["dp_backend"] == "none"
        assert row["master_weights"] == "fp32" and row["checkpoint_group"] == 2 and row["layers"] == 2
        assert row["trainable_params"] == row["params"]
    # one build for both lengths of the same settings
    assert full[0]["build_s"] > 0 and "build_s" not in full[1]
    for row in peers:   # the peer keeps torch's AdamW on the GPU and bf16 weights, checkpoints each layer
        assert row["optimizer"] == "adamw_gpu" and row["master_weights"] == "bf16" and row["checkpoint_group"] == 1
    assert lora["layers"] == 4 and lora["documents_of"] == 32 and lora["seqlen"] == 128
    assert lora["activation_offload"] is True and lora["checkpoint_group"] == 2 and lora["optimizer"] == "offloaded_adamw"
    assert 0 < lora["trainable_params"] < lora["params"] / 4
    assert lora["params"] > full[0]["params"]   # 4 layers and the adapters against 2 layers
    assert "lora.enabled=true" in lora["overrides"].split() and "model.num_hidden_layers=4" in lora["overrides"].split()
    # the planner's host memory: the masters and moments of every parameter against the adapters' alone
    assert lora["plan_host_gib"] < full[0]["plan_host_gib"]


OOM_DRIVER = """
import os, runpy, sys, torch
import longctx.train.train as trainer
plain = trainer.forward_backward
def forward_backward(model, micro_batches, *args, **kwargs):
    if micro_batches[0]["input_ids"].shape[1] == 128:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return plain(model, micro_batches, *args, **kwargs)
trainer.forward_backward = forward_backward
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(sys.argv[0]))   # as running the script puts its folder there (benchlib)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_length_out_of_memory_is_an_oom_row_and_the_next_length_runs(tmp_path):
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", OOM_DRIVER, str(SCRIPT), "--smoke", "--impls", "longctx",
                             "--precisions", "bf16_autocast", "--seqlens", "64", "128", "256", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["seqlen"], bool(r.get("oom"))) for r in rows] == [(64, False), (128, True), (256, False)]
    assert "ms" not in rows[1] and rows[1]["plan_gib"] > 0 and "error" not in rows[1]
    # the model of the failed length was let go: the next length builds its own
    assert rows[2]["build_s"] > 0 and rows[2]["ms"] > 0
    table = result.stdout.rsplit("optim ms", 1)[-1].splitlines()   # the table at the end
    assert any(line.split()[1:2] == ["128"] and "oom" in line.split() for line in table), result.stdout[-2000:]


def test_check_and_plan_only_run_on_a_cpu(tmp_path):
    result = run_script("--check", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check offloaded AdamW" in result.stdout and "check grouped checkpointing" in result.stdout
    out = tmp_path / "plan.json"
    result = run_script("--plan-only", "--model", "8b", "--impls", "longctx", "--precisions", "bf16_pure",
                        "--offload-optimizer", "--seqlens", "65536", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "llama3-8b" and "ms" not in row
    assert row["plan_host_gib"] > 89   # 12 bytes a parameter of 8B on the host


@pytest.mark.parametrize("family, prefix", [("llama", "Llama"), ("qwen3", "Qwen3"), ("qwen2", "Qwen2"),
                                            ("mistral", "Mistral")])
def test_liger_patch_is_undone_after_its_rows(family, prefix):
    """Each family's peer gets Liger's patch for that family (bench_train.HF_FAMILIES), undone after."""
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel (a dependency of longctx)")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    sys.path.insert(0, str(SCRIPT.parent))   # where a script finds benchlib when run
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = bench   # where its dataclasses look themselves up
    spec.loader.exec_module(bench)
    model_class = getattr(modeling, f"{prefix}ForCausalLM")
    plain_norm, plain_rope = getattr(modeling, f"{prefix}RMSNorm"), modeling.apply_rotary_pos_emb
    plain_forward = model_class.forward
    with bench.liger_patched(bench.LIGER_KERNELS, family):
        assert getattr(modeling, f"{prefix}RMSNorm") is LigerRMSNorm or \
            issubclass(getattr(modeling, f"{prefix}RMSNorm"), LigerRMSNorm)
        assert modeling.apply_rotary_pos_emb is not plain_rope
        assert model_class.forward is not plain_forward
    assert getattr(modeling, f"{prefix}RMSNorm") is plain_norm and modeling.apply_rotary_pos_emb is plain_rope
    assert model_class.forward is plain_forward


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
    assert len(rows) == 1
    for row in rows:
        assert "error" not in row and row["ms"] > 0, row
        assert row["dp_backend"] == "deepspeed" and row["cpu_offload"] is True
        assert "parallel.zero_stage=2" in row["overrides"].split()


def load_bench():
    sys.path.insert(0, str(SCRIPT.parent))   # where a script finds benchlib when run
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = bench   # where its dataclasses look themselves up
    spec.loader.exec_module(bench)
    return bench


HF_OOM_DRIVER = """
import os, runpy, sys, torch
from transformers.models.llama import modeling_llama
plain = modeling_llama.LlamaForCausalLM.forward
def forward(self, *args, **kwargs):
    if not self.model.gradient_checkpointing:   # HF without checkpointing "runs out of memory"
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return plain(self, *args, **kwargs)
modeling_llama.LlamaForCausalLM.forward = forward
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_settings_like_for_like_and_fastest_fit(tmp_path):
    """fastest_fit: longctx's auto resolved by the planner for the GPU memory given (the resolved
    setting in the row, as plan.choose_checkpointing gives it); the peer tries no checkpointing, runs
    out of memory (simulated), keeps that row and falls back to full, whose measurement is
    like_for_like's (`measured_as`). A mix (train.selective_layers) reaches the builder and the row."""
    from longctx.train.config import register_configs
    from longctx.train.plan import choose_checkpointing
    bench = load_bench()
    register_configs()
    cfg = bench.compose_config("tiny", 64, "bf16_autocast", "auto", "cpu", ["model.vocab_size=2048"])
    chosen = choose_checkpointing(cfg, 1, 80.0, host_gib=64.0)
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", HF_OOM_DRIVER, str(SCRIPT), "--smoke", "--impls", "longctx", "hf",
                             "--precisions", "bf16_autocast", "--settings", "like_for_like", "fastest_fit",
                             "--gpu-gib", "80", "--host-gib", "64", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert set(SHAPE_KEYS) <= set(row) and "error" not in row, row
    got = [(r["setting"], r["impl"], r["checkpoint"], r["selective_layers"], bool(r.get("oom"))) for r in rows]
    assert sorted(got) == sorted([("like_for_like", "longctx", "full", 0, False), ("like_for_like", "hf", "full", 0, False),
                                  ("fastest_fit", "longctx", chosen.mode, chosen.selective_layers, False),
                                  ("fastest_fit", "hf", "none", 0, True), ("fastest_fit", "hf", "full", 0, False)]), got
    by = {(r["setting"], r["impl"], r["checkpoint"]): r for r in rows}
    assert by["fastest_fit", "longctx", chosen.mode]["ms"] > 0
    fallback = by["fastest_fit", "hf", "full"]
    assert fallback["measured_as"] == "like_for_like" and fallback["ms"] == by["like_for_like", "hf", "full"]["ms"]
    assert "fastest_fit" in result.stdout and "ratio" in result.stdout
    mixed = run_script("--smoke", "--impls", "longctx", "--precisions", "bf16_autocast", "--set", "train.selective_layers=1",
                       "--out", str(tmp_path / "mixed.json"))
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    (row,) = json.loads((tmp_path / "mixed.json").read_text())["rows"]
    assert row["checkpoint"] == "full" and row["selective_layers"] == 1 and row["ms"] > 0 and "error" not in row


def test_a_cut_of_the_layers_is_scaled_to_the_whole_depth(tmp_path):
    out = tmp_path / "train.json"
    result = run_script("--smoke", "--impls", "longctx", "--precisions", "bf16_autocast", "--settings", "fastest_fit",
                        "--layers", "1", "--scale", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    cut, scaled = json.loads(out.read_text())["rows"]
    assert cut["layers"] == 1 and "layers_timed" not in cut and cut["ms"] > 0
    assert scaled["layers"] == 2 and scaled["layers_timed"] == 1 and scaled["scaled_from"] == cut["ms"]
    assert scaled["ms"] == 2 * cut["ms"] and scaled["tok_s"] == cut["tok_s"] / 2
    assert scaled["peak_gib"] is None and scaled["plan_gib"] > cut["plan_gib"]
    assert scaled["setting"] == cut["setting"] == "fastest_fit" and scaled["checkpoint"] == cut["checkpoint"]
    refused = run_script("--smoke", "--scale", "--out", str(tmp_path / "t.json"), timeout=120)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith("error: --scale")
