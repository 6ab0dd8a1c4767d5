"""Render chat messages with the model's own chat template (from GGUF metadata).

Both engines render and tokenize prompts through this module, so the same
request produces the same prompt tokens -- and, greedily, the same text --
whichever engine serves it.
"""

from __future__ import annotations

import re
import secrets
import threading
from array import array
from collections import OrderedDict
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
    def from_model(cls, model: Any, specials: Sequence[tuple[int, str]] | None = None) -> ChatTemplate:
        """Build from a loaded ``llama_cpp._internals.LlamaModel`` (``Llama._model``):
        the template comes from ``tokenizer.chat_template`` in the GGUF metadata,
        the BOS/EOS strings from the token ids the metadata names. ``specials``:
        the model's :func:`special_tokens`, if already read (a pass over the
        whole vocabulary)."""
        metadata: dict[str, str] = model.metadata()
        template = metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE

        def token_text(key: str, fallback_id: int) -> str:
            raw = metadata.get(key)
            token_id = int(raw) if raw is not None else fallback_id
            return model.token_get_text(token_id) if token_id >= 0 else ""

        bos = token_text("tokenizer.ggml.bos_token_id", model.token_bos())
        eos = token_text("tokenizer.ggml.eos_token_id", model.token_eos())
        parsed = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        specials = special_tokens(model) if specials is None else specials
        texts = frozenset(text for attr, text in specials if attr & parsed)
        return cls(template, bos_token=bos, eos_token=eos, special_texts=texts)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opener."""
        return self._formatter(messages=[dict(m) for m in messages]).prompt


def special_tokens(model: Any) -> list[tuple[int, str]]:
    """(attributes, text) of each token that llama.cpp cuts a text at, with special
    tokens parsed, before tokenizing the stretches between them: its control,
    user-defined and unknown tokens (``cache_special_tokens`` in its vocabulary code)."""
    vocab = model.vocab
    cut_at = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
              | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
    found = []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & cut_at:
            text = model.token_get_text(token)
            if text:
                found.append((attr, text))
    return found


def prompt_text(template: ChatTemplate, messages: Sequence[dict[str, str]] | None,
                prompt: str | None) -> str:
    """The text a request asks the model to continue: chat messages through the
    template, or a raw prompt verbatim."""
    if messages is not None:
        return template.render(messages)
    if prompt is not None:
        return prompt
    raise ValueError("a GenerationRequest needs messages or a prompt")


class PromptTokenizer:
    """One model's prompt tokenizer, which tokenizes the text a prompt shares
    with earlier ones only once.

    llama.cpp cuts a text at its special tokens and tokenizes each stretch of
    text between them on its own (``tokenizer_st_partition`` in its vocabulary
    code). So a prompt's tokens are those of its pieces, each piece ending just
    after a special token, put together, and a piece seen before can be looked
    up: the chat template's own text, and a system prompt sent with every call.
    A 1,400-token system prompt took 2.9 ms to tokenize on each call, before the
    model could start, while the KV cache lets the model skip those tokens
    (bench/RESULTS.md).

    That holds only where llama.cpp cannot cut a text anywhere else: a SPM or
    BPE vocabulary (the others do not tokenize fragments independently), no
    special token that strips the whitespace beside it, and no two special texts
    that could overlap (one inside another, or one's end another's start).
    Other vocabularies are tokenized whole, as before.
    """

    def __init__(self, model: Any, specials: Sequence[tuple[int, str]] | None = None,
                 budget_chars: int = 2_000_000):
        #: the ``llama_cpp._internals.LlamaModel`` whose vocabulary this is
        self.model = model
        self._vocab = model.vocab
        self.bos: list[int] = [model.token_bos()] if model.add_bos_token() and model.token_bos() >= 0 else []
        self._cuts = _cutting_pattern(model, special_tokens(model) if specials is None else specials)
        self._budget = budget_chars
        # least recently used first; 4 bytes a token (a list of ints took 36)
        self._pieces: OrderedDict[str, array[int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def prompt(self, text: str) -> list[int]:
        """The tokens of a prompt text: BOS if the model asks for one, then the
        text with special tokens (``<|im_start|>`` ...) parsed as such, exactly
        as one call to llama.cpp for the whole text makes them
        (``Llama.create_completion(text)``)."""
        return self.bos + self.tokens(text, special=True)

    def tokens(self, text: str, *, special: bool) -> list[int]:
        """The tokens of ``text``; ``special``: whether special tokens' texts
        become those tokens (the chat template's text) or stay plain text (a user's)."""
        if not special or self._cuts is None:
            return self._tokenize(text, special)
        tokens: list[int] = []
        start = 0
        for cut in self._cuts.finditer(text):
            tokens += self._piece(text[start:cut.end()])
            start = cut.end()
        if start < len(text):
            tokens += self._piece(text[start:])
        return tokens

    @property
    def remembered_chars(self) -> int:
        """The characters of the pieces remembered (at most ``budget_chars``)."""
        return self._chars

    def _piece(self, piece: str) -> array[int] | list[int]:
        with self._lock:
            known = self._pieces.get(piece)
            if known is not None:
                self._pieces.move_to_end(piece)
                return known
        tokens = self._tokenize(piece, True)
        if len(piece) <= self._budget // 8:  # one huge prompt does not empty the cache
            with self._lock:
                if piece not in self._pieces:
                    self._pieces[piece] = array("i", tokens)
                    self._chars += len(piece)
                while self._chars > self._budget:
                    self._chars -= len(self._pieces.popitem(last=False)[0])
        return tokens

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        data = text.encode("utf-8")
        size = len(data) + 2  # a token covers at least a byte; SPM may add a space
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, size, False, special)
            if n >= 0:
                return buf[:n]
            size = -n


def _cutting_pattern(model: Any, specials: Sequence[tuple[int, str]]) -> re.Pattern[str] | None:
    """A pattern matching every special token's text in a prompt, where the
    pieces it cuts are tokenized exactly as the whole (:class:`PromptTokenizer`);
    None for a vocabulary where they might not be."""
    if llama_cpp.llama_vocab_type(model.vocab) not in (llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE):
        return None
    strips = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
    texts = {text for _, text in specials}
    if not texts or any(attr & strips for attr, _ in specials) or not cannot_overlap(texts):
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def cannot_overlap(texts: set[str]) -> bool:
    """Whether no two occurrences of these texts can overlap in any string: none
    is inside another (or inside itself shifted), and no end of one is the start
    of one. Then every occurrence is found whatever order they are looked for in."""
    firsts = {t[0] for t in texts}
    for t in texts:
        # only where a text starts can another (or itself, again) begin inside it
        for i in range(1, len(t)):
            if t[i] in firsts and any(t[i:].startswith(u) or u.startswith(t[i:]) for u in texts):
                return False
        if any(t != u and t in u for u in texts):
            return False
    return True


def prompt_tokens(tokenizer: PromptTokenizer, template: ChatTemplate, messages: Sequence[dict[str, str]] | None,
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
        return tokenizer.prompt(prompt_text(template, None, prompt))
    messages = [dict(m) for m in messages]
    contents = [m.get("content") or "" for m in messages]
    if not any(special in c for c in contents for special in template.special_texts):
        return tokenizer.prompt(template.render(messages))
    return _segmented_tokens(tokenizer, template, messages, contents)


def _segmented_tokens(tokenizer: PromptTokenizer, template: ChatTemplate, messages: list[dict[str, str]],
                      contents: list[str]) -> list[int]:
    nonce = secrets.token_hex(8)
    marks = {f"\ue000{nonce}:{i}\ue001": i for i in range(len(messages))}
    masked = [{**m, "content": mark} for m, mark in zip(messages, marks)]
    rendered = template.render(masked)
    tokens = list(tokenizer.bos)
    # the split keeps the marks (a capturing group): template text and marks alternate
    pattern = "(" + "|".join(re.escape(mark) for mark in marks) + ")"
    for part in re.split(pattern, rendered):
        if part in marks:
            tokens.extend(tokenizer.tokens(contents[marks[part]], special=False))
        else:
            tokens.extend(tokenizer.tokens(part, special=True))
    return tokens

