"""Chat templates: one rendering path for serving and training.

`render(template, messages)` turns a list of {"role", "content"} messages into
the prompt string and the character spans of the assistant turns (content plus
the end-of-turn marker, which is what the model must learn to produce).
`tokenize_with_mask` maps those spans onto token boundaries via the tokenizer's
offsets, so the SFT/DPO trainers supervise exactly the assistant tokens and the
model worker feeds the model exactly the same text it was trained on.

Templates are picked by name, by the model folder's `eto_template.txt` (written
by our trainers), by the model's name, or fall back to the tokenizer's own chat
template.

FastChat's own servers render prompts from a worker's Conversation dict instead
(separator styles, Conversation.get_prompt): `fastchat_conversation` states our
templates in those terms and `fastchat_prompt` renders such a dict as FastChat does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

TEMPLATE_FILE = "eto_template.txt"


class TemplateError(ValueError):
    pass


class FastChatStyle(IntEnum):
    """FastChat's SeparatorStyle numbers as its workers send them over JSON, as in fschat 0.2.36 (the latest
    release). FastChat's main branch inserts LLAMA3 at 8, shifting CHATGLM and all later styles by one, so our
    own templates use only styles 1-7, which both number alike."""
    ADD_COLON_SINGLE = 1
    ADD_COLON_TWO = 2
    ADD_COLON_SPACE_SINGLE = 3
    NO_COLON_SINGLE = 4
    NO_COLON_TWO = 5
    ADD_NEW_LINE_SINGLE = 6
    LLAMA2 = 7
    CHATML = 9


@dataclass(frozen=True)
class FastChatForm:
    """A template in the terms of FastChat's Conversation."""
    sep_style: FastChatStyle
    roles: tuple[str, str]
    sep: str
    sep2: str | None = None
    system_template: str = "{system_message}"


# FastChat's `raw` template (messages concatenated): what FastChat's servers get for a template its styles
# cannot express at all
FASTCHAT_RAW = FastChatForm(FastChatStyle.NO_COLON_SINGLE, ("", ""), "")


@dataclass(frozen=True)
class Template:
    name: str
    user: str = "{content}"             # a whole user turn
    assistant_prefix: str = ""          # what precedes an assistant answer (also the generation prompt)
    assistant: str = "{content}"        # an assistant answer as trained: content and end-of-turn marker
    assistant_sep: str = ""             # between an assistant turn and the next turn (not trained)
    system: str = ""                    # a system turn, "{system}"
    default_system: str = ""
    system_in_first_user: bool = False  # llama-2 style: the system block sits inside the first [INST]
    stop_str: tuple[str, ...] = ()      # strings that end generation
    stop_tokens: tuple[str, ...] = ()   # token strings that end generation (looked up in the tokenizer)
    fastchat: FastChatForm | None = None  # the same template for FastChat's servers (None: not expressible)


TEMPLATES: dict[str, Template] = {}


def register(t: Template) -> Template:
    TEMPLATES[t.name] = t
    return t


_chatml = dict(
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    assistant_sep="\n",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    stop_str=("<|im_end|>",),
    stop_tokens=("<|im_end|>",),
    # FastChat's CHATML style renders the same text, but its number differs between FastChat versions
    fastchat=FastChatForm(FastChatStyle.NO_COLON_SINGLE, ("<|im_start|>user\n", "<|im_start|>assistant\n"),
                          "<|im_end|>\n", system_template="<|im_start|>system\n{system_message}<|im_end|>\n"),
)
register(Template(name="chatml", **_chatml))
register(Template(name="qwen", default_system="You are a helpful assistant.", **_chatml))
# The embedded default model (SmolLM2-Instruct) is ChatML with its own default system turn.
register(Template(name="smollm2", default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                  **_chatml))
register(Template(
    name="llama-2", user="[INST] {content} [/INST]", assistant=" {content} </s>", assistant_sep="<s>",
    system="<<SYS>>\n{system}\n<</SYS>>\n\n", system_in_first_user=True, stop_str=("</s>",), stop_tokens=("</s>",),
    fastchat=FastChatForm(FastChatStyle.LLAMA2, ("[INST]", "[/INST]"), " ", " </s><s>",
                          "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"),
))
register(Template(
    name="mistral", user="[INST] {content} [/INST]", assistant="{content}</s>",
    system="{system}\n\n", system_in_first_user=True, stop_str=("</s>",), stop_tokens=("</s>",),
    # LLAMA2 puts a space between [/INST] and an earlier answer, which Mistral's template does not have
    fastchat=FastChatForm(FastChatStyle.LLAMA2, ("[INST]", "[/INST]"), " ", "</s>", "[INST] {system_message}\n\n"),
))
register(Template(
    name="vicuna_v1.1", user="USER: {content} ", assistant_prefix="ASSISTANT:", assistant=" {content}</s>",
    system="{system} ",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    stop_str=("</s>",), stop_tokens=("</s>",),
    fastchat=FastChatForm(FastChatStyle.ADD_COLON_TWO, ("USER", "ASSISTANT"), " ", "</s>"),
))
register(Template(
    name="llama-3",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    stop_str=("<|eot_id|>",), stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    # not FastChat's LLAMA3 style: that adds <|begin_of_text|> as text and strips every message
    fastchat=FastChatForm(
        FastChatStyle.NO_COLON_SINGLE,
        ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "<|eot_id|>", system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>"),
))

# model-name patterns, checked in order
_NAME_PATTERNS = [
    (r"smollm", "smollm2"),
    (r"qwen", "qwen"),
    (r"llama-?3", "llama-3"),
    (r"vicuna", "vicuna_v1.1"),
    (r"llama-?2", "llama-2"),
    (r"mistral|mixtral", "mistral"),
]


@dataclass
class Rendered:
    text: str
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)


