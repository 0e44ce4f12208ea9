"""An adapter run's tie to its base (the exported model it trains over, named by its weights'
digest), and its export: the base with the adapters merged in, and the adapters alone in
PEFT's format for the base's ``transformers`` copy, checked by loading them with
``PeftModel.from_pretrained``."""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from data_pipeline.errors import InputError
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.logits_agreement import check_hf_logits
from mtrain.exported.transformers_format import hf_architecture, neox_by_head
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import RunDir
from mtrain.training.adapters import (
    ADAPTER_NAME,
    EmbeddingRows,
    FinetuneConfig,
    FinetuneMethod,
    add_adapters,
    lora_config,
    plain_weights,
    trained_weights,
)

# The export's adapter directory, in PEFT's layout.
ADAPTER = "adapter"
# Dtypes the base trains in under each deepspeed.precision: a frozen base is held in it.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_digest(weights_file: Path) -> str:
    """SHA-256 of an exported model's weights file."""
    digest = hashlib.sha256()
    with open(weights_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_base(run: RunDir, init_from: str, weights_file: Path, rows: list[int]) -> None:
    """Names the base of an adapter run in its run directory (its checkpoints lack it), with
    the embedding rows it trains (chosen once, from the base and the data)."""
    record = {
        "init_from": str(Path(init_from).resolve()),
        "sha256": base_digest(weights_file),
        "embedding_rows": rows,
    }
    run.adapter_base.write_text(json.dumps(record))


def check_base(run: RunDir, init_from: str, weights_file: Path) -> None:
    """Refuses to go on with an adapter run over another base than the one it was trained on:
    its checkpoints hold the adapters alone, which mean nothing over other weights."""
    if not run.adapter_base.exists():
        return
    recorded = json.loads(run.adapter_base.read_text())
    digest = base_digest(weights_file) if weights_file.exists() else "missing"
    if digest != recorded["sha256"]:
        raise InputError(
            f"init_from={init_from} (weights {digest[:12]}) is not the base the adapters in "
            f"{run.root} were trained over ({recorded['init_from']}, weights "
            f"{recorded['sha256'][:12]}): use that base, or a new run_dir="
        )


class AdapterRun(NamedTuple):
    """What the export of an adapter run needs from its run directory."""

    init_from: str
    finetune: FinetuneConfig
    base_dtype: torch.dtype
    rows: list[int]  # the embedding rows trained (TrainedRows), where chosen rows train


def recorded_rows(run: RunDir) -> list[int] | None:
    """The embedding rows an adapter run chose at its start; None before it has."""
    if not run.adapter_base.exists():
        return None
    return json.loads(run.adapter_base.read_text()).get("embedding_rows", [])


def adapter_run(run: RunDir) -> AdapterRun | None:
    """The adapter settings of ``run``; None for a run that trained every weight."""
    if not run.adapter_base.exists():
        return None
    config = OmegaConf.load(run.train_config)
    section = OmegaConf.to_container(config.finetune)
    section["method"] = FinetuneMethod(section["method"])
    section["embedding_rows"] = EmbeddingRows(section.get("embedding_rows", "none"))
    init_from = json.loads(run.adapter_base.read_text())["init_from"]
    dtype = PRECISION_DTYPES[config.deepspeed.precision]
    return AdapterRun(init_from, FinetuneConfig(**section), dtype, recorded_rows(run))


def merged(base: GPT, adapters: dict[str, torch.Tensor], spec: AdapterRun) -> GPT:
    """``base`` (the init_from weights, grown for new labels) held in the dtype the run kept it
    in, with the trained ``adapters`` (of the checkpoint's state) injected by PEFT and merged
    into its layers by PEFT: a plain GPT again."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for param in base.parameters():
            param.copy_(param.to(spec.base_dtype).float())
    model = add_adapters(base, spec.finetune, seed=0, rows=spec.rows)
    names = {n for n, _ in model.named_parameters()}
    # ZeRO-3's consolidation names a tied parameter under each of its names (lm_head.rows).
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - names
    adapters = {n: t for n, t in trained_weights(adapters, spec.finetune).items()
                if n not in aliases}  # fmt: skip
    missing = set(adapters) - names
    if missing:
        raise RuntimeError(f"the checkpoint's adapters do not fit the model: {sorted(missing)}")
    model.load_state_dict(adapters, strict=False)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge(adapter_names=[ADAPTER_NAME])
            owner, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(owner), attr, layer.get_base_layer())
    # A plain GPT again, without the adapter model's state-dict hook, its trained rows
    # written into the embedding.
    plain = GPT(base.config)
    weights = plain_weights(model, dict(model.named_parameters()))
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"merged weights: missing {missing}, unexpected {unexpected}")
    return plain.eval()


# ---- the adapters in PEFT's format, for the base's transformers copy -----------------------
# Per transformers class: each mtrain block layer as (the layer(s) it maps onto, and how the
# output rows of its update map onto theirs).
Rows = Callable[[torch.Tensor, GPTConfig], list[torch.Tensor]]


def _same(b: torch.Tensor, _cfg: GPTConfig) -> list[torch.Tensor]:
    return [b]


def _by_head(b: torch.Tensor, cfg: GPTConfig) -> list[torch.Tensor]:
    return [neox_by_head(b, cfg)]


def _q_k_v(b: torch.Tensor, _cfg: GPTConfig) -> list[torch.Tensor]:
    return list(b.chunk(3))


HF_LAYERS: dict[str, tuple[str, str, dict[str, tuple[list[str], Rows]]]] = {
    # class: (block prefix, embedding name, {mtrain layer: (their layers, rows)})
    "GPT2LMHeadModel": ("transformer.h", "transformer.wte", {
        "attn.qkv": (["attn.c_attn"], _same), "attn.proj": (["attn.c_proj"], _same),
        "mlp.up": (["mlp.c_fc"], _same), "mlp.down": (["mlp.c_proj"], _same)}),
    "GPTNeoXForCausalLM": ("gpt_neox.layers", "gpt_neox.embed_in", {
        "attn.qkv": (["attention.query_key_value"], _by_head),
        "attn.proj": (["attention.dense"], _same),
        "mlp.up": (["mlp.dense_h_to_4h"], _same), "mlp.down": (["mlp.dense_4h_to_h"], _same)}),
    "LlamaForCausalLM": ("model.layers", "model.embed_tokens", {
        "attn.qkv": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], _q_k_v),
        "attn.proj": (["self_attn.o_proj"], _same),
        **{f"mlp.{m}": ([f"mlp.{m}_proj"], _same) for m in ("gate", "up", "down")}}),
}  # fmt: skip


# Per transformers class: the output layer's name, where it is not tied to the embedding.
HF_OUTPUT = {"GPT2LMHeadModel": "lm_head", "GPTNeoXForCausalLM": "embed_out",
             "LlamaForCausalLM": "lm_head"}  # fmt: skip


def peft_adapter(
    cfg: GPTConfig,
    spec: AdapterRun,
    adapters: dict[str, torch.Tensor],
    new_rows: dict,
    output_rows: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter_model.safetensors' tensors, adapter_config.json's LoraConfig) for the
    transformers copy of the base. A fused qkv's update maps onto separate q, k, v layers as
    the same A with B's rows split. ``new_rows`` (token id -> row) are the embedding rows the
    base lacks or the run trained, stored as PEFT's trainable tokens of the embedding (tied to
    the output layer where the model ties them; ``output_rows``, the same ids of an untied
    output layer, as its own): the base's vocabulary is grown to hold them first."""
    prefix, embedding, layers = HF_LAYERS[hf_architecture(cfg)]
    tensors, targets = {}, set()
    for name, layer in layers.items():
        theirs, rows = layer
        for i in range(cfg.n_layer):
            ours = f"blocks.{i}.{name}.lora_{{}}.{ADAPTER_NAME}.weight"
            if ours.format("A") not in adapters:
                continue
            a, b = adapters[ours.format("A")], adapters[ours.format("B")]
            for their, b_rows in zip(theirs, rows(b, cfg), strict=True):
                key = f"base_model.model.{prefix}.{i}.{their}"
                tensors[f"{key}.lora_A.weight"] = a.clone()  # q, k, v: one A each
                tensors[f"{key}.lora_B.weight"] = b_rows.contiguous()
                targets.add(their.split(".")[-1])
    config = lora_config(spec.finetune, cfg)
    config.target_modules = sorted(targets)
    config.fan_in_fan_out = hf_architecture(cfg) == "GPT2LMHeadModel"  # Conv1D: [in, out]
    config.task_type = "CAUSAL_LM"
    config.base_model_name_or_path = str(Path(spec.init_from).resolve() / "hf")
    layers = {embedding: new_rows}
    if output_rows:
        layers[HF_OUTPUT[hf_architecture(cfg)]] = output_rows
    for layer, rows in layers.items():
        if not rows:
            continue
        ids = sorted(rows)
        indices = config.trainable_token_indices or {}
        config.trainable_token_indices = {**indices, layer.split(".")[-1]: ids}
        delta = torch.stack([rows[i] for i in ids]).float().contiguous()
        tensors[f"base_model.model.{layer}.token_adapter.trainable_tokens_delta"] = delta
    return tensors, config


def write_peft_adapter(
    model: GPT,
    spec: AdapterRun,
    adapters: dict[str, torch.Tensor],
    tokenizers: tuple[MusicTokenizer, MusicTokenizer],
    output: Path,
    inputs: torch.Tensor,
) -> float:
    """Writes the adapters in PEFT's format to ``output`` and checks them: the base's
    ``transformers`` copy (``<init_from>/hf``, its vocabulary grown for new labels, its weights
    rounded to the dtype the run held them in) with
    ``PeftModel.from_pretrained(output)`` must give ``model``'s (the merged one's) logits on
    ``inputs``; returns how far they are."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    parent, child = tokenizers
    weight = model.wte.weight.detach()
    # The rows the base lacks and those the run trained, or every row where it trained the
    # whole embedding.
    if spec.finetune.embedding_rows == EmbeddingRows.all:
        ids = set(range(child.vocab_size))
    else:
        ids = set(range(parent.vocab_size, child.vocab_size)) | set(spec.rows)
    new_rows = {i: weight[i] for i in sorted(ids)}
    head_rows = None
    if not model.config.tie_embeddings:  # an untied output layer: its rows of the same ids
        head_rows = {i: model.lm_head.weight.detach()[i] for i in sorted(ids)}
    tensors, config = peft_adapter(model.config, spec, adapters, new_rows, head_rows)
    output.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(output))
    save_file(tensors, str(output / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    with torch.no_grad():  # held as the run held it (a bf16 run trained over a bf16 base)
        for param in base.parameters():
            param.copy_(param.to(spec.base_dtype).float())
    if child.vocab_size > parent.vocab_size:
        base.resize_token_embeddings(child.vocab_size, mean_resizing=False)
    peft_model = PeftModel.from_pretrained(base, str(output)).eval()
    return check_hf_logits(
        model,
        peft_model,
        inputs,
        what=f"{output}: PeftModel.from_pretrained over {config.base_model_name_or_path}",
        reference="the merged model's",
        cause="the adapter mapping onto transformers is wrong for this shape",
    )
