"""The apps' shared runner turns Hydra's reports into one line (tests/e2e/test_app_errors.py
runs the apps with bad input)."""

from data_pipeline.app import one_line

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