def _check_messages(messages: list[dict[str, str]]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i}: needs role system/user/assistant and string content, got {str(m)[:100]}")


def render(template: "Template | HFTemplate", messages: list[dict[str, str]],
           add_generation_prompt: bool = False) -> Rendered:
    """Render messages; `add_generation_prompt` appends the assistant prefix for generation."""
    _check_messages(messages)
    if isinstance(template, HFTemplate):
        return template.render(messages, add_generation_prompt)
    t = template
    system = t.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str, trained: bool = False) -> None:
        nonlocal pos
        if trained:
            spans.append((pos, pos + len(s)))
        parts.append(s)
        pos += len(s)

    pending_system = t.system.format(system=system) if system else ""
    if pending_system and not t.system_in_first_user:
        emit(pending_system)
        pending_system = ""
    for i, m in enumerate(messages):
        if m["role"] == "system":
            raise TemplateError(f"message {i}: a system message is only allowed first")
        if m["role"] == "user":
            emit(t.user.format(content=pending_system + m["content"]))
            pending_system = ""
        else:
            emit(t.assistant_prefix)
            emit(t.assistant.format(content=m["content"]), trained=True)
            if i + 1 < len(messages):
                emit(t.assistant_sep)
    if add_generation_prompt:
        if messages and messages[-1]["role"] == "assistant":
            emit(t.assistant_sep)
        emit(t.assistant_prefix)
    return Rendered("".join(parts), spans)


def fastchat_conversation(template: "Template | HFTemplate", stop_token_ids: list[int]) -> dict:
    """The template as the Conversation dict a FastChat worker sends from /worker_get_conv_template: the fields
    FastChat's OpenAI server reads, with our template's name."""
    form = template.fastchat or FASTCHAT_RAW
    return {"name": template.name, "system_template": form.system_template,
            "system_message": template.default_system, "roles": list(form.roles), "messages": [], "offset": 0,
            "sep_style": int(form.sep_style), "sep": form.sep, "sep2": form.sep2,
            "stop_str": list(template.stop_str), "stop_token_ids": stop_token_ids}


def fastchat_prompt(conv: dict, messages: list[dict[str, str]]) -> str:
    """The generation prompt FastChat's OpenAI server builds from a worker's Conversation dict.

    As FastChat does: a system message replaces the conversation's, the other messages follow its few-shot
    `messages`, an empty assistant turn is appended, and get_prompt renders the separator style (an empty
    message counts as the empty turn).
    """
    _check_messages(messages)
    try:
        style = FastChatStyle(conv["sep_style"])
    except ValueError:
        known = ", ".join(f"{s.name}={s.value}" for s in FastChatStyle)
        raise TemplateError(f"FastChat separator style {conv['sep_style']!r} is not rendered here; known (numbered "
                            f"as in fschat 0.2.36): {known}") from None
    roles = conv["roles"]
    system_message = conv["system_message"]
    turns = [tuple(t) for t in conv["messages"]]
    for m in messages:
        if m["role"] == "system":
            system_message = m["content"]
        else:
            turns.append((roles[0] if m["role"] == "user" else roles[1], m["content"]))
    turns.append((roles[1], None))
    system = conv["system_template"].format(system_message=system_message)
    sep, sep2 = conv["sep"], conv["sep2"]
    if style == FastChatStyle.LLAMA2:  # the first message carries no tag; tags go by position, not by role
        out = system if system_message else "[INST] "
        for i, (_, text) in enumerate(turns):
            tag = roles[i % 2]
            if not text:
                out += tag
            elif i == 0:
                out += text + " "
            else:
                out += tag + " " + text + (sep, sep2)[i % 2]
        return out
    # every other style: a head, then per message role + joiner + text + separator, and role + opener when empty
    if style == FastChatStyle.ADD_COLON_SINGLE:
        head, joiner, opener, seps = system + sep, ": ", ":", (sep, sep)
    elif style == FastChatStyle.ADD_COLON_TWO:
        head, joiner, opener, seps = system + sep, ": ", ":", (sep, sep2)
    elif style == FastChatStyle.ADD_COLON_SPACE_SINGLE:
        head, joiner, opener, seps = system + sep, ": ", ": ", (sep, sep)
    elif style == FastChatStyle.NO_COLON_SINGLE:
        head, joiner, opener, seps = system, "", "", (sep, sep)
    elif style == FastChatStyle.NO_COLON_TWO:
        head, joiner, opener, seps = system, "", "", (sep, sep2)
    elif style == FastChatStyle.ADD_NEW_LINE_SINGLE:
        head, joiner, opener, seps = system + sep if system else "", "\n", "\n", (sep, sep)
    else:  # CHATML
        head, joiner, opener, seps = system + sep + "\n" if system else "", "\n", "\n", (sep + "\n", sep + "\n")
    out = head
    for i, (role, text) in enumerate(turns):
        out += (role + joiner + text + seps[i % 2]) if text else (role + opener)
    return out


