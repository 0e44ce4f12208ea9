"""The one way every entry point runs (``data_pipeline.prepare``/``merge``, ``mtrain.train``/
``export``/``evaluate``/``generate``/``embed``): Hydra composes ``conf/<name>.yaml`` onto the app's
typed config, the dataclasses validate themselves, and a bad input of any kind ends in one line
naming it and the fix, from rank 0 only, with exit code 2 (the input, not the program).
"""

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.errors import InputError

# The one conf/ tree every app reads (an absolute path: Hydra resolves a relative one against
# the module that defines the task function, which is this one, not the app's).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# The exit code of a run refused for its input (a config key, a path, a file): a job script
# can tell it from a crash (1) and from a preemption (75) and not retry it.
EXIT_INPUT = 2


# What a user cannot act on, silenced where it starts: torchdata's own deprecation of an API it
# calls itself, DeepSpeed's probes for compilers and async I/O that training does not use.
NOISE = (r".*set_vital.*", r".*torch\.distributed\.\w+_tensor` is deprecated")
INPUT_ERRORS = (InputError, ValueError, FileNotFoundError, NotADirectoryError)


def rank() -> int:
    """This process's rank as the launcher set it (torchrun, srun, submitit), before any
    process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def quiet_third_parties() -> None:
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # DeepSpeed logs its accelerator and op-builder probes (gcc, libaio) at INFO/WARNING.
    os.environ.setdefault("DS_ACCELERATOR_VERBOSE", "0")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def entry_point(
    config_name: str, schema: type, body: Callable[[Any, list[str]], int | None]
) -> Callable[[], None]:
    """The ``main`` of an app: composes ``conf/<config_name>.yaml`` onto ``schema``, builds the
    typed config (its ``__post_init__`` checks run here) and calls ``body(cfg, overrides)``,
    whose return value is the exit code. An input error ends the process with one line and
    ``EXIT_INPUT``; only rank 0 says it."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    started = False

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def run(raw: DictConfig) -> None:
        nonlocal started
        started = True
        sys.stderr = sys.__stderr__
        if rank() != 0:
            # Other ranks log to their own file in full, to the console only what is off.
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler:
                    handler.setLevel(logging.WARNING)
        try:
            cfg = OmegaConf.to_object(raw)
            code = body(cfg, list(HydraConfig.get().overrides.task))
        except (*INPUT_ERRORS, OmegaConfBaseException) as exc:
            if rank() == 0:
                # stderr whatever the app's logging (some log to stdout): this is what went wrong.
                print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_INPUT)
        sys.exit(code or 0)

    def main() -> None:
        quiet_third_parties()
        if rank() != 0:
            # Hydra reports a bad override on stderr before the app starts: rank 0 says it once
            # (stderr is given back as soon as the app runs).
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115
        try:
            run()
        except SystemExit as exc:
            sys.stderr = sys.__stderr__
            # Hydra exits 1 on an override it cannot compose: that is the input too.
            if not started and exc.code not in (0, None):
                sys.exit(EXIT_INPUT)
            raise

    return main
