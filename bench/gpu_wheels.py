"""The wheels bench/gpu.sh carries to a GPU image: what mtrain needs that the image lacks, at
the versions CI installs (``lock``), and, on the GPU machine, the check that they are all there
and that mtrain imports (``check``).

    # here, in the environment `pip install -e '.[dev]'` made (what CI runs):
    .venv/bin/python bench/gpu_wheels.py lock > bench/gpu-wheels.txt
    # there, after installing the wheels (bench/gpu.sh does both):
    python3 bench/gpu_wheels.py check
"""

import argparse
import importlib
import importlib.metadata as metadata
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "bench" / "gpu-wheels.txt"
# mtrain's requirements the GPU check does without, and why.
LEFT_OUT = {
    "torch": "the image's own CUDA build",
    "music21": "the built-in corpus: the dataset is prepared before, not on the GPU machine",
    "wandb": "logger.mode=disabled",
    "s3fs": "object storage: the dataset is a local directory",
    "soundfile": "wandb.Audio's reader; wandb is left out",
    "scipy": "the scaling-law fit, run where the sweep's run directories are",
    "scikit-learn": "embedding probes (mtrain.embed), not part of the GPU check",
    "faiss-cpu": "similarity search (mtrain.search), not part of the GPU check",
    "peft": "LoRA fine-tuning, not part of the GPU check",
}
# Packages the GPU image ships (its package list of 2026-11) that mtrain's requirements reach:
# used as they are there, with their own dependencies; anything else is carried.
IMAGE_HAS = {
    "einops", "fsspec", "huggingface-hub", "matplotlib", "msgpack", "ninja", "numpy",
    "packaging", "protobuf", "psutil", "py-cpuinfo", "pyyaml", "requests", "safetensors",
    "sentencepiece", "tokenizers", "tqdm", "transformers", "typing-extensions", "urllib3",
}  # fmt: skip
# The GPU image's interpreter, for the requirements' environment markers.
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64"}  # fmt: skip
# What the GPU check runs: the trainer, the export, generation, and the engine they drive.
MODULES = ("deepspeed", "mtrain.train", "mtrain.export", "mtrain.generate")


def applies(req: Requirement, env: dict) -> bool:
    return req.marker is None or req.marker.evaluate({**env, "extra": ""})


def mtrain_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def carried(env: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(carried, from the image): name -> the version installed in this environment, for every
    package mtrain's requirements reach (those of carried packages, recursively, under the
    target's markers), except those left out."""
    carry: dict[str, str] = {}
    image: dict[str, str] = {}
    todo = [r for r in mtrain_requirements() if applies(r, env)]
    while todo:
        name = canonicalize_name(todo.pop().name)
        if name in LEFT_OUT or name in carry or name in image:
            continue
        dist = metadata.distribution(name)
        if name in IMAGE_HAS:
            image[name] = dist.version
            continue
        carry[name] = dist.version
        todo += [r for r in map(Requirement, dist.requires or []) if applies(r, env)]
    return carry, image


def lock() -> None:
    carry, image = carried(TARGET)
    print("# Wheels bench/gpu.sh carries to the GPU image (Python 3.12, x86_64), at CI's versions:")
    print("#   .venv/bin/python bench/gpu_wheels.py lock > bench/gpu-wheels.txt")
    for name, why in LEFT_OUT.items():
        print(f"# left out: {name} ({why})")
    print("# from the image (CI has): " + ", ".join(f"{n} {v}" for n, v in sorted(image.items())))
    for name, version in sorted(carry.items()):
        print(f"{name}=={version}")


def locked() -> dict[str, str]:
    pins = [line.split("==") for line in LOCK.read_text().splitlines() if "==" in line]
    return {canonicalize_name(name): version for name, version in pins}


def unmet() -> list[str]:
    """Each requirement of the locked packages and of mtrain (left-out ones aside) that this
    interpreter's packages do not meet, as a line; a locked package at another version too."""
    env = default_environment()
    problems = []
    reqs = [(r, "mtrain") for r in mtrain_requirements()]
    for name, version in locked().items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (locked {version})")
            continue
        if dist.version != version:
            problems.append(f"{name}: {dist.version} installed, {version} locked")
        reqs += [(Requirement(r), name) for r in dist.requires or []]
    for req, by in reqs:
        if not applies(req, env) or canonicalize_name(req.name) in LEFT_OUT:
            continue
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (for {by}): not installed")
            continue
        if not req.specifier.contains(found, prereleases=True):
            problems.append(f"{req} (for {by}): {found} installed")
    return problems


def check() -> None:
    """Fails fast, before any GPU time: every requirement met, the apps importable; prints the
    versions the GPU check runs with."""
    problems = unmet()
    for line in problems:
        print(f"unmet: {line}", file=sys.stderr)
    if problems:
        raise SystemExit(f"{len(problems)} unmet requirement(s): carry them (gpu.sh --fetch)")
    for module in MODULES:
        importlib.import_module(module)
    import torch

    versions = {n: metadata.version(n) for n in ("torch", "deepspeed", "transformers", "numpy")}
    print(
        f"Python {sys.version.split()[0]}; "
        + ", ".join(f"{n} {v}" for n, v in versions.items())
        + f"; CUDA {torch.version.cuda}, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["lock", "check"])
    {"lock": lock, "check": check}[parser.parse_args().command]()


if __name__ == "__main__":
    main()
