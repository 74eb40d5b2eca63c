"""MFU's FLOP count: attention is counted within the packed documents, as the kernel computes it."""
import pytest
import torch

from longctx.model import ModelConfig
from longctx.train.metrics import training_flops, training_flops_per_token


def test_packed_documents_count_attention_within_each_document():
    config = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, layer_types=["softmax", "linear", "softmax"])
    matmuls = 6 * (config.num_parameters(embeddings=False) + 100 * 64)
    per_square = 3 * 0.5 * 4 * 4 * config.head_dim * 2        # 2 softmax layers
    packed = training_flops(config, torch.tensor([0, 300, 1000, 1024], dtype=torch.int32))
    assert packed == pytest.approx(matmuls * 1024 + per_square * (300**2 + 700**2 + 24**2), rel=1e-12)
    whole = training_flops_per_token(config, 1024) * 1024
    assert whole == pytest.approx(matmuls * 1024 + per_square * 1024**2, rel=1e-12)
    assert packed < whole
