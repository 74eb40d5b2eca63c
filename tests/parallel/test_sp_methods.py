"""Every registered sequence-parallel method, end to end through its record: one training step of
`longctx.check` (the trainer's own build, split, forward-backward and optimizer step against the
plain model on one process: loss, gradient norm and update), the memory planner's term and bytes
per layer, and the one-line config errors for layouts a method cannot run."""
import os

import pytest
import torch

from distributed import run_distributed
from longctx.parallel.registry import methods
from longctx.train.config import REPO_ROOT, ConfigError, register_configs, validate

SOFTMAX = ["model.layer_types=null"]
HYBRID = ["model.layer_types=[linear,softmax]"]
# method -> (overrides on 4 processes); hybrids where the method runs linear layers too
CASES = {
    "ring": ["parallel.sp=2"] + SOFTMAX,
    "lasp": ["parallel.sp=4"] + HYBRID,
    "lasp_allgather": ["parallel.sp=2"] + HYBRID,
    # 4 query heads, 2 KV heads over 4 ranks: each KV head replicated to two ranks
    "ulysses": ["parallel.sp=4"] + HYBRID,
    # Ulysses over pairs of adjacent ranks x a ring of 2
    "usp": ["parallel.sp=4", "parallel.ulysses=2"] + SOFTMAX,
}
COMMON = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
          "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.attention=sdpa",
          "train.seq_len=64", "train.grad_accum=2", "train.precision=fp32", "train.device=cpu",
          "train.threads=1", "parallel.dp_backend=ddp", "logging.progress_bar=false"]


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "configs"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def method_config(name):
    return compose(COMMON + CASES[name] + [f"parallel.sp_method={name}"])


def test_every_registered_method_is_tested_here():
    assert set(CASES) == set(methods())


def _check_worker(rank, world, configs):
    from longctx.check import check
    return {name: check(cfg) for name, cfg in configs.items()}


