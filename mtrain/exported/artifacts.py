"""The exported-model format: a training checkpoint -> one consolidated model directory,
loadable without DeepSpeed, and the ways it is loaded (inference, data, fine-tuning).

An export (``python -m mtrain.export``) writes
``model.safetensors`` (fp32, tied embeddings stored once), ``config.json`` (the model shape and
provenance), ``tokenizer/`` (the artifact the model was trained with) and ``hf/`` for
``transformers.AutoModelForCausalLM.from_pretrained`` (GPT-2, GPT-NeoX or Llama: see
``mtrain.exported.transformers_format``). The merged weights are checked against logits the
training engine saved with the checkpoint, and ``hf/``, loaded back, against the merged
weights. ZeRO partitions are merged from the fp32 master weights with memory-mapped reads and the
optimizer moments dropped, so a model needs about twice its fp32 size in RAM, never its
optimizer state.

A checkpoint's files are checked against the sizes and CRC-32s of its marker first. A checkpoint
directory is trusted input: DeepSpeed's files are pickles, unpickled by DeepSpeed's own loaders
(``load_checkpoint``, ``zero_to_fp32``); only the ZeRO-0 model file is read here, as plain data.
"""

import dataclasses
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_model, save_model

from data_pipeline.errors import InputError
from data_pipeline.reader import load_card
from data_pipeline.storage import make_readable
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.transformers_format import hf_architecture, save_hf
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import COMPLETE_CHECKPOINTS, CheckpointDir, RunDir, model_shape
from mtrain.training.checkpointer import damage, latest_intact

log = logging.getLogger(__name__)
# An exported model directory's contents.
WEIGHTS, CONFIG, TOKENIZER, HF = "model.safetensors", "config.json", "tokenizer", "hf"


def resolve_checkpoint(path: Path) -> CheckpointDir:
    """``path`` itself when it is a complete checkpoint whose files match its marker (refused,
    naming the file, when they do not), else a run directory's newest intact one (damaged
    newer ones skipped with a warning)."""
    given = CheckpointDir(path)
    if given.complete:
        problems = damage(given)
        if problems:
            raise InputError(
                f"checkpoint={path} is damaged: {'; '.join(problems)}; export an older "
                "checkpoint, or give the run directory to take its newest intact one"
            )
        return given
    if path.is_dir() and not given.named_as_step:
        found, skipped = latest_intact(RunDir(path), move_aside=False)
        if found is not None:
            if skipped:
                log.warning("exporting %s: newer checkpoints are damaged", found.path)
            return found
    raise FileNotFoundError(
        f"checkpoint={path}: no complete checkpoint or model there; give an exported model "
        f"directory ({WEIGHTS}), a run directory with {COMPLETE_CHECKPOINTS}, "
        "or one such step directory"
    )


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from any ZeRO stage, without loading optimizer moments."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list(ckpt.glob("*_optim_states.pt")):
        # ZeRO stage 0: the whole module is in one file (memory-mapped, read lazily).
        model_file = ckpt / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(model_file, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError:
            # DeepSpeed's own objects (an fp16 loss scaler, say): unpickled in full, as
            # DeepSpeed's load_checkpoint does; a checkpoint directory is trusted input.
            log.info("%s holds DeepSpeed objects: unpickled in full (trusted input)", model_file)
            state = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    return {name: tensor.contiguous() for name, tensor in lazy.items()}


# The dtypes a probe's logits may have been computed in (probe.pt's "dtype"; absent: fp32).
PROBE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fp32 engines and the fp32 merge run the same math: differences are summation-order noise.
FP32_TOLERANCE = 1e-4
# bf16/fp16: a few units in the last place of the logits' scale. The same weights cast to bf16
# reproduce a CPU engine's logits exactly, but a GPU engine's kernels (fused attention, other
# reduction orders) round intermediates differently; ~1 ulp is what fp32-vs-bf16 differs by.
HALF_ULPS = 4


class ProbeCheck(NamedTuple):
    max_abs_diff: float
    dtype: str
    tolerance: float


def probe_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The largest logit difference a correct merge may show against ``reference`` logits
    computed in ``dtype``."""
    if dtype == torch.float32:
        return FP32_TOLERANCE
    scale = reference.abs().max().item()
    return max(FP32_TOLERANCE, HALF_ULPS * torch.finfo(dtype).eps * scale)


@torch.no_grad()
def probe_check(model: GPT, probe: dict) -> ProbeCheck:
    """Recomputes the probe batch's logits with ``model`` in the dtype the engine used (a
    cast copy; ``model`` itself stays fp32) and compares them with the saved ones."""
    name = probe.get("dtype", "float32")  # probes saved before the dtype was recorded: fp32
    if name not in PROBE_DTYPES:
        raise RuntimeError(f"probe logits computed in {name}, expected one of {list(PROBE_DTYPES)}")
    dtype = PROBE_DTYPES[name]
    model.eval()
    if dtype == torch.float32:
        logits = model(probe["inputs"]).logits
    else:
        # Tied parameters appear once in named_parameters(); functional_call ties them again.
        cast = {
            key: t.to(dtype) if t.is_floating_point() else t
            for key, t in [*model.named_parameters(), *model.named_buffers()]
        }
        logits = torch.func.functional_call(model, cast, (probe["inputs"],)).logits.float()
    reference = probe["logits"].float()
    if logits.shape != reference.shape:
        return ProbeCheck(float("inf"), name, probe_tolerance(dtype, reference))
    diff = (logits - reference).abs().max().item()
    return ProbeCheck(diff, name, probe_tolerance(dtype, reference))


def verify_against_probe(model: GPT, ckpt: CheckpointDir) -> ProbeCheck:
    """The consolidated model must reproduce the logits the training engine computed at save
    time on a fixed batch, computed in the engine's dtype: within ``FP32_TOLERANCE`` for fp32,
    within a few ulps of the logits' scale for bf16/fp16."""
    check = probe_check(model, torch.load(ckpt.probe, weights_only=True))
    if not check.max_abs_diff <= check.tolerance:  # NaN fails too
        raise RuntimeError(
            f"the weights merged from {ckpt.path} give logits {check.max_abs_diff:.2e} away "
            f"from the training engine's on the probe batch (computed in {check.dtype}, "
            f"tolerance {check.tolerance:.2e}): the checkpoint is damaged or was saved by "
            "another model shape"
        )
    return check


