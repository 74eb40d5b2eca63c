"""LoRA through the trainer (one process, random base): a run resumed from a checkpoint continues
exactly; the checkpoints hold the adapters, the trainable modules and their optimizer state but
not the frozen base (rebuilt from train.seed: a resume with another seed is refused); the export
is peft's adapter folder beside a Hugging Face folder, merged or the base, that transformers and
peft load to the same logits."""
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from test_train import SMALL, compose_config, losses

from longctx.train.config import ConfigError
from longctx.train.train import train

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=16", "lora.trainable=[norm]", "model.tie_word_embeddings=false",
        "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1", "optim.lr=1e-2"]


def test_resume_is_exact_and_exports_load_in_transformers_and_peft(tmp_path):
    import transformers
    from peft import PeftModel
    straight = train(compose_config(SMALL + LORA + [f"run_dir={tmp_path}/straight"]))
    resumed = train(compose_config(SMALL + LORA + [
        f"run_dir={tmp_path}/resumed", f"train.resume={straight}/checkpoints/step_00000002",
        "lora.merge_on_export=false", "train.activation_checkpoint=full"]))
    reseeded = SMALL + LORA + [f"run_dir={tmp_path}/reseeded", "train.seed=1",
                               f"train.resume={straight}/checkpoints/step_00000002"]
    with pytest.raises(ConfigError, match=r"other settings: train.seed 0 -> 1"):
        train(compose_config(reseeded))
    # forcing the other settings cannot stand in for a frozen base that checkpoints do not store
    with pytest.raises(ConfigError, match=r"over the frozen base \{'seed': 0, .*this run builds \{'seed': 1, "):
        train(compose_config(reseeded + ["train.resume_force=true"]))
    by_step = losses(straight)
    assert sorted(by_step) == [1, 2, 3, 4] and len(set(by_step.values())) == 4
    assert losses(resumed) == {3: by_step[3], 4: by_step[4]}   # bitwise on CPU

    saved = dcp.FileSystemReader(straight / "checkpoints" / "step_00000004").read_metadata().state_dict_metadata
    model_keys = {k[len("model."):] for k in saved if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k or k.endswith("norm.weight") for k in model_keys)
    assert len(model_keys) == 2 * (7 * 2 + 2) + 1
    assert any(k.startswith("optim.state.") and "lora_B" in k and k.endswith("exp_avg") for k in saved)

    adapter_config = json.loads((resumed / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 16
    assert adapter_config["modules_to_save"] == ["norm"] and adapter_config["peft_type"] == "LORA"
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM.from_pretrained(straight / "hf")(input_ids=ids).logits
        base = transformers.LlamaForCausalLM.from_pretrained(resumed / "hf")   # merge_on_export=false: the base
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, resumed / "adapter")(input_ids=ids).logits
    assert (merged - base_logits).abs().max() > 1e-3   # training moved the model away from its base
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-4)


def test_a_tied_embedding_lora_checkpoint_holds_only_trained_tensors(tmp_path):
    """With tied embeddings the frozen lm_head is the embedding under a second name: DCP kept it,
    and the checkpoint of a LoRA run was the whole embedding. Now only adapters and the trained
    modules, and the resume is still exact."""
    tied = [o for o in LORA if not o.startswith("model.tie_word_embeddings")] + ["model.tie_word_embeddings=true",
                                                                               "checkpoint.export_hf=false"]
    straight = train(compose_config(SMALL + tied + [f"run_dir={tmp_path}/straight"]))
    saved = dcp.FileSystemReader(straight / "checkpoints" / "step_00000002").read_metadata().state_dict_metadata
    model_keys = {k[len("model."):] for k in saved if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k or k.endswith("norm.weight") for k in model_keys)
    resumed = train(compose_config(SMALL + tied + [f"run_dir={tmp_path}/resumed",
                                                   f"train.resume={straight}/checkpoints/step_00000002"]))
    assert losses(resumed) == {3: losses(straight)[3], 4: losses(straight)[4]}