def test_a_training_step_of_each_method_matches_one_process(monkeypatch):
    """Every method on a CPU without the Triton interpreter: softmax attention on the seam's torch
    backend (model.attention=sdpa), linear attention on its PyTorch paths (the kernels are tested
    apiece)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    configs = {name: method_config(name) for name in CASES}
    reports = run_distributed(_check_worker, 4, configs)[0]
    assert set(reports) == set(configs)
    for name, report in reports.items():
        assert report["sp_method"] == name
        assert report["layout"] == f"dp={4 // configs[name].parallel.sp} x sp={configs[name].parallel.sp}"
        assert not report["missing_params"], name
        assert report["ok"], (name, report)
        # fp32 round-off, far inside the check's own bound
        assert report["loss_rel_diff"] < 1e-5 and report["grad_norm_rel_diff"] < 1e-5, (name, report)


@pytest.mark.parametrize("name", sorted(CASES))
def test_planner_counts_each_method_and_its_traffic(name):
    from longctx.train.plan import estimate, report
    cfg = compose(["model=llama3.2-1b", "train.seq_len=131072", "train.activation_checkpoint=full"]
                  + [o for o in CASES[name] if o.startswith("parallel.")] + [f"parallel.sp_method={name}"])
    method, sp = methods()[name], cfg.parallel.sp
    e = estimate(cfg, sp)
    for part, value in method.memory(cfg.model, cfg.train.seq_len // sp, 2, cfg.parallel).items():
        assert e.parts[part] == value > 0
    assert f"sp {sp} {name}" in report(cfg, sp, 141)
    # traffic grows with the sequence, and a longer sequence per rank never costs less
    for kind in ("softmax", "linear"):
        if method.mixer_for(kind):
            small, large = (method.bytes_per_layer(cfg.model, n, 2, cfg.parallel, kind) for n in (65536, 131072))
            assert 0 < small <= large


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.sp=2", "parallel.sp_method=tree"], 2, "parallel.sp_method='tree': choose one of none, "),
    (["parallel.sp=2", "parallel.sp_method=ring", "model.layer_types=[linear,softmax]", "model.num_hidden_layers=2"],
     2, "parallel.sp_method=ring cannot run the model's linear attention layers: use one of lasp, lasp_allgather"),
    (["parallel.sp=2", "parallel.sp_method=ring", "train.seq_len=1002"], 2,
     "train.seq_len=1002 is not a multiple of 4, which ring over sp=2 needs; use train.seq_len=1004"),
    (["parallel.sp=2", "parallel.sp_method=lasp", "train.seq_len=1001"], 2,
     "train.seq_len=1001 is not a multiple of 2, which lasp over sp=2 needs"),
    (["parallel.lasp_variant=allgather"], 1, "set parallel.sp_method=lasp .* or lasp_allgather"),
    (["parallel.sp=4", "parallel.sp_method=ulysses", "model.num_attention_heads=6", "model.num_key_value_heads=2",
      "model.hidden_size=48"], 4, "parallel.sp_method=ulysses over 4 Ulysses ranks: Ulysses splits the 6 query "
                                  "heads over 4 ranks"),
    (["parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses=3"], 4,
     "parallel.sp_method=usp needs parallel.ulysses \\(now 3\\) between 2 and sp/2 dividing parallel.sp=4"),
    (["parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses=4"], 4, "for ulysses = sp use sp_method=ulysses"),
    (["parallel.sp=4", "parallel.sp_method=ring", "parallel.ulysses=2"], 4,
     "parallel.ulysses=2 is read by sp_method=usp only \\(now ring\\): set the method, or drop parallel.ulysses"),
    (["parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses=2", "model.layer_types=[linear,softmax]",
      "model.num_hidden_layers=2"], 4, "parallel.sp_method=usp cannot run the model's linear attention layers: "
                                       "use one of lasp, lasp_allgather, ulysses"),
])
def test_impossible_layouts_are_one_line_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(compose(overrides), world)
    assert "\n" not in str(error.value)


def test_every_method_validates_on_a_cpu_without_the_interpreter(monkeypatch):
    """No method needs the Triton kernels any more: Ulysses' whole-sequence call runs on the seam's
    torch backend on a CPU."""
    import longctx.ops.dispatch as dispatch
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    assert not any(method.needs_kernel for method in methods().values())
    validate(compose(["parallel.sp=2", "parallel.sp_method=ulysses", "train.device=cpu"]), 2)
    validate(compose(["parallel.sp_method=usp", "parallel.sp=4", "parallel.ulysses=2", "train.device=cpu"]), 4)


def test_the_bytes_table_script_reads_the_registry():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "sp_bytes.py"), "--gpus", "8"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0, out.stderr
    for name in CASES:
        assert f"| {name}" in out.stdout, out.stdout


def test_one_per_step_cache_serves_every_layer(monkeypatch):
    """The ring plan is made once per cu_seqlens tensor, however many layers read it (one cache,
    `model.attention.per_step`, as for LASP's shard view and the host bounds); a new tensor (the
    next step) or an in-place change makes it again."""
    from longctx.model import Llama, ModelConfig
    from longctx.model.attention import with_host_bounds
    import longctx.parallel.ring as ring
    made, real = [], ring.ring_plan
    monkeypatch.setattr(ring, "ring_plan", lambda *a: made.append(a) or real(*a))
    model = Llama(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, attention="ring"))
    ids = torch.randint(0, 32, (1, 12))
    cu = with_host_bounds(torch.tensor([0, 5, 12], dtype=torch.int32), "cpu")
    model(ids, cu_seqlens=cu)
    model(ids, cu_seqlens=cu)
    assert len(made) == 1
    following = with_host_bounds(torch.tensor([0, 7, 12], dtype=torch.int32), "cpu")
    model(ids, cu_seqlens=following)
    assert len(made) == 2
    following[1] = 6
    model(ids, cu_seqlens=following)
    assert len(made) == 3


def test_check_runs_the_trainers_step(monkeypatch, tmp_path):
    """`longctx.check` runs the trainer's forward_backward and autocast for both sides: the layout's
    and, with sums that stay on one process, the reference's."""
    from longctx import check as check_module
    import longctx.train.train as T
    calls, real = [], T.forward_backward
    monkeypatch.setattr(T, "forward_backward", lambda *a, **k: calls.append((a[3], k)) or real(*a, **k))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = compose(COMMON + ["train.precision=bf16_autocast", "train.grad_accum=1"])
    report = check_module.check(cfg)
    assert report["ok"], report
    assert len(calls) == 2 and all(isinstance(autocast, torch.autocast) for autocast, _ in calls)
    assert "reduce" not in calls[0][1] and calls[1][1]["reduce"](torch.ones(())) == 1
