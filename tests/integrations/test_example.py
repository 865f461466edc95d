"""``examples/transformers_drop_in.py`` runs and prints what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformers_drop_in.py"


def test_example_runs(capsys) -> None:
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():  # float32 on the CPU: the same tokens (bfloat16 on a GPU may differ)
        assert "greedy generation: 40 of 40 new tokens as before the patch" in printed
    else:
        assert "greedy generation:" in printed
    assert "one training step: loss" in printed
