"""The interactive chat in a real terminal: `dola-cpp run` under tmux, typed at as a person would."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Short generations, one thread: the suite shares two cores with benchmarks.
FAST = ["--threads", "1"]

TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux)")


class Terminal:
    """A program running in a detached tmux session on a private server socket."""

    def __init__(self, command: str, tmp_path: Path) -> None:
        self.socket = f"dola-cli-test-{os.getpid()}-{time.monotonic_ns()}"
        self.status = tmp_path / "status"
        env = f"DOLA_CPP_CACHE={shlex.quote(str(tmp_path / 'cache'))} NO_COLOR= DOLA_CPP_DEBUG="
        shell = f"env {env} {command}; echo $? > {shlex.quote(str(self.status))}; echo '[exited]'; sleep 600"
        # start outside the source tree: its dola_cpp/ folder would shadow the installed package
        self._tmux("new-session", "-d", "-s", "chat", "-c", str(tmp_path), "-x", "160", "-y", "50", shell)

    def _tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "chat", *keys)

    def type(self, text: str) -> None:
        self.wait_idle()  # typed once the chat reads its terminal, as a person would
        self._tmux("send-keys", "-t", "chat", "-l", text)
        self.keys("Enter")

    def chat_pid(self) -> int:
        """The chat's process: the child of the pane's shell."""
        shell = int(self._tmux("display-message", "-p", "-t", "chat", "#{pane_pid}").strip())
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == shell:  # the parent's pid
                return int(stat.parent.name)
        raise AssertionError(f"the chat is not running; screen:\n{self.screen()}")

    def wait_idle(self, timeout: float = 90.0) -> None:
        """Until the chat waits for terminal input: its main thread asleep in poll, select or
        epoll (the line editor's wait for a key), twice in a row. Keys and signals sent then reach
        the line editor at its wait, never while it is busy with earlier keys."""
        pid = self.chat_pid()
        deadline = time.monotonic() + timeout
        calm = 0
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = Path(f"/proc/{pid}/wchan").read_text()
            except OSError:
                break
            calm = calm + 1 if state == "S" and re.search(r"poll|select", wchan) else 0
            if calm >= 2:
                return
            time.sleep(0.01)
        raise AssertionError(f"the chat did not wait for input; screen:\n{self.screen()}")

    def screen(self) -> str:
        text = self._tmux("capture-pane", "-p", "-J", "-t", "chat", "-S", "-500")
        return "\n".join(line.rstrip() for line in text.splitlines())

    def screen_with_colours(self) -> str:
        return self._tmux("capture-pane", "-p", "-e", "-J", "-t", "chat", "-S", "-500")

    def wait_for(self, predicate, what: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            if self.status.exists():
                break
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def wait_for_prompt(self, after: str = "") -> str:
        """Wait until the chat is back at an empty '>>>' prompt, after ``after`` appeared."""
        return self.wait_for(lambda s: after in s and s.rstrip().endswith(">>>")
                             and s.rfind(after) < s.rstrip().rfind(">>>"), f"the prompt after {after!r}")

    def exit_status(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status.exists() and self.status.read_text().strip():
                return int(self.status.read_text())
            time.sleep(0.2)
        raise AssertionError(f"the chat did not exit; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture()
def terminal(tmp_path):
    terminals = []

    def start(*args: str) -> Terminal:
        command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "dola_cpp.cli", *args])
        t = Terminal(command, tmp_path)
        terminals.append(t)
        return t

    yield start
    for t in terminals:
        t.close()


@needs_tmux
@pytest.mark.slow
def test_chat_in_a_terminal(terminal, smollm2_path):
    t = terminal("run", str(smollm2_path), "--max-tokens", "400", *FAST)
    screen = t.wait_for_prompt("Type /help")
    # the chat decodes with DRY by default, and then with no blanket repetition penalty
    # (docs/decoders.md, "Loops"; DecodeConfig.penalty)
    assert "DoLa (normed premature layers): layers 15,17,19,21,23,25,27,29 vs 30 · repetition penalty 1.0" in screen

    # a long answer, stopped with Ctrl-C once it is streaming
    question = "Count from 1 to 200, separated by commas."
    t.type(question)
    t.wait_for(lambda s: re.search(re.escape(question) + r"\n\S.{20}", s) is not None, "the answer to stream")
    t.keys("C-c")
    screen = t.wait_for_prompt("[interrupted")
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · .* · interrupted", screen)

    # the model is still usable: a shorter answer this time, with its stats line
    t.type("/set max_tokens 24")
    t.wait_for_prompt("max_tokens = 24")
    question = "What is the capital of France?"
    t.type(question)
    screen = t.wait_for_prompt(question)
    answer = screen[screen.rfind(question):]
    assert re.search(r"\n\S.*\n\d+ tokens · [\d.]+ tok/s · prompt \d+ tokens in [\d.]+ s · layers \d+×\d+", answer)

    t.type("/set layers low")
    screen = t.wait_for_prompt("layers = low")
    assert "DoLa (normed premature layers): layers 2,4,6,8,10,12,14 vs 30" in screen

    t.type("/stats")
    screen = t.wait_for_prompt("session: 2 answer(s)")
    assert re.search(r"layer +\d+ │█", screen)

    t.type("/bye")
    assert t.exit_status() == 0


@needs_tmux
@pytest.mark.slow
def test_chat_shows_risk_and_abstains_in_a_terminal(terminal, smollm2_path):
    t = terminal("run", str(smollm2_path), "--layers", "none", "--max-tokens", "24", "--show-risk", *FAST)
    screen = t.wait_for_prompt("Type /help")
    assert "token colours: low risk < 0.3 · medium risk < 0.6 · high risk >= 0.6" in screen
    question = "What is the capital of France?"
    t.type(question)
    screen = t.wait_for_prompt(question)
    assert "Paris" in screen[screen.rfind(question):]
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · .* · risk 0\.\d\d", screen)
    # the answer's tokens are coloured: green/yellow/red foreground codes on its line
    coloured = t.screen_with_colours()
    answer_line = next(line for line in coloured.splitlines()[::-1] if "Paris" in line)
    assert re.search(r"\x1b\[3[123]m", answer_line), repr(answer_line)
    # abstaining: a refusal instead of the answer
    t.type("/set abstain 0.01")
    t.wait_for_prompt("abstain = 0.01")
    t.type(question)
    screen = t.wait_for_prompt("[abstained")
    tail = screen[screen.rfind(question):]
    assert "I'm not sure enough to answer that (risk 0." in tail and "Paris" not in tail
    t.type("/bye")
    assert t.exit_status() == 0


@needs_tmux
@pytest.mark.parametrize("enter", [True, False], ids=["line", "partial"])
def test_chat_discards_what_was_typed_during_an_answer(terminal, smollm2_path, enter):
    t = terminal("run", str(smollm2_path), "--layers", "none", "--max-tokens", "200", *FAST)
    t.wait_for_prompt("Type /help")
    question = "Count from 1 to 200, separated by commas."
    t.type(question)
    t.wait_for(lambda s: re.search(re.escape(question) + r"\n(.*\n){3}", s) is not None, "the answer to stream")
    t.keys("-l", "typed ahead")
    if enter:
        t.keys("Enter")
    screen = t.wait_for_prompt("was discarded")
    assert "note: what you typed while the answer was streaming was discarded" in screen
    assert screen.rstrip().endswith(">>>")  # an empty prompt: "typed ahead" is neither asked nor pending
    assert screen.count(" tok/s") == 1  # one answer only
    t.type("/bye")
    assert t.exit_status() == 0


@needs_tmux
@pytest.mark.parametrize("key", ["C-c", "C-d"])
def test_chat_exits_cleanly_at_an_empty_prompt(terminal, smollm2_path, key):
    t = terminal("run", str(smollm2_path), *FAST)
    t.wait_for_prompt("Type /help")
    # Each key once the chat waits for input: a signal that lands while readline handles other
    # keys can be held until the next key (CPython's readline checks for signals only around its
    # select).
    t.wait_idle()
    t.keys("partly typed")
    t.wait_for(lambda s: s.rstrip().endswith(">>> partly typed"), "the typed text")
    t.wait_idle()
    t.keys("C-c")  # discards the line, does not exit
    t.wait_for(lambda s: s.rstrip().endswith(">>> partly typed\n>>>"), "a fresh prompt")
    t.wait_idle()
    t.keys(key)
    assert t.exit_status() == 0
    # leaving the cursor on a fresh line for the shell
    assert t.wait_for(lambda s: "[exited]" in s, "the exit").rstrip().endswith(">>> partly typed\n>>>\n[exited]")
