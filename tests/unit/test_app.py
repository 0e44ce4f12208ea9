"""The one app runner: every entry point turns a bad input into one line and exit code 2."""

import os

import pytest
from conftest import run_module

from data_pipeline.app import EXIT_INPUT, one_line

HYDRA_MISSING_OPTION = """In 'train': Could not find 'model/gpt_9t'

Available options in 'model':
\tgpt_125m
\ttiny
Config search path:
\tprovider=hydra, path=pkg://hydra.conf
\tprovider=main, path=file:///work/main/conf

Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""


def test_hydra_reports_become_one_line_without_its_chatter():
    assert one_line(HYDRA_MISSING_OPTION) == (
        "In 'train': Could not find 'model/gpt_9t'; Available options in 'model': gpt_125m, tiny"
    )
    typed = (
        "Error merging override optim.lr=fast\nValue 'fast' of type 'str' could not be "
        "converted to Float\n    full_key: optim.lr\n    reference_type=OptimConfig\n"
        "    object_type=OptimConfig\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a "
        "complete stack trace.\n"
    )
    assert one_line(typed) == (
        "Error merging override optim.lr=fast; Value 'fast' of type 'str' could not be "
        "converted to Float; full_key: optim.lr"
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("module", "overrides", "says"),
    [
        # Hydra cannot compose it: an unknown key.
        ("mtrain.export", ["checkpoint=x", "output=y", "outptu=z"], "outptu"),
        # A mandatory key left out.
        ("mtrain.export", [], "checkpoint"),
        # The app's own input check (a directory that is not a run).
        ("mtrain.export", ["checkpoint=/nonexistent", "output=/tmp/x"], "/nonexistent"),
        # A dataclass's __post_init__.
        ("data_pipeline.prepare", ["workers=0"], "workers=0 must be at least 1"),
        # merge (an app that used to end in a Hydra traceback).
        ("data_pipeline.merge", ["output=/nonexistent/ds"], "no slice cards"),
    ],
)
def test_every_kind_of_bad_input_is_one_line_and_exit_2(tmp_path, module, overrides, says):
    proc = run_module(module, *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == EXIT_INPUT, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


def test_other_ranks_stay_quiet(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    proc = run_module(
        "mtrain.export", "outptu=z", f"hydra.run.dir={tmp_path}", env=env, check=False
    )
    assert proc.returncode == EXIT_INPUT
    assert error_lines(proc.stderr) == []
