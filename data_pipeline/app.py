"""The one way every entry point runs (``data_pipeline.prepare``/``merge``, ``mtrain.train``/
``export``/``evaluate``/``generate``/``embed``): Hydra composes ``conf/<name>.yaml`` onto the app's
typed config, the dataclasses validate themselves, and a bad input of any kind ends in one line
naming it and the fix, from rank 0 only, with exit code 2 (the input, not the program).
"""

import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.errors import ConfigError, InputError
from data_pipeline.launch import placement_from_env

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
# Lines of Hydra's error report that say nothing about the input.
HYDRA_CHATTER = ("Set the environment variable HYDRA_FULL_ERROR", "reference_type=", "object_type=")
OTHER_RANKS_WAIT_S = 3.0
log = logging.getLogger(__name__)


def config_dict(cfg: Any) -> dict:
    """A typed config as plain data (enums by name, interpolations resolved): what runs record
    in their cards, reports and wandb."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def quiet_third_parties() -> None:
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # DeepSpeed's op builders probe for libaio by compiling a test program through distutils,
    # whose compiler logs each gcc command line at INFO.
    logging.getLogger("compilers").setLevel(logging.WARNING)


def entry_point(
    config_name: str,
    schema: type,
    body: Callable[[Any, list[str]], int | None],
    moved: dict[str, str] | None = None,
    point_failures: tuple[type[Exception], ...] = (),
) -> Callable[[], None]:
    """The ``main`` of an app: composes ``conf/<config_name>.yaml`` onto ``schema``, builds the
    typed config (its ``__post_init__`` checks run here) and calls ``body(cfg, overrides)``,
    whose return value is the exit code. An input error ends the process with one line and
    ``EXIT_INPUT``; only rank 0 says it. ``moved`` maps keys the schema no longer has to where
    they are now: a config or override still setting one is refused naming the new key.

    In a Hydra multirun (``-m``) one point's input error, non-zero exit code or
    ``point_failures`` exception is said in one line and the sweep goes on to the next point;
    the process then exits with the highest of their codes. A body that must end the whole
    sweep (a preemption) calls ``sys.exit`` itself."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    moved = moved or {}
    started = False
    failed: list[tuple[str, int]] = []  # (the point, its exit code) in a multirun

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def run(raw: DictConfig) -> None:
        nonlocal started
        started = True
        sys.stderr = sys.__stderr__
        quiet_third_parties()  # again: Hydra has just configured logging
        if placement_from_env().rank != 0:
            # Other ranks log to their own file in full, to the console only what is off.
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler:
                    handler.setLevel(logging.WARNING)
        try:
            # Hydra lets "+section.key=value" add a key the schema lacks; to_object drops it unsaid.
            for old in moved:
                if OmegaConf.select(raw, old) is not None:
                    raise ConfigError(moved_keys_said(f"full_key: {old}", moved))
            cfg = OmegaConf.to_object(raw)
            code = body(cfg, list(HydraConfig.get().overrides.task))
        except (*INPUT_ERRORS, OmegaConfBaseException) as exc:
            if not in_multirun():
                refuse(str(exc))
            code = point_failed(failed, str(exc), EXIT_INPUT)
        except point_failures as exc:
            if not in_multirun():
                raise
            code = point_failed(failed, f"{type(exc).__name__}: {exc}", 1)
        else:
            if code and in_multirun():
                point_failed(failed, f"exited with code {code}", code)
        if not in_multirun():
            sys.exit(code or 0)

    def main() -> None:
        quiet_third_parties()
        # Hydra reports an override it cannot compose on stderr, over several lines, and exits
        # with 1 before the app starts: held back here and said as one line.
        held = sys.stderr = io.StringIO()
        try:
            run()
            if failed:
                if placement_from_env().rank == 0:
                    print(
                        f"error: {len(failed)} point(s) of the sweep failed: "
                        + "; ".join(f"{point} (exit {code})" for point, code in failed),
                        file=sys.stderr,
                        flush=True,
                    )
                sys.exit(max(code for _, code in failed))
        except SystemExit as exc:
            sys.stderr = sys.__stderr__
            if not started and exc.code not in (0, None):
                refuse(moved_keys_said(held.getvalue(), moved))
            # --help, --cfg and the like: said as Hydra says it.
            if not started and placement_from_env().rank == 0:
                sys.stderr.write(held.getvalue())
            raise

    return main


def in_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def point_failed(failed: list[tuple[str, int]], message: str, code: int) -> int:
    """Notes a failed point of a multirun, saying why in one line (rank 0), and returns its
    exit code."""
    hydra_cfg = HydraConfig.get()
    point = f"point {hydra_cfg.job.num} ({hydra_cfg.runtime.output_dir})"
    failed.append((point, code))
    if placement_from_env().rank == 0:
        print(f"error: {point}: {one_line(message)}", file=sys.stderr, flush=True)
    return code


def moved_keys_said(report: str, moved: dict[str, str]) -> str:
    """A report of an unknown key (Hydra's ``full_key: ...``), led by where that key is now
    when it is one that moved."""
    notes = [
        f"{old} is no longer a key: set {new} instead"
        for old, new in moved.items()
        if re.search(rf"^\s*full_key: {re.escape(old)}$", report, flags=re.MULTILINE)
    ]
    return "\n".join([*notes, report])


def refuse(message: str) -> None:
    """Ends the process for a bad input: rank 0 says why on stderr (whatever the app's logging
    does with its own lines); the other ranks, which met the same input, note it in their log
    file and give rank 0 a moment, so that a launcher stopping the job at the first exit
    reports rank 0's line as the root cause."""
    if placement_from_env().rank == 0:
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    else:
        log.info("input error (rank 0 reports it): %s", message)
        time.sleep(OTHER_RANKS_WAIT_S)
    sys.exit(EXIT_INPUT)


def one_line(report: str) -> str:
    """A multi-line error report (Hydra's, OmegaConf's, a list of config problems) as one
    line: its sentences joined, option lists comma-separated; Hydra's search path, stack-trace
    hint and type dump left out."""
    sentences: list[str] = []
    for line in report.split("Config search path:")[0].splitlines():
        text = line.strip().rstrip(".")
        if not text or text.startswith(HYDRA_CHATTER):
            continue
        if sentences and sentences[-1].endswith(":"):
            sentences[-1] += " " + text
        elif sentences and line.startswith("\t"):  # the next option of a list
            sentences[-1] += ", " + text
        else:
            sentences.append(text)
    return "; ".join(sentences) or "the config could not be composed"
