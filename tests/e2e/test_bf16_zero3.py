"""The default deepspeed=zero3 in bf16 for real: 2 ranks train with fp32 gradients, and the
export is checked against the fp32 reference recorded from the gathered master weights, then
evaluated and sampled from."""

import json
import os
import time

import torch
from support.apps import run_module
from support.trainings import CPU_ENV, run

from mtrain.exported.loading import load_exported


def test_bf16_zero3_trains_exports_evaluates_and_generates(bach_dataset, tmp_path):
    """The default deepspeed=zero3 (bf16), 2 ranks, the tiny model really partitioned."""
    run_dir = tmp_path / "bf16"
    start = time.monotonic()
    code, out = run(
        [
            "-m",
            "mtrain.train",
            f"data.path={bach_dataset}",
            f"run_dir={run_dir}",
            "model=tiny",
            "deepspeed.param_persistence_threshold=0",
            "deepspeed.timeout_s=120",
            "trainer.max_steps=20",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_tokens=512",
            "trainer.eval_every=0",
            "trainer.log_every=10",
            "optim.warmup_steps=2",
            "data.num_workers=1",
            "data.shuffle_buffer=16",
            "logger.mode=disabled",
        ]
    )
    assert code == 0, out[-4000:]
    trained = time.monotonic()
    probe = torch.load(run_dir / "checkpoints" / "step_00000020" / "probe.pt")
    # The reference: fp32 logits from the fp32 master weights, whatever the engine runs in.
    assert probe["dtype"] == "float32"
    for rank in (0, 1):
        log = (run_dir / f"train-rank{rank}.log").read_text()
        share = float(log.split("parameter elements (")[1].split("%")[0])
        assert 40 <= share <= 60, share  # ZeRO-3 partitions the tiny model
        # DeepSpeed took the config's precision fields (its default would be bf16 for both).
        assert "gradients accumulated in float32, reduced over ranks in float32" in log
    export_dir = tmp_path / "export"
    env = {**os.environ, **CPU_ENV}
    run_module("mtrain.export", f"checkpoint={run_dir}", f"output={export_dir}", env=env)
    model, meta = load_exported(export_dir)
    assert meta["verified_logits_dtype"] == "float32" and meta["step"] == 20
    # Like for like: the export recomputes what rank 0 computed at save time, on a CPU too.
    assert meta["verified_logits_max_abs_diff"] <= 1e-6 < meta["verified_logits_tolerance"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the export stays fp32
    exported = time.monotonic()

    # evaluate and generate export a run directory themselves (to <run>/export).
    run_module(
        "mtrain.evaluate",
        f"checkpoint={run_dir}",
        f"data_path={bach_dataset}",
        f"output={tmp_path / 'eval'}",
        "max_pieces=4",
        "music.num_samples=2",
        "music.sampling.max_new_tokens=32",
        env=env,
    )
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["likelihood"]["nll_per_token_nats"] > 0
    made = json.loads((run_dir / "export" / "config.json").read_text())
    assert made["verified_logits_dtype"] == "float32"
    run_module(
        "mtrain.generate",
        f"checkpoint={run_dir}",
        f"output={tmp_path / 'gen'}",
        "num_samples=2",
        "sampling.max_new_tokens=32",
        env=env,
    )
    assert len(list((tmp_path / "gen").rglob("*.mid"))) == 2
    done = time.monotonic()
    print(
        f"train {trained - start:.1f} s, export {exported - trained:.1f} s, "
        f"evaluate+generate {done - exported:.1f} s, "
        f"verified diff {meta['verified_logits_max_abs_diff']:.2e} "
        f"(tolerance {meta['verified_logits_tolerance']:.2e})"
    )
