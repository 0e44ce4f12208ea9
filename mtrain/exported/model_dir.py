"""An exported model directory: the names of its files, and its model read back."""

import json
from pathlib import Path

from safetensors.torch import load_model

from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import model_shape

# An exported model directory's contents.
WEIGHTS, CONFIG, TOKENIZER, HF = "model.safetensors", "config.json", "tokenizer", "hf"


def load_exported(path: str | Path) -> tuple[GPT, dict]:
    """The exported model (eval mode, CPU) and its config.json."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(
            f"{path / WEIGHTS} not found: export a checkpoint first with "
            f"`python -m mtrain.export checkpoint=<run_dir> output={path}`"
        )
    meta = json.loads((path / CONFIG).read_text())
    model = GPT(GPTConfig(**model_shape(meta["model"])))
    load_model(model, str(path / WEIGHTS))
    return model.eval(), meta
