"""Exporting a checkpoint: its ZeRO partitions merged into one model directory, checked against
the logits recorded at save time, with its tokenizer and a transformers copy."""

import dataclasses
import json
import logging
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from data_pipeline.errors import InputError
from data_pipeline.storage import make_readable
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data.fill_in_middle import trained_infill_rate
from mtrain.exported.adapter import (
    ADAPTER,
    AdapterRun,
    adapter_run,
    check_base,
    merged,
    write_peft_adapter,
)
from mtrain.exported.model_card import card_facts, write_card
from mtrain.exported.model_dir import CONFIG, HF, TOKENIZER, WEIGHTS, load_exported
from mtrain.exported.transformers_format import hf_architecture, save_hf
from mtrain.exported.verification import verify_against_probe
from mtrain.exported.vocab_growth import grown_rows
from mtrain.model import GPT, GPTConfig
from mtrain.runs.checkpoint_files import damage, latest_intact
from mtrain.runs.run_dir import COMPLETE_CHECKPOINTS, CheckpointDir, RunDir, model_shape
from mtrain.training.contrastive import language_model_weights, trained_embedding
from mtrain.training.flops import param_count
from mtrain.training.small_data import best_step

log = logging.getLogger(__name__)


def resolve_checkpoint(path: Path) -> CheckpointDir:
    """``path`` itself when it is a complete checkpoint whose files match its marker (refused,
    naming the file, when they do not), else a run directory's best one where early stopping
    recorded it, or its newest intact one (damaged newer ones skipped with a warning). A
    checkpoint's files are checked against the sizes and CRC-32s of its marker first."""
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
        best = best_step(RunDir(path))  # a run that stopped early: its best, if intact
        if best is not None and RunDir(path).checkpoint(best).complete:
            best_dir = RunDir(path).checkpoint(best)
            if not damage(best_dir):
                log.info("exporting the best checkpoint of %s: step %d", path, best)
                return best_dir
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
    """fp32 weights from any ZeRO stage, without loading optimizer moments: ZeRO partitions are
    merged from the fp32 master weights with memory-mapped reads and the optimizer moments
    dropped, so a model needs about twice its fp32 size in RAM, never its optimizer state.

    A checkpoint directory is trusted input: DeepSpeed's files are pickles, unpickled by
    DeepSpeed's own loaders (``load_checkpoint``, ``zero_to_fp32``); only the ZeRO-0 model file
    is read here, as plain data."""
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


def export(ckpt_path: Path, output: Path) -> Path:
    """Exports the checkpoint ``ckpt_path`` names (a step or run directory) to ``output``."""
    return export_verified(resolve_checkpoint(ckpt_path), output)


def export_verified(found: CheckpointDir, output: Path) -> Path:
    """Exports ``found``, a checkpoint ``resolve_checkpoint`` has checked, to ``output``:
    ``model.safetensors`` (fp32, tied embeddings stored once), ``config.json`` (the model shape
    and provenance), ``tokenizer/`` (the artifact the model was trained with) and ``hf/`` for
    ``transformers.AutoModelForCausalLM.from_pretrained`` (GPT-2, GPT-NeoX or Llama: see
    ``mtrain.exported.transformers_format``) with its model card (``hf/README.md``). The
    merged weights are checked against logits recorded with the checkpoint, and ``hf/``,
    loaded back, against the merged weights."""
    ckpt, run = found.path, found.run
    model_cfg = GPTConfig(**model_shape(json.loads(run.model_config.read_text())))
    state = language_model_weights(consolidated_state_dict(ckpt))
    spec = adapter_run(run)
    if spec is None:
        model = GPT(model_cfg)
        model.load_state_dict(state, strict=True)
    else:
        tokenizers = (
            MusicTokenizer.load(str(Path(spec.init_from) / TOKENIZER)),
            MusicTokenizer.load(str(run.tokenizer)),
        )
        model = merged(_grown_base(run, spec, tokenizers), state, spec)
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f"{WEIGHTS}.partial"
    save_model(model, str(tmp))  # stores tied tensors once
    make_readable(str(tmp))  # safetensors writes 0o600; the umask decides here
    tmp.replace(output / WEIGHTS)
    verified = verify_against_probe(model, found)
    probe_inputs = torch.load(found.probe, weights_only=True)["inputs"]
    hf_diff = save_hf(model, output / HF, probe_inputs)
    make_readable(str(output / HF))
    peft_diff = None
    if spec is not None:
        peft_diff = write_peft_adapter(
            model, spec, state, tokenizers, output / ADAPTER, probe_inputs
        )
        make_readable(str(output / ADAPTER))
    if (output / TOKENIZER).exists():
        shutil.rmtree(output / TOKENIZER)
    shutil.copytree(run.tokenizer, output / TOKENIZER)
    step = json.loads(found.marker.read_text())["step"]
    artifact = json.loads((run.tokenizer / "artifact.json").read_text())
    meta = {
        "model": dataclasses.asdict(model_cfg),
        "checkpoint": str(ckpt.resolve()),
        "step": step,
        "tokenizer_hash": artifact["hash"],
        "tokenizer": {
            k: artifact.get(k)
            for k in ("kind", "base_vocab_size", "learned_vocab_size", "vocab_size", "labels")
        },
        # A tokenizer extended for fine-tuning: the hash of the one it extends, the labels added.
        **({"tokenizer_lineage": artifact["lineage"]} if "lineage" in artifact else {}),
        "verified_logits_max_abs_diff": verified.max_abs_diff,
        "verified_logits_dtype": verified.dtype,
        "verified_logits_tolerance": verified.tolerance,
        "hf_architecture": hf_architecture(model_cfg),
        "hf_logits_max_abs_diff": hf_diff,
        **({} if spec is None else {"adapter": _adapter_meta(spec, peft_diff)}),
        # Checked before filling bars: an export may be used where its run directory is not.
        "data": {"infill_rate": trained_infill_rate(run.train_config)},
        "card": card_facts(found, step),
    }
    embedding = trained_embedding(run.train_config)
    if embedding is not None:  # an embedding model: embed and search pool as it was trained
        meta["embedding"] = embedding
    (output / CONFIG).write_text(json.dumps(meta, indent=2))
    write_card(output)
    log.info(
        "exported %s (step %d, %.1fM params) to %s",
        ckpt,
        step,
        param_count(model_cfg) / 1e6,
        output,
    )
    return output


def _grown_base(
    run: RunDir, spec: AdapterRun, tokenizers: tuple[MusicTokenizer, MusicTokenizer]
) -> GPT:
    """The base an adapter run trained over, checked to be it, its rows grown for the labels
    the run's tokenizer adds."""
    check_base(run, spec.init_from, Path(spec.init_from) / WEIGHTS)
    base, _ = load_exported(spec.init_from)
    grown = GPT(GPTConfig(**model_shape(json.loads(run.model_config.read_text()))))
    grown.load_state_dict(grown_rows(base.state_dict(), *tokenizers), strict=True)
    return grown


def _adapter_meta(spec: AdapterRun, peft_diff: float) -> dict:
    return {
        "dir": ADAPTER,
        "method": spec.finetune.method.value,
        "rank": spec.finetune.rank,
        "alpha": spec.finetune.alpha,
        "base": str(Path(spec.init_from).resolve()),
        "peft_logits_max_abs_diff": peft_diff,
    }


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
