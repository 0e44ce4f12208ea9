"""Whether a training fits the devices' memory, before launching it: ``python -m mtrain.plan
model=gpt_760m deepspeed=zero3 world_size=2 micro_batch_size=1 seq_len=128 [device_memory_gb=8]``
prints the estimate per rank by part, the verdict, and what to change
(``mtrain.training.memory_plan``)."""

from dataclasses import dataclass, field, replace

from data_pipeline.app import entry_point
from data_pipeline.errors import require
from mtrain.model import GPTConfig
from mtrain.training.config import DeepSpeedConfig
from mtrain.training.memory_plan import (
    DEEPSPEED_DEFAULTS,
    GiB,
    Layout,
    ModelShape,
    advice,
    device_memory,
    estimate,
    judge,
)


@dataclass
class PlanConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    world_size: int = 1
    micro_batch_size: int = 8
    # Recompute each block's activations in the backward pass (trainer.activation_checkpointing).
    activation_checkpointing: bool = False
    # Tokens per sequence; model.max_seq_len when not given.
    seq_len: int | None = None
    # The tokenizer's vocabulary (a prepared dataset's card says it); REMI on Bach has ~520.
    vocab_size: int = 1000
    # Memory of one rank's device; this machine's when not given (a GPU's memory, or the
    # available memory shared by ranks_per_node ranks on CPU).
    device_memory_gb: float | None = None
    device: str = "cpu"
    # Ranks sharing this machine's memory (CPU); world_size when not given.
    ranks_per_node: int | None = None

    def __post_init__(self):
        require(
            self,
            "",
            [
                (self.world_size >= 1, "world_size", "must be at least 1"),
                (self.micro_batch_size >= 1, "micro_batch_size", "must be at least 1"),
                (self.vocab_size >= 1, "vocab_size", "must be at least 1"),
                (self.device in ("cpu", "cuda"), "device", "must be cpu or cuda"),
            ],
        )


def run(cfg: PlanConfig, _overrides: list[str]) -> None:
    model = replace(cfg.model, vocab_size=cfg.vocab_size)
    if cfg.seq_len is not None:
        model = replace(model, max_seq_len=cfg.seq_len)
    layout = Layout(
        model,
        cfg.deepspeed,
        cfg.micro_batch_size,
        cfg.world_size,
        cfg.device,
        cfg.activation_checkpointing,
    )
    if cfg.device_memory_gb is None:
        budget, where = device_memory(cfg.device, cfg.ranks_per_node or cfg.world_size)
    else:
        budget, where = cfg.device_memory_gb * GiB, "device_memory_gb"
    verdict = judge(layout, budget, where)
    shape = ModelShape.of(model)
    print(f"{shape.params / 1e6:.0f}M parameters; per rank:")
    print(verdict.estimate.table())
    print(("fits: " if verdict.fits else "does not fit: ") + verdict.line())
    stages = [
        estimate(replace(layout, deepspeed=replace(cfg.deepspeed, zero_stage=s))).total / GiB
        for s in range(4)
    ]
    print("by ZeRO stage: " + ", ".join(f"{s}: {g:.1f} GiB" for s, g in enumerate(stages)))
    if cfg.deepspeed.zero_stage == 3:
        defaults = estimate(layout, DEEPSPEED_DEFAULTS).total / GiB
        print(f"with DeepSpeed's default buckets instead of the model's: {defaults:.1f} GiB")
    if line := advice(verdict):
        print(line)


main = entry_point(
    "plan", PlanConfig, run, moved={"model.activation_checkpointing": "activation_checkpointing"}
)

if __name__ == "__main__":
    main()
