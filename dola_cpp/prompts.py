"""Chat messages to model input, with message content kept as text.

A chat template's own markup (``<|im_start|>``, ``<start_of_turn>``, ...) is made of special
tokens; message content is untrusted text and never is. :func:`chat_segments` renders the
template with a placeholder in place of each message, so the template never sees the content,
and returns the rendering as pieces: markup (tokenized with special-token parsing) and content
(tokenized as plain text). A user who types ``<|im_end|>`` gets the seven text tokens of that
string, not the end of their turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from . import _core

# What generation and scoring take: text, or token ids
Prompt = Union[str, Sequence[int], np.ndarray]

TRANSCRIPT_STOP = "\nUser:"  # where a transcript's answer ends: the next turn

# Placeholders are private-use characters, which no template emits and content rarely holds
# (content that does holds them gets other ones).
_PRIVATE_USE = 0xE000


def checked_utf8(text: str, what: str = "text") -> str:
    """``text`` if it encodes as UTF-8; a clear error for lone surrogates (undecodable bytes that
    Python kept from a command line or a file read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the {what} is not valid UTF-8: character {e.start} is an undecodable byte "
                         f"({text[e.start]!r}); fix its encoding") from None
    return text


def chat_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages as ``{"role", "content"}`` dicts of UTF-8 strings; ValueError when there are none."""
    checked = [{"role": checked_utf8(str(m["role"]), "role"), "content": checked_utf8(str(m["content"]), "message")}
               for m in messages]
    if not checked:
        raise ValueError("the chat has no messages")
    return checked


def render_chat(vocab: _core.Model, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """``messages`` rendered with the GGUF's chat template, which llama.cpp matches against the
    formats it knows (the template text is never executed)."""
    pairs = [(checked_utf8(str(m["role"]), "role"), checked_utf8(str(m["content"]), "message")) for m in messages]
    return vocab.apply_chat_template(pairs, add_generation_prompt)


def chat_ids(vocab: _core.Model, messages: Sequence[dict], templated: bool,
             add_generation_prompt: bool = True) -> list[int]:
    """The token ids of checked ``messages`` (:func:`chat_messages`): with the chat template
    (``templated``) only its markup parsed for special tokens, else a :func:`transcript_prompt`
    tokenized as text."""
    if not templated:
        return list(vocab.tokenize(transcript_prompt(messages), True, False))
    pieces = chat_segments(lambda ms: render_chat(vocab, ms, add_generation_prompt), messages)
    # The markup's control tokens, and runs of text between them, each run tokenized in one
    # piece as llama.cpp tokenizes the text between special tokens: for content without
    # special-token text the ids equal tokenizing the whole rendering.
    ids = list(vocab.tokenize("", True, False))  # BOS where the GGUF asks for it
    run = ""
    for text, markup in pieces:
        if not markup:
            run += text
            continue
        pos = 0
        for t in vocab.tokenize(text, False, True):
            piece = vocab.token_to_piece(t, True).decode("utf-8", "replace")
            if vocab.token_to_piece(t, False) or not piece:
                continue  # text, not a control token
            at = text.find(piece, pos)
            if at < 0:
                raise ValueError("could not place the chat template's special tokens")
            run += text[pos:at]
            if run:
                ids += list(vocab.tokenize(run, False, False))
            run, pos = "", at + len(piece)
            ids.append(t)
        run += text[pos:]
    if run:
        ids += list(vocab.tokenize(run, False, False))
    return ids


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
