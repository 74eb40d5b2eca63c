"""Every sequence-parallel method on each family's own fields: one training step of `longctx.check`
(the trainer's build, split, forward-backward and optimizer step on 4 gloo processes) equals the plain
model on one process. Qwen2's q/k/v biases, Qwen3's per-head q/k norms with an explicit head_dim
(normalised in `project`, before Ulysses' all-to-all: the same on any subset of heads), Mistral with a
single KV head; GQA with fewer KV heads than the 4 Ulysses ranks throughout."""
import pytest

from distributed import run_distributed
from test_sp_methods import COMMON, HYBRID, SOFTMAX, compose

# the Triton kernel (under the interpreter) is run through one method too; every method runs on the
# attention seam's PyTorch backend without it
KERNEL_METHODS = {"ulysses"}

FAMILIES = {
    "qwen2": ["model.family=qwen2", "model.attention_bias=true"],
    "qwen3": ["model.family=qwen3", "model.qk_norm=true", "model.head_dim=16"],
    "mistral": ["model.family=mistral", "model.num_key_value_heads=1", "model.head_dim=16"],
}
# the softmax layers of each method (LASP's through allgather_kv, beside a linear layer)
METHODS = {
    "ring": ["parallel.sp=2"] + SOFTMAX,
    "ulysses": ["parallel.sp=4"] + SOFTMAX,
    "usp": ["parallel.sp=4", "parallel.ulysses=2"] + SOFTMAX,
    "lasp": ["parallel.sp=4"] + HYBRID,
}
# the checkpointing paths on one method each: selective recomputes project() (the norms) around the mixer
EXTRA = {("qwen3", "ring"): ["train.activation_checkpoint=selective"],
         ("qwen2", "usp"): ["train.activation_checkpoint=full"]}


def _check_worker(rank, world, configs):
    from longctx.check import check
    return {name: check(cfg) for name, cfg in configs.items()}


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch-paths", "kernel-paths"])
def test_a_step_of_each_method_on_each_family_matches_one_process(monkeypatch, kernel):
    if not kernel:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backend = ["model.attention=triton"] if kernel else ["model.attention=torch"]
    configs = {(family, method): compose(COMMON + METHODS[method] + FAMILIES[family] + EXTRA.get((family, method), [])
                                         + [f"parallel.sp_method={method}"] + backend)
               for family in FAMILIES for method in METHODS if not kernel or method in KERNEL_METHODS}
    reports = run_distributed(_check_worker, 4, configs)[0]
    assert set(reports) == set(configs)
    for (family, method), report in reports.items():
        assert report["sp_method"] == method and not report["missing_params"], (family, method)
        assert report["ok"], (family, method, report)
        assert report["loss_rel_diff"] < 1e-5 and report["grad_norm_rel_diff"] < 1e-5, (family, method, report)
