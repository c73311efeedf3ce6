"""Chat-format tokenizer for any HF-format model directory.

torchtune 0.6.1's ``HuggingFaceBaseTokenizer`` has no chat templates, so this renders the
model's own Jinja chat template (``tokenizer_config.json``'s ``chat_template`` or
``chat_template.jinja``) in a sandboxed Jinja environment configured like transformers', and
encodes the text with ``tokenizer.json``. The ids equal transformers' ``apply_chat_template``.

In a torchtune config::

    tokenizer:
      _component_: packrl.models.chat_tokenizer
      path: ~/.cache/packrl/SmolLM2-135M-Instruct
"""

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# Chat formats whose end-of-turn token is not the eos token (ChatML: SmolLM2, Qwen2.5).
_END_OF_TURN_TOKENS = ("<|im_end|>",)
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Like transformers: Jinja's own tojson escapes HTML characters, which templates don't expect.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template with the environment settings transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_content(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class ChatTokenizer:
    """Tokenizer plus chat template.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (from ``tokenizer.json``).
        chat_template: Jinja source of the model's chat template.
        special_tokens: ``bos_token``/``eos_token``/``pad_token``/``unk_token`` strings (or None).
        extra_stop_ids: more ids that end a turn (e.g. generation_config's ``eos_token_id``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        special_tokens: dict[str, str | None],
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = _compile_template(chat_template)
        self.special_tokens = {name: special_tokens.get(name) for name in _SPECIAL_TOKEN_NAMES}
        self.bos_id = self._id_of(self.special_tokens["bos_token"])
        self.eos_id = self._id_of(self.special_tokens["eos_token"])
        if self.eos_id is None:
            raise ValueError("tokenizer has no eos_token: set eos_token in tokenizer_config.json")
        pad_id = self._id_of(self.special_tokens["pad_token"])
        self.pad_id: int = self.eos_id if pad_id is None else pad_id
        stops = [self.eos_id, *extra_stop_ids]
        stops += [i for i in map(self._id_of, _END_OF_TURN_TOKENS) if i is not None]
        self.stop_token_ids: list[int] = list(dict.fromkeys(stops))
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTokenizer":
        """Build from an HF model directory: tokenizer.json, tokenizer_config.json, and
        chat_template.jinja / generation_config.json when present."""
        path = Path(path).expanduser()
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json; point `path` at an HF model directory "
                "(e.g. the one tools/prepare_smollm2.py prints)"
            )
        config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else None
        template = template or config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if not template:
            raise ValueError(
                f"{path} has no chat template: add chat_template to tokenizer_config.json "
                "or a chat_template.jinja file"
            )
        special = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
        eos = _read_json(path / "generation_config.json").get("eos_token_id", [])
        extra_stop_ids = [eos] if isinstance(eos, int) else list(eos)
        return cls(
            Tokenizer.from_file(str(path / "tokenizer.json")), template, special, extra_stop_ids
        )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True, but this tokenizer has no bos_token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as text, exactly as the model's chat template writes it."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content'")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise ValueError(
                        f"messages[{i}][{key!r}] must be a string, got {message.get(key)!r}"
                    )
        # tools/documents are None, as transformers passes them (templates test `is none`).
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.special_tokens,
        )

    def tokenize_messages(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat (with the assistant header when
        ``add_generation_prompt``), equal to transformers' ``apply_chat_template``."""
        return self.encode(self.render(messages, add_generation_prompt))


def chat_tokenizer(path: str) -> ChatTokenizer:
    """Config entry point: ``_component_: packrl.models.chat_tokenizer`` with ``path``."""
    return ChatTokenizer.from_dir(path)
