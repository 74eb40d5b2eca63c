"""ShareGPT data: read and clean, template and mask, pack to long sequences, load resumably.

    from longctx.data import DataConfig, build_loader, read_sharegpt
    conversations, report = read_sharegpt("data/sharegpt_sample.json")
    loader = build_loader(DataConfig(), seq_len=2048, micro_batch=1, dp_rank=0, dp_size=1)
    batch = next(loader)   # input_ids, labels, position_ids [1, 2048]; cu_seqlens int32

`datasets` and `transformers` are imported only when data has to be tokenized, so loading a
prepared cache starts fast.
"""
from .config import DataConfig
from .long_examples import LongExamplesConfig
from .text import read_text_documents
from .loader import PackedLoader, build_loader
from .packing import IGNORE_INDEX, TokenStore
from .cache import cache_path, format_report, prepare
from .sharegpt import DataError, read_sharegpt
from .template import CHATML_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE, render_chatml, render_llama3, tokenize_conversations

__all__ = ["DataConfig", "DataError", "build_loader", "read_sharegpt", "PackedLoader", "TokenStore", "IGNORE_INDEX",
           "prepare", "cache_path", "format_report", "tokenize_conversations", "render_llama3",
           "LLAMA3_CHAT_TEMPLATE", "render_chatml", "CHATML_CHAT_TEMPLATE", "LongExamplesConfig",
           "read_text_documents"]
