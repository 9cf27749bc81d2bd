"""Malformed GGUF files get a Python exception, never an abort.

Each file is loaded, described and run in a child process, so a GGML_ASSERT or a segfault shows
up as a crashed child (and the name of the file) instead of killing pytest. The cases are the
ones that used to abort the interpreter or surface raw C++ exceptions, plus seeded random byte
mutations of the GGUF header (metadata and tensor infos) of a tiny model and of SmolLM2.
"""

import shutil
import subprocess
import sys

import gguf
import numpy as np

from dola_cpp.synthetic import write_llama_gguf

WORKER = r"""
import sys, dola_cpp
for i, path in enumerate(sys.argv[1:]):
    print("START", i, flush=True)
    try:
        m = dola_cpp.Model(path, n_ctx=64)
        (m.metadata(), m.description, m.architecture, m.chat_template)
        m.generate("the capital of France", max_tokens=2, layers="high")
        m.score("the", " a", layers="low")
        print("OK", i, flush=True)
    except dola_cpp.DolaError as e:
        print("ERR", i, str(e).replace("\n", " "), flush=True)
    except Exception as e:
        print("EXC", i, type(e).__name__, str(e).replace("\n", " "), flush=True)
"""

INPLACE_WORKER = r"""
import sys, dola_cpp
path, mutations = sys.argv[1], sys.argv[2:]
with open(path, "rb") as f:
    original = f.read(max(int(m.split(":")[0]) for m in mutations) + 4)
for i, m in enumerate(mutations):
    pos, value = m.split(":")
    pos = int(pos)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(bytes.fromhex(value))
    print("START", i, flush=True)
    try:
        model = dola_cpp.Model(path, n_ctx=64)
        (model.metadata(), model.description, model.architecture, model.chat_template)
        model.generate("The capital of France", max_tokens=2, layers="high")
        print("OK", i, flush=True)
    except dola_cpp.DolaError as e:
        print("ERR", i, str(e).replace("\n", " "), flush=True)
    except Exception as e:
        print("EXC", i, type(e).__name__, str(e).replace("\n", " "), flush=True)
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(original[pos:pos + len(bytes.fromhex(value))])
"""


