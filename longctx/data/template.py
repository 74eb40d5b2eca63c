"""Chat templates and loss masks: a clean conversation -> token ids, a loss mask, turn boundaries.

A conversation is rendered to text together with the character spans that count for the loss
(each assistant reply and its end-of-turn marker) and the character offsets where each user turn
starts. The text is tokenized once, with offsets, and a token counts for the loss when its first
character lies in a loss span. So the mask follows the very tokens the model sees, and decoding
the ids gives back the rendered text.

Three renderers:
- "llama3": the built-in Llama-3 format
      <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...
  (`LLAMA3_CHAT_TEMPLATE` is the same format as a Jinja template).
- "chatml": the built-in ChatML format of Qwen2/2.5/3 and SmolLM2
      <|im_start|>{role}\\n{content}<|im_end|>\\n...
  (`CHATML_CHAT_TEMPLATE` as a Jinja template).
- "tokenizer": the tokenizer's own `chat_template`. Spans are found by rendering growing prefixes
  of the conversation (a reply starts where the generation prompt of the turns before it ends),
  which needs a template whose output for a prefix of the turns is a prefix of the output.

"auto" takes the tokenizer's own template where it renders prefixes so; else ChatML for a tokenizer
with ChatML's tokens (Qwen3's template renders the last reply with an empty <think> block, so a
conversation's prefix is not a prefix of it), else the Llama-3 format.

Loss masks: "assistant" (every reply), "last" (the last reply only), "all" (every token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHAT_TEMPLATES = ("auto", "llama3", "chatml", "tokenizer")
LOSS_MASKS = ("assistant", "last", "all")
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")

LLAMA3_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Rendered:
    text: str
    reply_spans: list[tuple[int, int]]  # [start, end) characters of each assistant reply + end of turn
    user_starts: list[int]               # character offset where each user turn (its header) starts


def _render_turns(conversation: list[dict], begin: str, header: str, end: str, after: str = "") -> Rendered:
    """A template of fixed strings: `begin`, then per message `header` (with its role), the content,
    `end` and `after`. A reply's loss span is its content and `end` (not `after`, which generation
    never produces: it stops at `end`)."""
    parts, pos, spans, starts = [begin], len(begin), [], []
    for message in conversation:
        head = header.format(role=message["role"])
        body = message["content"] + end
        if message["role"] == "user":
            starts.append(pos)
        elif message["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += (head, body, after)
        pos += len(head) + len(body) + len(after)
    return Rendered("".join(parts), spans, starts)


def render_llama3(conversation: list[dict]) -> Rendered:
    return _render_turns(conversation, "<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n",
                         "<|eot_id|>")


def render_chatml(conversation: list[dict]) -> Rendered:
    """ChatML: the newline after <|im_end|> is the template's, outside the reply's loss span."""
    return _render_turns(conversation, "", "<|im_start|>{role}\n", "<|im_end|>", after="\n")


def render_with_template(conversation: list[dict], tokenizer, template: str | None = None) -> Rendered:
    """Render with a Jinja chat template (the tokenizer's own when `template` is None)."""
    def render(messages, generation_prompt=False):
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(conversation)
    spans, starts = [], []
    for i, message in enumerate(conversation):
        before = render(conversation[:i], generation_prompt=message["role"] == "assistant")
        through = render(conversation[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the tokenizer's chat_template renders a prefix of a conversation differently from "
                "the start of the whole conversation, so the loss mask cannot be located; use the "
                "built-in format instead (data.chat_template=llama3)")
        if message["role"] == "user":
            starts.append(len(render(conversation[:i])))
        elif message["role"] == "assistant":
            spans.append((len(before), len(through)))
    return Rendered(text, spans, starts)


def resolve_chat_template(tokenizer, chat_template: str) -> str:
    """"llama3" or "tokenizer": what "auto" means for this tokenizer, checked to be usable."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat_template {chat_template!r}; expected one of {CHAT_TEMPLATES}")
    own = getattr(tokenizer, "chat_template", None)
    if chat_template == "auto":
        chatml = not _missing(tokenizer, CHATML_SPECIAL_TOKENS)
        if own and (not chatml or renders_prefixes(tokenizer)):
            chat_template = "tokenizer"   # where it cannot locate the replies, its own error says so
        else:
            chat_template = "chatml" if chatml else "llama3"
    if chat_template == "tokenizer" and not own:
        raise ValueError("data.chat_template=tokenizer, but the tokenizer has no chat_template; "
                         "use data.chat_template=llama3 or chatml (or auto)")
    for name, tokens in (("llama3", LLAMA3_SPECIAL_TOKENS), ("chatml", CHATML_SPECIAL_TOKENS)):
        missing = _missing(tokenizer, tokens) if chat_template == name else []
        if missing:
            raise ValueError(f"the built-in {name} format needs the special tokens {missing}, which "
                             f"this tokenizer lacks; use a tokenizer with a chat_template and "
                             f"data.chat_template=tokenizer")
    return chat_template


def _missing(tokenizer, tokens) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t for t in tokens if t not in vocab]


_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
          {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
          {"role": "assistant", "content": "a2"}]
_RENDERS_PREFIXES: dict[str, bool] = {}   # chat_template text -> whether it renders prefixes as prefixes


def renders_prefixes(tokenizer) -> bool:
    """Whether the tokenizer's chat_template renders each prefix of a two-exchange conversation as a
    prefix of the whole (what `render_with_template` needs to locate the replies)."""
    template = tokenizer.chat_template
    if template not in _RENDERS_PREFIXES:
        try:
            render_with_template(_PROBE, tokenizer)
            _RENDERS_PREFIXES[template] = True
        except Exception:   # the prefix check, or a template that refuses the probe (e.g. no system role)
            _RENDERS_PREFIXES[template] = False
    return _RENDERS_PREFIXES[template]


def export_tokenizer(tokenizer, chat_template: str):
    """`tokenizer` carrying the chat template its conversations were rendered with in training, so
    that a saved copy formats chats (`apply_chat_template`, `pipeline`) as the model learned them."""
    resolved = resolve_chat_template(tokenizer, chat_template)
    if resolved != "tokenizer":
        tokenizer.chat_template = {"llama3": LLAMA3_CHAT_TEMPLATE, "chatml": CHATML_CHAT_TEMPLATE}[resolved]
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a generation: the end of the text and the end of a chat turn (as in the
    generation_config.json of Meta's and Qwen's instruct checkpoints)."""
    vocab = tokenizer.get_vocab()
    names = [tokenizer.eos_token, "<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]
    return list(dict.fromkeys(vocab[name] for name in names if name in vocab))


def _render(conversation, tokenizer, chat_template: str) -> Rendered:
    if chat_template == "llama3":
        return render_llama3(conversation)
    if chat_template == "chatml":
        return render_chatml(conversation)
    return render_with_template(conversation, tokenizer)


def _encode(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids int32, start character of each token) per text, with no special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer: parallel, and no Python lists of dicts
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [(np.asarray(e.ids, dtype=np.int32),
                 np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]) for e in encodings]
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0])
            for ids, offsets in zip(out["input_ids"], out["offset_mapping"])]


