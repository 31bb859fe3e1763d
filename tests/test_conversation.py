"""Chat templates: our renderings agree with the models' own templates, and spans mark assistant text."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fastchat.constants import default_model_path
from fastchat.conversation import TEMPLATES, HFTemplate, TemplateError, render, template_for_model, tokenize_with_mask

MESSAGES = [
    {"role": "user", "content": "Put a clean mug on the shelf."},
    {"role": "assistant", "content": "Thought: I need a mug.\nAction: go to countertop 1"},
    {"role": "user", "content": "Observation: On the countertop 1, you see a mug 1."},
    {"role": "assistant", "content": "Thought: Found it.\nAction: take mug 1 from countertop 1"},
]


def test_default_model_template_matches_its_tokenizer():
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    template = template_for_model(path, tokenizer=tok)
    assert template.name == "smollm2"
    for upto in (1, 2, 3, 4):
        msgs = MESSAGES[:upto]
        gen = msgs[-1]["role"] == "user"
        ours = render(template, msgs, add_generation_prompt=gen).text
        theirs = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert theirs.rstrip("\n") == ours.rstrip("\n")


def test_tiny_model_named_template_and_hf_fallback_agree(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    named = template_for_model(tiny_model_dir, tokenizer=tok)
    assert named.name == "chatml"  # recorded in eto_template.txt by the builder
    hf = HFTemplate(tok)
    a, b = render(named, MESSAGES), render(hf, MESSAGES)
    assert a.text.rstrip("\n") == b.text.rstrip("\n")
    assert a.assistant_spans == b.assistant_spans


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_spans_cover_exactly_the_assistant_answers(name):
    rendered = render(TEMPLATES[name], MESSAGES)
    pieces = [rendered.text[s:e] for s, e in rendered.assistant_spans]
    assert len(pieces) == 2
    for piece, msg in zip(pieces, MESSAGES[1::2]):
        assert msg["content"] in piece
        assert "Observation" not in piece and "Put a clean mug" not in piece


def test_generation_prompt_ends_with_assistant_prefix():
    t = TEMPLATES["llama-3"]
    text = render(t, MESSAGES[:1], add_generation_prompt=True).text
    assert text.endswith(t.assistant_prefix)


def test_mask_selects_only_assistant_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rendered = render(template_for_model(tiny_model_dir, tokenizer=tok), MESSAGES)
    ids, mask = tokenize_with_mask(tok, rendered)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "".join(m["content"] + "<|im_end|>" for m in MESSAGES[1::2])


def test_unknown_template_and_bad_messages_are_refused():
    with pytest.raises(TemplateError, match="unknown chat template"):
        template_for_model(name="nope")
    with pytest.raises(TemplateError, match="message 0"):
        render(TEMPLATES["chatml"], [{"role": "robot", "content": "hi"}])
