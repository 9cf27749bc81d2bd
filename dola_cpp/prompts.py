"""Chat messages to model input, with message content kept as text.

A chat template's own markup (``<|im_start|>``, ``<start_of_turn>``, ...) is made of special
tokens; message content is untrusted text and never is. :func:`chat_segments` renders the
template with a placeholder in place of each message, so the template never sees the content,
and returns the rendering as pieces: markup (tokenized with special-token parsing) and content
(tokenized as plain text). A user who types ``<|im_end|>`` gets the seven text tokens of that
string, not the end of their turn.
"""

from __future__ import annotations

from typing import Callable, Sequence

TRANSCRIPT_STOP = "\nUser:"  # where a transcript's answer ends: the next turn

# Placeholders are private-use characters, which no template emits and content rarely holds
# (content that does holds them gets other ones).
_PRIVATE_USE = 0xE000


def transcript_prompt(messages: Sequence[dict]) -> str:
    """Chat messages as a plain ``User: …`` / ``Assistant: …`` transcript ending with ``Assistant:``:
    the format for models without a chat template llama.cpp recognises (stop at TRANSCRIPT_STOP)."""
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += f"{m['content']}\n\n"
        elif m["role"] == "user":
            text += f"User: {m['content']}\n"
        else:
            text += f"Assistant: {m['content']}\n"
    return text + "Assistant:"


def _placeholders(n: int, texts: Sequence[str]) -> list[str]:
    base = _PRIVATE_USE
    while True:
        open_, close = chr(base), chr(base + 1)
        if not any(open_ in t or close in t for t in texts):
            return [f"{open_}{i}{close}" for i in range(n)]
        base += 2


def chat_segments(render: Callable[[list[dict]], str], messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The chat as ``render`` (a chat template) lays it out, in pieces ``(text, is_markup)``.

    Each non-empty message content is a piece of its own with ``is_markup`` False, exactly as the
    template would have placed it (templates that trim content get it trimmed); the markup
    between them is what the template produced. Raises ValueError if the template does not
    place each message's content once, as text.
    """
    contents = [str(m["content"]) for m in messages]
    marks = _placeholders(len(messages), contents + [str(m["role"]) for m in messages])
    # padded with spaces: a template that trims content shows the bare placeholder
    probe = [{**m, "content": f" {mark} " if c else ""} for m, mark, c in zip(messages, marks, contents)]
    rendered = render(probe)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for mark, content in zip(marks, contents):
        if not content:
            continue
        padded = f" {mark} "
        at = rendered.find(padded, pos)
        if at >= 0 and rendered.count(mark) == 1:
            text, end = content, at + len(padded)
        else:
            at = rendered.find(mark, pos)
            if at < 0 or rendered.count(mark) != 1:
                raise ValueError("the chat template does not place each message's content once as text")
            text, end = content.strip(), at + len(mark)
        if at > pos:
            pieces.append((rendered[pos:at], True))
        if text:
            pieces.append((text, False))
        pos = end
    if pos < len(rendered):
        pieces.append((rendered[pos:], True))
    return pieces