def run_children(worker: str, fixed: list[str], items: list[str]) -> list[str]:
    """Outcome per item: 'OK', 'ERR <message>', 'EXC <type> <message>' or 'CRASH <signal> <stderr>'.
    A crashed child is restarted after the item it crashed on."""
    outcomes: list[str | None] = [None] * len(items)
    start = 0
    while start < len(items):
        # -I: not the source checkout in the working directory (it has no compiled module)
        p = subprocess.run([sys.executable, "-I", "-c", worker, *fixed, *items[start:]], capture_output=True, text=True,
                           errors="replace", timeout=900)
        current = start
        for line in p.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind not in ("START", "OK", "ERR", "EXC"):
                continue  # llama.cpp may print to stdout
            index, _, message = rest.partition(" ")
            j = start + int(index)
            if kind == "START":
                current = j
            else:
                outcomes[j] = f"{kind} {message}".strip()
        if p.returncode == 0:
            break
        lines = [ln for ln in p.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
        outcomes[current] = f"CRASH {p.returncode} {lines[:2]}"
        start = current + 1
    return [o or "MISSING" for o in outcomes]


# name: (write_llama_gguf options, expected text in the error; None = must load and run)
CASES = {
    "valid": ({}, None),
    "one layer, tied": ({"n_layer": 1, "tied": True}, None),
    "hostile chat template": ({"metadata": {"tokenizer.chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}}, None),
    "no layers": ({"metadata": {"llama.block_count": 0}}, "llama.block_count is 0"),
    "100000 layers": ({"metadata": {"llama.block_count": 100000}}, "llama.block_count is 100000"),
    "2^32-1 layers": ({"metadata": {"llama.block_count": 2**32 - 1}}, "supports 1..512 layers"),
    "negative norm eps": ({"metadata": {"llama.attention.layer_norm_rms_epsilon": -1.0}}, "layer_norm_rms_epsilon"),
    "NaN norm eps": ({"metadata": {"llama.attention.layer_norm_rms_epsilon": float("nan")}}, "must be >= 0"),
    "duplicate token": ({"extra_words": ["▁the", "▁a", "▁the"]}, "lists the token '▁the' twice"),
    "no vocabulary": ({"metadata": {"tokenizer.ggml.tokens": None}}, "cannot find tokenizer vocab"),
    "NaN rope base": ({"metadata": {"llama.rope.freq_base": float("nan")}}, "non-finite logits"),
    "zero heads": ({"metadata": {"llama.attention.head_count": 0}}, "wrong shape"),
    "unknown architecture": ({"metadata": {"general.architecture": "foo"}}, "unknown model architecture: 'foo'"),
    "architecture without its keys": ({"metadata": {"general.architecture": "gemma3"}}, "key not found in model: gemma3."),
    "missing tensor": ({"drop_tensors": ["blk.0.attn_q.weight"]}, "tensor 'blk.0.attn_q.weight' not found"),
    "wrong tensor shape": ({"tensor_shapes": {"output.weight": (100, 32)}}, "tensor 'output.weight' has wrong shape"),
    "short token-type array": ({"metadata": {"tokenizer.ggml.token_type": [1, 1]}}, "out of array bounds"),
    "unknown tokenizer": ({"metadata": {"tokenizer.ggml.model": "foo"}}, "unknown tokenizer: 'foo'"),
}


def test_malformed_metadata_gets_a_clear_error(tmp_path):
    paths = []
    for i, (options, _) in enumerate(CASES.values()):
        paths.append(str(write_llama_gguf(tmp_path / f"case{i}.gguf", **options)))
    # a vocabulary without the byte token a prompt needs: rename <0x63> ('c')
    no_byte = tmp_path / "no_byte.gguf"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" if b != 0x63 else "c_" for b in range(256)]
    types = [2, 3, 3] + [6 if b != 0x63 else 1 for b in range(256)]
    write_llama_gguf(no_byte, metadata={"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}, extra_words=[])
    outcomes = run_children(WORKER, [], paths + [str(no_byte)])
    expected = [e for _, e in CASES.values()] + ["could not tokenize the text: the model's vocabulary is malformed"]
    wrong = []
    for name, want, got in zip([*CASES, "no byte token"], expected, outcomes):
        ok = got == "OK" if want is None else got.startswith("ERR ") and want in got
        if not ok:
            wrong.append(f"{name}: expected {'OK' if want is None else want!r}, got {got}")
    assert not wrong, "\n".join(wrong)


def mutations(header: bytes, n: int, seed: int) -> list[list[tuple[int, bytes]]]:
    """n seeded mutations of 1-3 edits each inside the header: a random byte, a flipped bit, or
    0x7fffffff written over four bytes (a huge length or count)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        edits = []
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(header) - 4))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                edits.append((pos, bytes([int(rng.integers(0, 256))])))
            elif kind == 1:
                edits.append((pos, bytes([header[pos] ^ (1 << int(rng.integers(0, 8)))])))
            else:
                edits.append((pos, b"\xff\xff\xff\x7f"))
        out.append(edits)
    return out


def test_random_header_mutations_never_abort(tmp_path):
    src = write_llama_gguf(tmp_path / "tiny.gguf")
    data = src.read_bytes()
    header = data[: gguf.GGUFReader(src).data_offset]
    paths = []
    for i, edits in enumerate(mutations(header, 300, seed=1)):
        b = bytearray(data)
        for pos, value in edits:
            b[pos:pos + len(value)] = value
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(b))
        paths.append(str(path))
    outcomes = run_children(WORKER, [], paths)
    bad = [f"m{i}.gguf: {o}" for i, o in enumerate(outcomes) if not o.startswith(("OK", "ERR "))]
    assert not bad, "\n".join(bad)
    # the mutations do reach the parser: most are rejected, some still load
    n_err = sum(o.startswith("ERR ") for o in outcomes)
    assert 100 < n_err < 300


def test_random_header_mutations_of_smollm2_never_abort(smollm2_path, tmp_path):
    """The real tokenizer (49152 BPE tokens and merges) is most of the header."""
    path = tmp_path / "smollm2.gguf"
    shutil.copy(smollm2_path, path)
    with open(smollm2_path, "rb") as f:
        header = f.read(gguf.GGUFReader(smollm2_path).data_offset)
    items = []
    for edits in mutations(header, 120, seed=2):
        pos, value = edits[0]  # one edit per item: the worker restores it afterwards
        items.append(f"{pos}:{value.hex()}")
    outcomes = run_children(INPLACE_WORKER, [str(path)], items)
    bad = [f"{item}: {o}" for item, o in zip(items, outcomes) if not o.startswith(("OK", "ERR "))]
    assert not bad, "\n".join(bad)
    assert any(o.startswith("ERR ") for o in outcomes) and any(o == "OK" for o in outcomes)
