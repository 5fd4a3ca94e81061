"""Chat templates: a model's own Jinja template, or a built-in one, rendered as transformers renders it.

A chat template is a Jinja string that a model folder carries as ``chat_template.jinja`` (transformers 5
writes it) or under ``"chat_template"`` in ``tokenizer_config.json``. It is rendered the way transformers'
``apply_chat_template`` renders it (``transformers/utils/chat_template_utils.py``): an
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, the ``{% generation %}`` tag, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``,
a ``dict`` and a ``namespace`` that refuse internals, and the variables ``messages``, ``tools`` and
``documents`` (both None), ``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``,
``eos_token``, ...). transformers is not imported: it is an optional extra; jinja2 is a main dependency.

Templates come from strangers (a downloaded model), so rendering stays in the sandbox; on top of Jinja's
sandbox, reaching for an unsafe attribute (``{{ ''.__class__ }}``) is refused outright instead of quietly
printing nothing. Every failure is a one-line :class:`~llm_training.errors.DataError`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from llm_training.errors import DataError, one_line, quoted
from llm_training.limits import json_loads

# ChatML as Qwen writes it, without Qwen's default system prompt: for base models that have no template
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5's name, beside tokenizer_config.json
NAMED_TEMPLATES = "additional_chat_templates"  # transformers 5's folder of named templates
# what transformers passes as template variables (its special_tokens_map)
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes (transformers refuses them too)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens it is rendered with.

    ``tokens`` are markup tokens a built-in template needs registered as special tokens (ChatML's
    ``<|im_start|>`` and ``<|im_end|>``); a model's own template relies on its tokenizer already having them.
    """

    source: str
    name: str = "template"  # "chatml", or the file it came from
    special_tokens: dict[str, str] = field(default_factory=dict)
    tokens: tuple[str, ...] = ()

    def render(
        self, messages: Sequence[Any], add_generation_prompt: bool = False, where: str = "", **variables
    ) -> str:
        """The conversation as text. ``messages``: Message objects or ``{"role", "content"}`` dicts;
        ``where`` names the record in errors; ``variables`` are passed to the template as well."""
        chat = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        template = _compile(self.source, self.name)
        context = {**self.special_tokens, **variables}
        try:
            return template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except (
            Exception
        ) as exc:  # foreign code: whatever fails, the user gets one line naming template and record
            raise DataError(_render_error(exc, self.name, where)) from None

    def literal_text(self) -> str:
        """The template's text and string constants joined by NULs: markup tokens it writes itself are in it."""
        return _literals(self.source, self.name)


def builtin_template(name: str) -> ChatTemplate:
    if name != "chatml":
        raise DataError(f"unknown built-in chat template {quoted(name)}; the built-in one is 'chatml'")
    return ChatTemplate(CHATML, "chatml", {}, CHATML_TOKENS)


def load_chat_template(spec: str | Path, name: str | None = None) -> ChatTemplate:
    """A chat template from ``spec``: a built-in name (``"chatml"``), a ``.jinja`` file, a
    ``tokenizer_config.json``, or a model or tokenizer folder holding either. ``name`` picks one of a
    folder's named templates (``additional_chat_templates/NAME.jinja`` or the config's list of templates).
    The special tokens come from the ``tokenizer_config.json`` (or ``special_tokens_map.json``) beside."""
    if isinstance(spec, str) and not Path(spec).exists() and spec.isidentifier():
        return builtin_template(spec)
    path = Path(spec)
    folder = path if path.is_dir() else path.parent
    config = _read_config(folder / "tokenizer_config.json") if path.is_dir() or path.suffix == ".json" else {}
    if path.is_file() and path.suffix != ".json":
        source, origin = _read_template(path), str(path)
    elif not path.exists():
        raise DataError(f"chat template not found: {path} (give a model folder, a .jinja file, "
                        "a tokenizer_config.json or the built-in 'chatml')")  # fmt: skip
    else:
        source, origin = _template_in(folder, config, name, path)
    special = _special_tokens(config, folder / "special_tokens_map.json")
    template = ChatTemplate(source, origin, special)
    _compile(template.source, template.name)  # a syntax error shows now, not at the first record
    return template


