"""model.rope_theta / rope_scaling / max_position_embeddings over a pretrained checkpoint: unset, the
checkpoint's values stand (not the model group's); set, they replace them in the model trained."""
import torch

from test_train import compose_config

from longctx.model import Llama, ModelConfig, save_hf
from longctx.train.config import model_shape
from longctx.train.train import build_model


def checkpoint(tmp_path):
    config = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=12345.0, max_position_embeddings=512)
    save_hf(Llama(config), tmp_path / "hf")
    return tmp_path / "hf"


def test_unset_keeps_the_checkpoints_rope(tmp_path):
    cfg = compose_config([f"model.pretrained={checkpoint(tmp_path)}"])
    shape = model_shape(cfg)
    assert (shape.rope_theta, shape.rope_scaling, shape.max_position_embeddings) == (12345.0, None, 512)
    tiny = model_shape(compose_config([]))   # without a checkpoint: ModelConfig's defaults
    assert (tiny.rope_theta, tiny.max_position_embeddings) == (500000.0, 8192)


def test_overrides_reach_the_model(tmp_path):
    cfg = compose_config([f"model.pretrained={checkpoint(tmp_path)}", "model.rope_theta=20000",
                          "model.max_position_embeddings=2048", "model.rope_scaling={rope_type:yarn,factor:4.0}"])
    model = build_model(cfg, torch.device("cpu"))
    assert model.config.rope_theta == 20000.0 and model.config.max_position_embeddings == 2048
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    cos, _ = model.rotary(torch.zeros(1, 1, dtype=torch.long), torch.float32)
    assert cos[0, 0, 0, 0].item() == torch.tensor(0.1 * torch.log(torch.tensor(4.0)).item() + 1).item()  # YaRN's factor
