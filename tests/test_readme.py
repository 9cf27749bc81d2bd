"""Every code block in the README and in docs/*.md runs as written: the Python blocks whole, and
each command of the shell blocks, except the install and build commands (CI runs the install
itself, a build takes minutes) and the test suite (this is it). Every relative link in them
points to a file that exists, and to a heading of it where it names one."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TEXTS = {page: page.read_text() for page in PAGES}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
# what each block language is: run (python whole, bash command by command) or shown only
# (sh: commands for other machines, such as rpc-server's; text: diagrams)
RUN, SHOWN = ("python", "bash"), ("sh", "text")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


BLOCKS = [(page, lang.strip(), body) for page in PAGES for lang, body in FENCE.findall(TEXTS[page])]


def _unique(items):
    return list(dict.fromkeys(items))  # a block or command shown on two pages runs once


def _commands(blocks) -> list[str]:
    out = []
    for _, lang, body in blocks:
        if lang != "bash":
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
            if line and not line.startswith("#"):
                out += [part.strip() for part in line.split("&&")]
    return out


def _kind(command: str) -> str:
    words = shlex.split(command)
    env = [w for w in words if re.match(r"^[A-Z_]+=", w)]
    words = words[len(env):]
    if words[:1] == ["dola-cpp"]:
        return "cli"
    if words[:1] in (["pip"], ["pytest"], ["python3"], ["."]) or "pip install" in command:
        return "install or tests"
    return "unknown"


PYTHON_BLOCKS = _unique(body for _, lang, body in BLOCKS if lang == "python")
COMMANDS = _unique(_commands(BLOCKS))


def _env(tmp_path: Path) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), NO_COLOR="1")


def test_readme_has_blocks_and_every_command_is_known():
    readme = [b for b in BLOCKS if b[0] == README]
    assert [b for b in readme if b[1] == "python"] and _commands(readme)
    unknown = [c for c in COMMANDS if _kind(c) == "unknown"]
    assert not unknown, f"documented commands this test does not know how to check: {unknown}"


def test_every_code_block_says_whether_it_runs():
    """A block without a language, or in one this test does not know, would be skipped silently."""
    odd = [f"{_name(page)}: ```{lang}" for page, lang, _ in BLOCKS if lang not in RUN + SHOWN]
    assert not odd, odd
    for page in PAGES:  # every fence is opened and closed in pairs: none swallowed a page's text
        fences = re.findall(r"^```", TEXTS[page], re.M)
        assert len(fences) == 2 * len(FENCE.findall(TEXTS[page])), _name(page)


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    assert len(TEXTS[README].splitlines()) <= 300
    linked = {target for _, target in _links(README)}
    missing = [_name(p) for p in PAGES[1:] if _name(p) not in {t.split("#")[0] for t in linked}]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda c: c.splitlines()[0][:40])
def test_python_block_runs(code, tmp_path, request):
    if "evaldata" in code:
        request.getfixturevalue("data_mirror").prefetch("factor-expert")  # see test_cli_command_runs
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if _kind(c) == "cli"])
def test_cli_command_runs(command, tmp_path, request):
    if command.startswith("dola-cpp eval"):
        # the published data files come from a local mirror of the repository's rows (tests/data;
        # CI has no route to GitHub), into a private cache. TruthfulQA downloads in the command
        # itself; expert_factor.csv is downloaded here first, where the mirror's sample passes
        # the digest check (conftest.DataMirror)
        mirror = request.getfixturevalue("data_mirror")
        if "factor" in command:
            mirror.prefetch("factor-expert")
    r = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env=_env(tmp_path), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])


# ------------------------------------------------------------------ links


def _prose(text: str) -> str:
    """The text without its code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _links(page: Path) -> list[tuple[Path, str]]:
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(TEXTS[page]))
    return [(page, t) for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens,
    a repeated heading's anchor numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", page.read_text()), re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            slug = f"{slug}-{seen[slug]}"
        seen.setdefault(slug, 0)
    return set(seen)


LINKS = [link for page in PAGES for link in _links(page)]


def test_the_pages_have_relative_links():
    assert LINKS and any(t.startswith("docs/") for p, t in LINKS if p == README)


@pytest.mark.parametrize("page, target", LINKS, ids=[f"{_name(p)}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.is_file(), f"{_name(page)}: {target}: no such file"
    assert ROOT in file.parents, f"{_name(page)}: {target} points outside the repository"
    if anchor:
        assert file.suffix == ".md", f"{_name(page)}: {target}: an anchor into a file that is not markdown"
        assert anchor in _anchors(file), f"{_name(page)}: {target}: {file.name} has no heading #{anchor}"
