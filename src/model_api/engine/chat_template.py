"""Render chat messages with the model's own chat template (from GGUF metadata).

Both engines render and tokenize prompts through this module, so the same
request produces the same prompt tokens -- and, greedily, the same text --
whichever engine serves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        self.template = template
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
        return cls(template, bos_token=bos, eos_token=eos)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for ``messages``, ending with the assistant's turn opener."""
        return self._formatter(messages=[dict(m) for m in messages]).prompt


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
