"""The built-in ChatML format (Qwen2/2.5/3, SmolLM2) and what "auto" picks for a ChatML tokenizer."""
import pytest

from longctx.data import tokenize_conversations
from longctx.data.template import (CHATML_CHAT_TEMPLATE, export_tokenizer, render_chatml,
                                   resolve_chat_template, stop_token_ids)

CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, of course. ✓"},
    {"role": "user", "content": "And in Roman numerals?"},
    {"role": "assistant", "content": "IV"},
]
# Qwen3's template in the respect that matters here: the last reply gets an empty <think> block, so
# the rendering of a prefix of a conversation is not a prefix of the whole
QWEN3_LIKE = ("{%- for m in messages %}{%- if m['role'] == 'assistant' and loop.last %}"
              "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
              "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
              "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")


def chatml_tokenizer(template=None):
    """The repository's tokenizer with ChatML's two special tokens added (no hub here)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("data/tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def test_chatml_text_spans_and_its_jinja_template_agree():
    rendered = render_chatml(CONVERSATION)
    assert rendered.text == ("<|im_start|>system\nYou answer in one line.<|im_end|>\n"
                             "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                             "<|im_start|>assistant\n4, of course. ✓<|im_end|>\n"
                             "<|im_start|>user\nAnd in Roman numerals?<|im_end|>\n"
                             "<|im_start|>assistant\nIV<|im_end|>\n")
    assert [rendered.text[a:b] for a, b in rendered.reply_spans] == ["4, of course. ✓<|im_end|>", "IV<|im_end|>"]
    assert [rendered.text[s:s + 15] for s in rendered.user_starts] == ["<|im_start|>use"] * 2
    tok = chatml_tokenizer(CHATML_CHAT_TEMPLATE)   # the template an export carries renders the same text
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == rendered.text


def test_auto_takes_chatml_where_the_tokenizers_template_cannot_be_located():
    tok = chatml_tokenizer(QWEN3_LIKE)
    assert resolve_chat_template(tok, "auto") == "chatml"
    with pytest.raises(ValueError, match="renders a prefix of a conversation differently"):
        tokenize_conversations([CONVERSATION], tok, chat_template="tokenizer")
    columns = tokenize_conversations([CONVERSATION], tok, chat_template="auto")
    ids, mask = columns["input_ids"][0], columns["loss_mask"][0]
    assert tok.decode(ids.tolist(), clean_up_tokenization_spaces=False) == render_chatml(CONVERSATION).text
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    counted = tok.decode(ids[mask == 1].tolist(), clean_up_tokenization_spaces=False)
    assert counted == "4, of course. ✓<|im_end|>IV<|im_end|>"
    assert int(mask[ids == im_end].sum()) == 2   # the replies' ends count, the other turns' do not
    # a ChatML template that renders prefixes as prefixes is used as it is
    assert resolve_chat_template(chatml_tokenizer(CHATML_CHAT_TEMPLATE), "auto") == "tokenizer"
    # the export carries the format the conversations were rendered in, and stops at <|im_end|>
    exported = export_tokenizer(tok, "auto")
    assert exported.chat_template == CHATML_CHAT_TEMPLATE
    assert im_end in stop_token_ids(exported)


def test_chatml_without_its_tokens_is_a_one_line_error():
    from transformers import AutoTokenizer
    with pytest.raises(ValueError, match=r"the built-in chatml format needs the special tokens \['<\|im_start\|>'"):
        resolve_chat_template(AutoTokenizer.from_pretrained("data/tokenizer"), "chatml")