# ---- files -----------------------------------------------------------------------------------------------------


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json_loads(_read_template(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object")
    return config


def _template_in(folder: Path, config: dict, name: str | None, path: Path) -> tuple[str, str]:
    """The template a folder (or its tokenizer_config.json) holds: the .jinja file first, as transformers."""
    config_path = folder / "tokenizer_config.json"
    if name and name != "default":
        named = folder / NAMED_TEMPLATES / f"{name}.jinja"
        if named.is_file() and named.resolve().parent == (folder / NAMED_TEMPLATES).resolve():
            return _read_template(named), str(named)
    elif (folder / TEMPLATE_FILE).is_file():
        return _read_template(folder / TEMPLATE_FILE), str(folder / TEMPLATE_FILE)
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...], the older form of named templates
        found = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = found.get(name or "default")
        if value is None:
            raise DataError(f"{config_path}: no chat template named {quoted(name or 'default')} "
                            f"(it has {quoted(sorted(map(str, found)))})")  # fmt: skip
    if isinstance(value, str):
        return value, str(config_path)
    if value is not None:
        raise DataError(f"{config_path}: 'chat_template' is {type(value).__name__}, not a string")
    which = f"a chat template named {quoted(name)}" if name else "a chat template"
    raise DataError(f"{folder}: no {which} ({TEMPLATE_FILE} or 'chat_template' in tokenizer_config.json); "
                    "for a base model use the built-in 'chatml'")  # fmt: skip


def _special_tokens(config: dict, fallback: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (a config may store an AddedToken object with a "content")."""
    merged = {**_read_config(fallback), **config}
    out = {}
    for key in SPECIAL_TOKEN_NAMES:
        value = merged.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


# ---- the environment -------------------------------------------------------------------------------------------


@functools.cache
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
    if version < MIN_JINJA:
        raise DataError(f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (older versions have "
                        f"sandbox escapes); this is {jinja2.__version__}: pip install -U jinja2")  # fmt: skip

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # Jinja returns an Undefined that prints as "": a template reaching for internals is refused instead
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is refused")

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not, and offers these options
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class TemplateDict:
        """``dict(...)`` and ``dict.fromkeys(...)`` without the class itself (no type tricks)."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_' ({name!r})")

    class TemplateNamespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (a way to CPython internals)."""

        def __init__(*args, **kwargs):  # noqa: B902 - Jinja's signature, so that namespace(self=...) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=TemplateDict(),
        namespace=TemplateNamespace,
    )
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str, name: str):
    import jinja2

    if not isinstance(source, str):
        raise DataError(f"chat template {name}: a template is a string, got {type(source).__name__}")
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(
            one_line(f"chat template {name}: line {exc.lineno}: not valid Jinja ({exc.message})")
        ) from None


@functools.lru_cache(maxsize=32)
def _literals(source: str, name: str) -> str:
    import jinja2.nodes

    _compile(source, name)
    tree = _environment().parse(source)
    texts = {node.data for node in tree.find_all(jinja2.nodes.TemplateData)}
    texts |= {node.value for node in tree.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(texts))


def _render_error(exc: Exception, name: str, where: str) -> str:
    from jinja2.exceptions import SecurityError, TemplateError

    at = f"{where}: " if where else ""
    if isinstance(exc, SecurityError):
        return one_line(f"chat template {name}: refused, it reaches outside the template sandbox ({exc})")
    if type(exc) is TemplateError:  # raise_exception(...) in the template: its own words
        return one_line(f"{at}the chat template {name} refuses this conversation: {exc}")
    kind = type(exc).__name__
    return one_line(f"{at}the chat template {name} failed on this conversation ({kind}: {str(exc)[:300]})")
