"""Line input for the chat: prompt_toolkit when it is installed, else ``input()`` with readline
(history with the arrow keys either way), and plain line reads when stdin is not a terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Protocol


class Interrupted(Exception):
    """Ctrl-C at the prompt; ``had_text`` tells whether the line held anything."""

    def __init__(self, had_text: bool) -> None:
        super().__init__("interrupted")
        self.had_text = had_text


class LineReader(Protocol):
    def read(self, prompt: str) -> str:
        """One line without its newline. Raises EOFError at the end of input (Ctrl-D) and
        :class:`Interrupted` on Ctrl-C, leaving the terminal's cursor at the start of a line."""

    def close(self) -> None: ...


class PipeReader:
    """stdin is not a terminal: no prompts, no history."""

    def read(self, prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def close(self) -> None:
        pass


class ReadlineReader:
    """``input()``; importing readline gives it line editing and history."""

    def __init__(self, history: Optional[Path]) -> None:
        import readline

        self._readline = readline
        self._history = history
        readline.set_history_length(1000)
        if history is not None and history.exists():
            try:
                readline.read_history_file(str(history))
            except OSError:
                pass

    def read(self, prompt: str) -> str:
        try:
            return input(_readline_safe(prompt))
        except EOFError:
            print()
            raise
        except KeyboardInterrupt:
            print()  # leave the abandoned line as it is, as a shell does (prompt_toolkit does this itself)
            raise Interrupted(bool(self._readline.get_line_buffer())) from None

    def close(self) -> None:
        if self._history is None:
            return
        try:
            self._history.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(str(self._history))
        except OSError:
            pass


class PromptToolkitReader:
    def __init__(self, history: Optional[Path]) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        if history is not None:
            history.parent.mkdir(parents=True, exist_ok=True)
        self._session = PromptSession(history=FileHistory(str(history)) if history else InMemoryHistory())

    def read(self, prompt: str) -> str:
        from prompt_toolkit.formatted_text import ANSI

        try:
            return self._session.prompt(ANSI(prompt))
        except KeyboardInterrupt:
            raise Interrupted(bool(self._session.default_buffer.text)) from None

    def close(self) -> None:
        pass


def _readline_safe(prompt: str) -> str:
    """Mark ANSI escapes as zero-width so readline measures the prompt correctly."""
    out, i = [], 0
    while i < len(prompt):
        if prompt[i] == "\x1b":
            end = prompt.find("m", i)
            if end < 0:
                break
            out.append("\x01" + prompt[i:end + 1] + "\x02")
            i = end + 1
        else:
            out.append(prompt[i])
            i += 1
    return "".join(out)


def discard_typeahead() -> bool:
    """Drop what was typed at the terminal while an answer streamed (it would otherwise become
    the next message unseen, or be lost on Ctrl-C). True when there was something to drop."""
    try:
        import fcntl
        import struct
        import termios

        fd = sys.stdin.fileno()
        if not os.isatty(fd):
            return False
        # In canonical mode the count covers finished lines only: look with ICANON off for a moment.
        attrs = termios.tcgetattr(fd)
        peek = list(attrs)
        peek[3] &= ~termios.ICANON
        termios.tcsetattr(fd, termios.TCSANOW, peek)
        try:
            pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        termios.tcflush(fd, termios.TCIFLUSH)
        return pending > 0
    except (ImportError, OSError, ValueError):
        return False


def line_reader(interactive: bool, history: Optional[Path]) -> LineReader:
    if not interactive:
        return PipeReader()
    try:
        import prompt_toolkit  # noqa: F401  (optional)
    except ImportError:
        return ReadlineReader(history)
    return PromptToolkitReader(history)