class HFTemplate:
    """The tokenizer's own Jinja chat template, used when no named template fits.

    Assistant spans come from rendering growing prefixes of the conversation; a
    template whose renderings are not prefixes of each other is refused.
    """
    default_system = ""  # whatever the Jinja template does without a system message
    fastchat = None  # FastChat's separator styles cannot express a Jinja template

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template; pass a template name")
        self.tokenizer = tokenizer
        self.name = "hf"
        eos = tokenizer.eos_token
        self.stop_str = (eos,) if eos else ()
        self.stop_tokens = (eos,) if eos else ()

    def _apply(self, messages, gen: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def render(self, messages, add_generation_prompt: bool) -> Rendered:
        full = self._apply(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._apply(messages[:i], True)
            upto = self._apply(messages[: i + 1], False)
            if not full.startswith(before) or not full.startswith(upto) or not upto.startswith(before):
                raise TemplateError("the tokenizer's chat template does not render conversations as prefixes "
                                    "of each other; pass a named template (--conv-template)")
            spans.append((len(before), len(upto.rstrip())))
        return Rendered(full, spans)


def template_for_model(model_path: str | Path | None = None, name: str | None = None, tokenizer=None):
    """Pick a template: explicit name > the model folder's eto_template.txt > model name > tokenizer template."""
    if name:
        if name == "hf":
            return HFTemplate(tokenizer)
        if name not in TEMPLATES:
            raise TemplateError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)} or 'hf'")
        return TEMPLATES[name]
    if model_path is not None:
        saved = Path(model_path) / TEMPLATE_FILE
        if saved.is_file():
            return template_for_model(name=saved.read_text().strip(), tokenizer=tokenizer)
        lowered = str(model_path).lower()
        for pattern, tname in _NAME_PATTERNS:
            if re.search(pattern, lowered):
                return TEMPLATES[tname]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return HFTemplate(tokenizer)
    return TEMPLATES["vicuna_v1.1"]


def save_template_name(model_dir: str | Path, template) -> None:
    """Record the template a model was trained with, so serving renders prompts the same way."""
    Path(model_dir, TEMPLATE_FILE).write_text(template.name + "\n")


def stop_token_ids(template, tokenizer) -> list[int]:
    ids = []
    for tok in template.stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class MaskError(ValueError):
    """The assistant spans do not fall on token boundaries."""


def tokenize_with_mask(tokenizer, rendered: Rendered, add_special_tokens: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it belongs to an assistant span.

    A token that straddles a span boundary means the mask cannot be exact; that
    raises MaskError instead of silently training on (or dropping) a piece.
    """
    enc = tokenizer(rendered.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [False] * len(ids)
    spans = sorted(rendered.assistant_spans)
    covered = [0] * len(spans)
    j = 0
    for k, (s, e) in enumerate(offsets):
        if e <= s:  # special tokens added by the tokenizer (BOS)
            continue
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j == len(spans):
            continue
        a, b = spans[j]
        if s >= a and e <= b:
            mask[k] = True
            covered[j] += e - s
        elif s < b and e > a:
            raise MaskError(f"token {k} ({rendered.text[s:e]!r}, chars {s}-{e}) straddles assistant span {a}-{b}")
    for (a, b), c in zip(spans, covered):
        if b > a and c == 0:
            raise MaskError(f"assistant span {a}-{b} has no whole token")
    return ids, mask
