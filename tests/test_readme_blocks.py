"""Every code block of README.md, copied and run as a user would: each Python block on its
own (a user pastes one block, so each must carry its imports), and the ``normlab explain``
command lines. Blocks that cannot run inside a test say why in their skip reason."""

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [(README.read_text(encoding="utf-8")[:m.start()].count("\n") + 1, m.group(1), m.group(2))
          for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)]

# what a block needs that a test cannot give it, by a line it contains
SKIPS = {
    "init_process_group": "needs one process per rank, started by torchrun (tests/test_torch_sync.py runs the recipe)",
    "pip install": "installs the package and runs this suite: run it in a fresh checkout yourself",
    "normlab bench": "benchmarks take minutes; tests/test_bench_cli.py runs them small",
    "import lightning": "needs PyTorch Lightning, whose DDP starts processes (tests/test_lightning.py runs the recipe)",
    "register_forward_pre_hook": "builds a speech model of full width (tests/test_convert_vision_speech.py runs it "
                                 "against the original model on each clip alone)",
}


def _skip_reason(text):
    return next((why for key, why in SKIPS.items() if key in text), None)


PYTHON = [pytest.param(text, id=f"line{line}") for line, lang, text in BLOCKS if lang == "python"]
SHELL = [pytest.param(text, id=f"line{line}") for line, lang, text in BLOCKS if lang == "bash"]


def test_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON) >= 10 and len(SHELL) >= 2


@pytest.mark.parametrize("text", PYTHON)
def test_readme_python_block_runs_on_its_own(text, tmp_path, monkeypatch):
    reason = _skip_reason(text)
    if reason:
        pytest.skip(reason)
    if re.search(r"^\s*(import torch|from normlab\.torch|import normlab\.torch)", text, flags=re.M):
        pytest.importorskip("torch", reason="the block uses normlab.torch, which needs PyTorch")
    monkeypatch.chdir(tmp_path)
    exec(compile(text, "README.md block", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("text", SHELL)
def test_readme_shell_block_runs(text, tmp_path, monkeypatch, capsys):
    reason = _skip_reason(text)
    if reason:
        pytest.skip(reason)
    from normlab.cli import main

    monkeypatch.chdir(tmp_path)
    for line in text.strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == "normlab", f"only normlab commands are run here: {line}"
        assert main(words[1:]) == 0, capsys.readouterr().err