def export(ckpt_path: Path, output: Path) -> Path:
    """Exports the checkpoint ``ckpt_path`` names (a step or run directory) to ``output``."""
    return export_verified(resolve_checkpoint(ckpt_path), output)


def export_verified(found: CheckpointDir, output: Path) -> Path:
    """Exports ``found``, a checkpoint ``resolve_checkpoint`` has checked, to ``output``."""
    ckpt, run = found.path, found.run
    model_cfg = GPTConfig(**model_shape(json.loads(run.model_config.read_text())))
    model = GPT(model_cfg)
    model.load_state_dict(consolidated_state_dict(ckpt), strict=True)
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f"{WEIGHTS}.partial"
    save_model(model, str(tmp))  # stores tied tensors once
    make_readable(str(tmp))  # safetensors writes 0o600; the umask decides here
    tmp.replace(output / WEIGHTS)
    verified = verify_against_probe(model, found)
    probe_inputs = torch.load(found.probe, weights_only=True)["inputs"]
    hf_diff = save_hf(model, output / HF, probe_inputs, FP32_TOLERANCE)
    make_readable(str(output / HF))
    if (output / TOKENIZER).exists():
        shutil.rmtree(output / TOKENIZER)
    shutil.copytree(run.tokenizer, output / TOKENIZER)
    meta = {
        "model": dataclasses.asdict(model_cfg),
        "checkpoint": str(ckpt.resolve()),
        "step": json.loads(found.marker.read_text())["step"],
        "tokenizer_hash": json.loads((run.tokenizer / "artifact.json").read_text())["hash"],
        "verified_logits_max_abs_diff": verified.max_abs_diff,
        "verified_logits_dtype": verified.dtype,
        "verified_logits_tolerance": verified.tolerance,
        "hf_architecture": hf_architecture(model_cfg),
        "hf_logits_max_abs_diff": hf_diff,
    }
    (output / CONFIG).write_text(json.dumps(meta, indent=2))
    log.info(
        "exported %s (step %d, %.1fM params) to %s",
        ckpt,
        meta["step"],
        sum(p.numel() for p in model.parameters()) / 1e6,
        output,
    )
    return output


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


def exported_model_dir(checkpoint_path: str | Path) -> Path:
    """An exported model directory for ``checkpoint_path``: itself when it is one; else the
    newest complete checkpoint of a run directory, exported to ``<run_dir>/export``, or a given
    checkpoint directory, exported to ``<checkpoint>/export``. An export already made from the
    same checkpoint is reused."""
    path = Path(checkpoint_path)
    if (path / WEIGHTS).exists():
        return path
    ckpt = resolve_checkpoint(path)
    output = (ckpt if ckpt.path == path else RunDir(path)).export
    if (output / CONFIG).exists():
        made_from = json.loads((output / CONFIG).read_text()).get("checkpoint")
        if made_from == str(ckpt.path.resolve()):
            return output
    return export_verified(ckpt, output)  # its files were checked just now: not again


class ModelAndData(NamedTuple):
    model: GPT
    meta: dict  # the export's config.json
    tokenizer: MusicTokenizer
    card: dict  # the dataset's card
    model_dir: Path


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_inference(
    checkpoint_path: str, device: str = "auto"
) -> tuple[GPT, dict, MusicTokenizer, Path]:
    """The model of ``checkpoint_path`` (exported first if need be) on ``device``, its
    config.json, its tokenizer and the exported directory."""
    model_dir = exported_model_dir(checkpoint_path)
    model, meta = load_exported(model_dir)
    model.to(pick_device(device))
    return model, meta, MusicTokenizer.load(str(model_dir / TOKENIZER)), model_dir


def load_for_data(
    checkpoint_path: str, data_path: str, split: str, device: str = "auto"
) -> ModelAndData:
    """``load_for_inference``, and the card of the dataset the model is to read; refused when the
    dataset was tokenized with another tokenizer (its ids would mean other tokens) or lacks
    ``split``."""
    model, meta, tokenizer, model_dir = load_for_inference(checkpoint_path, device)
    card = load_card(data_path)
    if card["tokenizer"]["hash"] != tokenizer.hash:
        raise ValueError(
            f"data_path={data_path} was tokenized with tokenizer "
            f"{card['tokenizer']['hash'][:12]}, the model (checkpoint={checkpoint_path}) with "
            f"{tokenizer.hash[:12]}: use data prepared with the model's tokenizer"
        )
    if split not in card["splits"]:
        raise ValueError(f"split={split}: {data_path} has splits {', '.join(card['splits'])}")
    return ModelAndData(model, meta, tokenizer, card, model_dir)


def load_weights(model: GPT, path: str | Path) -> None:
    """Fine-tuning: start ``model`` from exported weights of the same shape."""
    source, meta = load_exported(path)
    if meta["model"]["vocab_size"] != model.config.vocab_size:
        raise ValueError(
            f"init_from={path} has vocab_size {meta['model']['vocab_size']} but this run's "
            f"tokenizer has {model.config.vocab_size}; fine-tune on data prepared with the "
            "same tokenizer artifact"
        )
    model.load_state_dict(source.state_dict(), strict=True)
