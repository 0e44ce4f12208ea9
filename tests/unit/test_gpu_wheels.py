"""bench/gpu-wheels.txt, the wheels the GPU check carries to an image without network: nothing
missing that the image lacks, nothing outside mtrain's ranges."""

import importlib.util
import sys

from packaging.utils import canonicalize_name
from support.apps import REPO

spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "bench" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
sys.modules["gpu_wheels"] = gpu_wheels
spec.loader.exec_module(gpu_wheels)
REMAKE = ".venv/bin/python bench/gpu_wheels.py lock > bench/gpu-wheels.txt"


def test_the_lock_carries_every_requirement_the_image_lacks():
    """Each requirement of mtrain and of every carried package, under the image's Python 3.12
    markers, as this environment (CI's) resolved them: carried, in the image, or left out."""
    carry, image = gpu_wheels.carried(gpu_wheels.TARGET)
    locked = gpu_wheels.locked()
    assert set(locked) == set(carry), f"the lock is stale: {REMAKE}"
    assert {"deepspeed", "hydra-core", "antlr4-python3-runtime", "pydantic-core"} <= set(locked)
    assert {"platformdirs", "pysmartdl", "braceexpand"} <= set(locked)  # symusic's, webdataset's
    assert not set(locked) & (set(gpu_wheels.LEFT_OUT) | set(image))


def test_locked_versions_are_within_mtrains_ranges():
    locked = gpu_wheels.locked()
    for req in gpu_wheels.mtrain_requirements():
        version = locked.get(canonicalize_name(req.name))
        assert version is None or req.specifier.contains(version), (req, version)