def loss_mask_of(token_starts: np.ndarray, spans: list[tuple[int, int]], loss_mask: str) -> np.ndarray:
    """1 for the tokens whose first character lies in a counted span."""
    mask = np.zeros(len(token_starts), dtype=np.int8)
    if loss_mask == "all":
        mask[:] = 1
        return mask
    if loss_mask == "last":
        spans = spans[-1:]
    for start, end in spans:
        first, stop = np.searchsorted(token_starts, [start, end], side="left")
        mask[first:stop] = 1
    return mask


def tokenize_conversations(conversations: list[list[dict]], tokenizer, chat_template: str = "auto",
                           loss_mask: str = "assistant") -> dict[str, list]:
    """Format and tokenize a batch of clean conversations (the `datasets.map` function).

    Returns columns: input_ids (int32), loss_mask (int8, 1 where the token counts for the loss),
    exchange_starts (token index of each user turn: where a long conversation may be cut),
    length and loss_tokens.
    """
    if loss_mask not in LOSS_MASKS:
        raise ValueError(f"unknown loss_mask {loss_mask!r}; expected one of {LOSS_MASKS}")
    chat_template = resolve_chat_template(tokenizer, chat_template)
    rendered = [_render(c, tokenizer, chat_template) for c in conversations]
    columns = {"input_ids": [], "loss_mask": [], "exchange_starts": [], "length": [], "loss_tokens": []}
    for r, (ids, starts) in zip(rendered, _encode(tokenizer, [r.text for r in rendered])):
        mask = loss_mask_of(starts, r.reply_spans, loss_mask)
        columns["input_ids"].append(ids)
        columns["loss_mask"].append(mask)
        columns["exchange_starts"].append(np.searchsorted(starts, r.user_starts).astype(np.int32))
        columns["length"].append(len(ids))
        columns["loss_tokens"].append(int(mask.sum()))
    return columns
