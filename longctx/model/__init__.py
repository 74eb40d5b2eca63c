"""The LLaMA-style model, its config, and Hugging Face checkpoint import/export."""
from .attention import get_attention, get_linear_attention, register_attention, register_linear_attention
from .config import ModelConfig
from .hf import load_hf, save_hf
from .llama import CausalLMOutput, Llama

__all__ = ["ModelConfig", "Llama", "CausalLMOutput", "load_hf", "save_hf", "register_attention",
           "register_linear_attention", "get_attention", "get_linear_attention"]
