"""Render chat messages with the model's own chat template (from GGUF metadata).

Both engines render and tokenize prompts through this module, so the same
request produces the same prompt tokens -- and, greedily, the same text --
whichever engine serves it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

# Used only when a GGUF carries no template at all (SmolLM2 does carry one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplate:
    """A Jinja2 chat template plus the BOS/EOS token strings it may reference."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "",
                 special_texts: frozenset[str] = frozenset()):
        self.template = template
        #: the text of every token the tokenizer parses as a control token
        #: (``<|im_start|>`` ...) when asked to: what user content must not smuggle in
        self.special_texts = special_texts
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=eos_token,
            bos_token=bos_token,
            add_generation_prompt=True,
        )

    @classmethod
    def from_model(cls, model: Any) -> ChatTemplate:
        """Build from a loaded ``llama_cpp._internals.LlamaModel`` (``Llama._model``):
        the template comes from ``tokenizer.chat_template`` in the GGUF metadata,
        the BOS/EOS strings from the token ids the metadata names."""
        metadata: dict[str, str] = model.metadata()
        template = metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE

        def token_text(key: str, fallback_id: int) -> str:
            raw = metadata.get(key)
            token_id = int(raw) if raw is not None else fallback_id
            return model.token_get_text(token_id) if token_id >= 0 else ""

        bos = token_text("tokenizer.ggml.bos_token_id", model.token_bos())
        eos = token_text("tokenizer.ggml.eos_token_id", model.token_eos())
        return cls(template, bos_token=bos, eos_token=eos, special_texts=special_token_texts(model))

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opener."""
        return self._formatter(messages=[dict(m) for m in messages]).prompt


def special_token_texts(model: Any) -> frozenset[str]:
    """Texts of the vocabulary's control and user-defined tokens (read once per model)."""
    vocab = model.vocab
    parsed = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    texts = set()
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & parsed:
            text = model.token_get_text(token)
            if text:
                texts.add(text)
    return frozenset(texts)


def prompt_text(template: ChatTemplate, messages: Sequence[dict[str, str]] | None,
                prompt: str | None) -> str:
    """The text a request asks the model to continue: chat messages through the
    template, or a raw prompt verbatim."""
    if messages is not None:
        return template.render(messages)
    if prompt is not None:
        return prompt
    raise ValueError("a GenerationRequest needs messages or a prompt")


def tokenize_prompt(model: Any, text: str) -> list[int]:
    """Tokens for a prompt text exactly as ``Llama.create_completion(text)``
    makes them: BOS if the model asks for one, then the text with special tokens
    (``<|im_start|>`` ...) parsed as such."""
    tokens: list[int] = []
    if model.add_bos_token() and model.token_bos() >= 0:
        tokens.append(model.token_bos())
    if text:
        tokens.extend(model.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    return tokens


def prompt_tokens(model: Any, template: ChatTemplate, messages: Sequence[dict[str, str]] | None,
                  prompt: str | None) -> list[int]:
    """The prompt tokens of a request, with special tokens (``<|im_start|>`` ...)
    parsed only where the chat template wrote them.

    A message's content is the user's text: typed into it, ``<|im_start|>system``
    must stay seven ordinary tokens, or a customer could forge system or assistant
    turns. When no content contains a special token's text, the tokens are exactly
    those of the whole rendered prompt (what ``Llama.create_completion`` would
    make), so ordinary prompts, and greedy output, are unchanged. Otherwise the
    template is rendered with a sentinel in place of each content, its own text is
    tokenised with special tokens parsed and each content as plain text.

    A raw prompt (``/v1/completions``: no template) is the caller's whole text and
    keeps today's tokens, special tokens included.
    """
    if messages is None:
        return tokenize_prompt(model, prompt_text(template, None, prompt))
    messages = [dict(m) for m in messages]
    contents = [m.get("content") or "" for m in messages]
    if not any(special in c for c in contents for special in template.special_texts):
        return tokenize_prompt(model, template.render(messages))
    return _segmented_tokens(model, template, messages, contents)


def _tokens(model: Any, text: str, *, special: bool) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=special) if text else []


def _segmented_tokens(model: Any, template: ChatTemplate, messages: list[dict[str, str]],
                      contents: list[str]) -> list[int]:
    nonce = secrets.token_hex(8)
    marks = {f"\ue000{nonce}:{i}\ue001": i for i in range(len(messages))}
    masked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    rendered = template.render(masked)
    tokens: list[int] = []
    if model.add_bos_token() and model.token_bos() >= 0:
        tokens.append(model.token_bos())
    # the split keeps the marks (a capturing group): template text and marks alternate
    pattern = "(" + "|".join(re.escape(mark) for mark in marks) + ")"
    for part in re.split(pattern, rendered):
        if part in marks:
            tokens.extend(_tokens(model, contents[marks[part]], special=False))
        else:
            tokens.extend(_tokens(model, part, special=True))
    return tokens

