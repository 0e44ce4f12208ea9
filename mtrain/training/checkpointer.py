"""Saving checkpoints, complete or absent: every rank's files, their checksums, then the marker;
a full disk stops the run in one line."""

import copy
import errno
import gc
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch

from data_pipeline.errors import InputError
from mtrain.distributed import collectives
from mtrain.model import GPT, GPTConfig
from mtrain.runs.checkpoint_files import checksums, latest_complete, size_of
from mtrain.runs.run_dir import CheckpointDir, RunDir
from mtrain.training.adapters import has_frozen, plain_weights
from mtrain.training.background_save import BackgroundWriter, WriteJob, Written, fsync, stage
from mtrain.training.config import SaveMode, TrainerConfig
from mtrain.training.contrastive import language_model_weights
from mtrain.training.memory_plan import NoInitialValues
from mtrain.training.resume import Resumed, resume_latest
from mtrain.training.rng_state import rng_state
from mtrain.training.small_data import best_step

log = logging.getLogger(__name__)


class DiskFull(InputError):
    """A write that found no space left: said as one line, like a bad input."""


@torch.no_grad()
def probe_logits(engine, vocab_size: int, seq_len: int) -> dict | None:
    """The reference export checks its merged weights against: fp32 logits on a fixed batch,
    computed on rank 0's CPU by a plain ``GPT`` (uncompiled, fp32) from the weights the
    export will merge, gathered from the engine's memory (``GatheredWeights``). Like for like
    with the export's own recomputation whatever the engine computes in (bf16 kernels on a
    GPU, a compiled graph), yet by another path than the export's merge of the files: a
    wrong or misplaced partition there still shows. Collective; None on the other ranks.
    The weights are gathered as the forward pass reaches them and let go after their last
    use: rank 0 holds one block's fp32 weights at a time, not the model's (adapters: the
    whole model, merged first)."""
    weights = GatheredWeights.of_engine(engine)
    if engine.global_rank != 0:
        weights.join_all()
        return None
    return probe_of(
        engine.module.config, plain_weights(engine.module, weights), vocab_size, seq_len
    )


def probe_of(cfg: GPTConfig, weights: Mapping[str, torch.Tensor], vocab_size: int, seq_len: int):
    """``probe_logits`` from weights gathered already (``export_weights``) or as they are
    read (``GatheredWeights``); draws from no random generator but its own, so it may run
    beside training."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(vocab_size, (2, min(64, seq_len)), generator=generator)
    logits = reference_logits(cfg, weights, inputs)
    return {"inputs": inputs, "logits": logits, "dtype": "float32"}


def fp32_weight(engine, param: torch.Tensor) -> torch.Tensor | None:
    """One parameter as the export merges it, fp32 on rank 0's CPU (None on the others):
    ZeRO's fp32 master weights where ZeRO-1/2/3 keep them (``zero_to_fp32`` reads those),
    else (ZeRO-0, a frozen base) the parameter itself, as the export reads the model file.
    Collective: one gather of the whole parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    if not param.requires_grad:  # a frozen base (adapters): no fp32 master, only itself
        whole = gathered_param(param)  # on every rank: a collective under ZeRO-3
    else:
        full = safe_get_full_fp32_param(param)
        whole = param.detach() if full is None else full
    return whole.float().cpu() if engine.global_rank == 0 else None


def export_weights(engine) -> dict[str, torch.Tensor] | None:
    """The fp32 weights the export merges from a checkpoint of ``engine``, by parameter name,
    on rank 0's CPU (None on the others), all at once (``fp32_weight``). Collective."""
    weights = {name: fp32_weight(engine, p) for name, p in engine.module.named_parameters()}
    return language_model_weights(weights) if engine.global_rank == 0 else None


class GatheredWeights(Mapping):
    """Weights by name, each gathered when first read (``order``: every parameter's name
    and the collective that gives it whole, on rank 0, in the engine's order), together
    with every parameter before it (so that the collectives come in the same order on every
    rank, whatever order rank 0 reads in), and dropped by ``release``. The other ranks join
    the same gathers with ``join_all``; so does rank 0's ``join_all`` for those it never read.
    ``of_engine``: ``export_weights`` read lazily."""

    def __init__(self, names: list[str], order: list[tuple[str, Callable]]):
        self.names, self.order = names, iter(order)
        self.held: dict[str, torch.Tensor] = {}

    @classmethod
    def of_engine(cls, engine) -> "GatheredWeights":
        params = dict(engine.module.named_parameters())
        order = [(name, partial(fp32_weight, engine, p)) for name, p in params.items()]
        return cls(list(language_model_weights(params)), order)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        while name not in self.held:
            try:
                next_name, gather = next(self.order)
            except StopIteration:
                raise KeyError(name) from None
            self.held[next_name] = gather()
        return self.held[name]

    def release(self, name: str) -> None:
        self.held.pop(name, None)

    def join_all(self) -> None:
        for _, gather in self.order:
            gather()


class PartitionedWeights:
    """The probe under ZeRO-3 computed by the writer thread, with no collective on the main
    thread: each rank's partition of each weight (a view into ZeRO's fp32 master weights,
    unchanged until the next update, which waits for a live write; or into the staged copy,
    ``point_into``) is gathered over the writer's own group a weight at a time as the probe's
    forward pass reaches it (``GatheredWeights``), rank 0 putting it together as ZeRO-3 split
    it (equal shares of the flattened weight, the last padded). ``probe`` leaves the logits in
    ``result`` on rank 0."""

    def __init__(self, engine, probe_shape: tuple[int, int]):
        from deepspeed.utils import safe_get_local_fp32_param

        self.main = engine.global_rank == 0
        self.module, self.probe_shape = engine.module, probe_shape
        self.names = list(language_model_weights(dict(engine.module.named_parameters())))
        self.parts = [
            (name, safe_get_local_fp32_param(p), p.ds_numel, p.ds_shape)
            for name, p in engine.module.named_parameters()
        ]
        self.result: dict | None = None

    @staticmethod
    def fit(engine) -> bool:
        """ZeRO-3 with every parameter trained (a frozen base has no fp32 partition)."""
        return all(hasattr(p, "ds_id") and p.requires_grad for p in engine.module.parameters())

    def point_into(self, staged: dict) -> None:
        """The partitions as views of the staged copy (``stage``'s storages by key; one
        missing from it is copied there)."""
        self.parts = [(n, stage(t, staged), numel, shape) for n, t, numel, shape in self.parts]

    def probe(self, group) -> None:
        """Collective over ``group`` (the writer's)."""
        order = [(n, partial(whole, t, numel, shape, group)) for n, t, numel, shape in self.parts]
        weights = GatheredWeights(self.names, order)
        if self.main:
            cfg = self.module.config
            self.result = probe_of(cfg, plain_weights(self.module, weights), *self.probe_shape)
        weights.join_all()


def whole(partition: torch.Tensor, numel: int, shape, group) -> torch.Tensor | None:
    """A ZeRO-3 weight put together on rank 0 from every rank's ``partition`` (collective
    over ``group``); None on the others."""
    ranks = collectives.gather_to_rank_0(partition.reshape(-1).float(), group)
    return None if ranks is None else torch.cat(ranks)[:numel].view(shape)


def gathered_param(param: torch.Tensor) -> torch.Tensor:
    """A whole parameter as fp32 on the CPU, gathered where ZeRO-3 partitions it
    (collective)."""
    if not hasattr(param, "ds_id"):
        return param.detach().float().cpu()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().float().cpu().clone()


@torch.no_grad()
def reference_logits(
    cfg: GPTConfig, weights: Mapping[str, torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """The logits a ``GPT(cfg)`` holding ``weights`` (every parameter by name, as
    ``named_parameters()`` gives them, a tied one once) computes on ``inputs``, on their
    device in their dtype: on the CPU in fp32, what the export computes. The model is built
    on the meta device and each of its layers runs on ``weights`` themselves (no copy), read
    as the forward pass reaches the layer; a mapping with ``release`` (``GatheredWeights``)
    is told when a weight's last layer has run."""
    with torch.device("meta"), NoInitialValues():
        model = GPT(cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    if set(names.values()) != set(weights):
        raise RuntimeError(
            f"the engine's parameters are not GPT's: missing "
            f"{sorted(set(names.values()) - set(weights))}, "
            f"unexpected {sorted(set(weights) - set(names.values()))}"
        )
    # Each layer's weights, by the name of the parameter (a tied one's first name) they fill.
    layers = [
        (m, {local: names[id(p)] for local, p in m._parameters.items() if p is not None})
        for m in model.modules()
    ]
    layers = [(m, own) for m, own in layers if own]
    uses = Counter(name for _, own in layers for name in own.values())
    release = getattr(weights, "release", None)

    def fill(module, args, own):
        for local, name in own.items():
            module._parameters[local] = torch.nn.Parameter(weights[name], requires_grad=False)

    def empty(module, args, output, own, meta):
        module._parameters.update(meta)
        for name in own.values():
            uses[name] -= 1
            if uses[name] == 0 and release is not None:
                release(name)

    for module, own in layers:
        meta = dict(module._parameters)
        module.register_forward_pre_hook(partial(fill, own=own))
        module.register_forward_hook(partial(empty, own=own, meta=meta))
    return model.eval()(inputs).logits


class Checkpointer:
    """Saves every ``trainer.save_every`` steps and at the last one (a step component, due at
    the same steps on every rank), and resumes a run from its newest intact checkpoint.

    Each checkpoint is a directory ``checkpoints/step_00001000/`` (``run_dir.CheckpointDir``)
    holding DeepSpeed's (partitioned) model and optimizer state, one trainer state per rank
    (data position, RNG) and, written last by rank 0 once every rank has finished, a
    ``COMPLETE`` marker recording every file's size and CRC-32. A directory without the marker
    (a job killed mid-save) is never loaded; one whose files no longer match it is moved aside
    (``step_00001000.damaged``) and the one before is loaded.

    ``state()`` gives what the trainer keeps besides the engine: the client state every rank
    shares (step, counters) and this rank's own (its data position).

    With ``trainer.save_in_background`` the files are written by a thread
    (``background_save``) while training goes on, until the next optimizer update, which
    waits for them (``wait_for_write``); the next step boundary reports the write (a full
    disk ends the run there). The last step's save and a preemption's are waited for.
    """

    def __init__(
        self,
        engine,
        run: RunDir,
        cfg: TrainerConfig,
        probe_shape: tuple[int, int],
        state: Callable[[], tuple[dict, dict]],
    ):
        self.engine, self.run_dir, self.cfg = engine, run, cfg
        self.probe_shape, self.state = probe_shape, state
        mode = cfg.save_in_background
        # Each rank settled auto from its own memory (unsettled: live): live everywhere if
        # live anywhere, so that every rank waits and reports at the same steps. Collective.
        live_anywhere = collectives.any_rank(mode in (SaveMode.live, SaveMode.auto))
        if mode != SaveMode.off and live_anywhere:
            mode = SaveMode.live
        self.writer = (
            None
            if mode == SaveMode.off
            else BackgroundWriter(
                engine, mode == SaveMode.staged, self._write_marker_durably, out_of_space
            )
        )
        # Live, every rank has joined the write before the update after it: each may report
        # it at that step's boundary, together. Staged, at the next save or the last step.
        self.live = self.writer is not None and not self.writer.staged
        self._started_s = 0.0  # the blocked time of starting the write in flight
        self._updates = 0  # optimizer updates seen by a staged writer, until it maps ahead

    def due(self, step: int) -> bool:
        saves = step % self.cfg.save_every == 0 or step == self.cfg.max_steps
        return saves or (self.live and self.writer.reportable)

    def run(self, step: int, metrics: dict) -> dict:
        if self.live:
            self.finish()
        if step % self.cfg.save_every == 0 or step == self.cfg.max_steps:
            self.save(step)
        if step == self.cfg.max_steps:
            self.finish()
        return {}

    def wait_for_write(self) -> None:
        """Before an optimizer update: a live write in flight ends first, since the update
        changes what it writes. Staged, before the second update of an attempt (the
        optimizer's state made, or loaded, by then), buffers for the first staged copy are
        mapped in a thread (``DeferredFiles.map_ahead``)."""
        if self.live:
            self.writer.wait()
        elif self.writer is not None and self._updates >= 0:
            self._updates += 1
            if self._updates == 2:
                self.writer.deferred.map_ahead(self.engine.optimizer.state_dict())
                self._updates = -1  # once

    def finish(self) -> None:
        """Waits for the write in flight and reports it: a full disk raises ``DiskFull`` on
        every rank (each knows every rank's outcome), the partial directory removed."""
        if self.writer is None or (written := self.writer.outcome()) is None:
            return
        if written.out_of_space:
            gc.collect()  # the failed writes' file objects, so that their space comes back
            self._raise_disk_full(written.ckpt, "; ".join(written.out_of_space))
        if written.failures:
            raise RuntimeError(
                f"writing checkpoint {written.ckpt.path} failed: {'; '.join(written.failures)}"
            )
        self._log_written(written)

    def _log_written(self, written: Written) -> None:
        blocked = self._started_s + self.writer.blocked_s
        log.info(
            "saved checkpoint %s in the background in %.1f s; training was blocked %.2f s "
            "(%.2f s to start the write, %.2f s waiting for it at the next update)",
            written.ckpt.path,
            written.seconds,
            blocked,
            self._started_s,
            self.writer.blocked_s,
        )

    def save(self, step: int) -> CheckpointDir:
        """Saves on every rank (collective); returns the checkpoint directory. A full disk ends
        the run with ``DiskFull`` on every rank, the partial directory removed."""
        engine, ckpt = self.engine, self.run_dir.checkpoint(step)
        client_state, rank_state = self.state()
        if self.writer is not None:
            return self._save_in_background(step, ckpt, client_state, rank_state)
        start = time.monotonic()  # the time training is blocked, the probe's gather included
        probe = probe_logits(engine, *self.probe_shape)
        main = engine.global_rank == 0

        def write_files():
            engine.save_checkpoint(
                str(self.run_dir.checkpoints),
                tag=ckpt.path.name,
                client_state=client_state,
                # A frozen base (adapters) is not saved: init_from holds it.
                exclude_frozen_parameters=has_frozen(engine.module),
            )
            if main:
                torch.save(probe, ckpt.probe)
            torch.save({**rank_state, "rng": rng_state()}, ckpt.trainer_state(engine.global_rank))

        # Every rank's files are on disk (or one rank found no space) before they are summed.
        self._unless_disk_full(ckpt, write_files)
        files = checksums(ckpt)

        def write_marker():
            if main:
                partial = ckpt.marker.with_suffix(".partial")
                partial.write_text(json.dumps({"step": step, "time": time.time(), "files": files}))
                partial.replace(ckpt.marker)
                _prune(self.run_dir, self.cfg.keep_last)

        self._unless_disk_full(ckpt, write_marker)
        log.info("saved checkpoint %s in %.1f s", ckpt.path, time.monotonic() - start)
        return ckpt

    def _save_in_background(
        self, step: int, ckpt: CheckpointDir, client_state: dict, rank_state: dict
    ) -> CheckpointDir:
        """Lets DeepSpeed lay out its files (collectives, the main thread's), then hands
        every file to the writer. The states the trainer keeps are copied (small); the
        engine's are not, since they change only at the next update. The probe: under ZeRO-3,
        computed by the writer from the fp32 partitions (``PartitionedWeights``; staged, from
        the copy's); otherwise gathered here, whole for the writer where staged (memory to
        spare), else computed here a block's weights at a time (``probe_logits``)."""
        self.finish()
        engine, start = self.engine, time.monotonic()
        cfg, shape = engine.module.config, self.probe_shape
        probe, weights, partitioned = None, None, None
        if PartitionedWeights.fit(engine):
            partitioned = PartitionedWeights(engine, shape)
        elif self.writer.staged:
            weights = export_weights(engine)
            if weights is not None:
                # ZeRO-0 hands over the parameters themselves; the others gathered copies.
                live = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
                weights = {
                    name: stage(w) if w.untyped_storage().data_ptr() in live else w
                    for name, w in weights.items()
                }
        else:
            probe = probe_logits(engine, *shape)
        probe_s = time.monotonic() - start
        rank_state = copy.deepcopy({**rank_state, "rng": rng_state()})
        client_state = copy.deepcopy(client_state)

        def lay_out():
            engine.save_checkpoint(
                str(self.run_dir.checkpoints),
                tag=ckpt.path.name,
                client_state=client_state,
                exclude_frozen_parameters=has_frozen(engine.module),  # init_from holds the base
            )

        self._unless_disk_full(ckpt, lay_out)
        files: list[tuple[Path, object]] = [(ckpt.trainer_state(engine.global_rank), rank_state)]
        before = None
        if partitioned is not None:
            if self.writer.staged:
                partitioned.point_into(self.writer.deferred.storages)
            before = partitioned.probe
            if partitioned.main:
                files.insert(0, (ckpt.probe, lambda: partitioned.result))
        elif weights is not None:
            plain = plain_weights(engine.module, weights)  # adapters merged, as export does
            files.insert(0, (ckpt.probe, lambda: probe_of(cfg, plain, *shape)))
        elif probe is not None:
            files.insert(0, (ckpt.probe, probe))
        held = self.writer.start(WriteJob(ckpt, step, files, before))
        self._started_s = time.monotonic() - start
        self.writer.blocked_s = 0.0
        held += sum(w.nbytes for w in weights.values()) if weights is not None else 0
        log.info(
            "checkpoint %s: writing in the background (%s) after %.2f s blocked (the probe "
            "%.2f s, DeepSpeed's save %.2f s; %.0f MiB held for it: %s)",
            ckpt.path,
            "staged" if self.writer.staged else "live until the next update",
            self._started_s,
            probe_s,
            self._started_s - probe_s,
            held / 2**20,
            ("the staged copy" if self.writer.staged else "no copy")
            + (", the probe's weights" if weights is not None else ""),
        )
        return ckpt

    def _write_marker_durably(self, ckpt: CheckpointDir, step: int, files: dict) -> None:
        """The marker, once every rank's files are durable (the writer's, rank 0), made
        durable itself before it takes its name; then the pruning."""
        partial = ckpt.marker.with_suffix(".partial")
        partial.write_text(json.dumps({"step": step, "time": time.time(), "files": files}))
        fsync(partial)
        partial.replace(ckpt.marker)
        fsync(ckpt.path)
        _prune(self.run_dir, self.cfg.keep_last)

    def _raise_disk_full(self, ckpt: CheckpointDir, failure: str) -> None:
        message = f"no space left to save {ckpt.path} (rank 0 says where and how much)"
        if self.engine.global_rank == 0:
            log.debug("saving %s failed: %s", ckpt.path, failure)
            shutil.rmtree(ckpt.path, ignore_errors=True)
            message = disk_full_message(self.run_dir, ckpt.path)
        raise DiskFull(message)

    def _unless_disk_full(self, ckpt: CheckpointDir, write: Callable[[], None]) -> None:
        """Runs ``write`` on every rank; if it ran out of space on any, rank 0 removes the
        partial checkpoint and every rank raises ``DiskFull``. Collective."""
        failure = None
        try:
            write()
        except (OSError, RuntimeError) as exc:
            if not out_of_space(exc, ckpt.path):
                raise
            # Only the words: the traceback's frames hold the half-written file open, and its
            # space would not come back when the directory is removed.
            failure = str(exc)
        if failure is not None:
            gc.collect()  # the file objects of the failed write's frames, now unreferenced
        if not collectives.any_rank(failure is not None):
            return
        self._raise_disk_full(ckpt, failure)

    def resume(self) -> Resumed:
        """The newest intact checkpoint, loaded into the engine (``resume.resume_latest``)."""
        return resume_latest(self.engine, self.run_dir, self.cfg.seed)


def out_of_space(exc: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or torch.save's RuntimeError (which
    hides the errno: "file write failed", "unexpected pos") on a file system now (nearly) full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not any(sign in str(exc) for sign in ("write failed", "unexpected pos", "StreamWriter")):
        return False
    usage = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists()))
    return usage.free < max(64 << 20, usage.total // 100)


def disk_full_message(run: RunDir, path: Path) -> str:
    """Which path, the free space now and what the last complete checkpoint took."""
    free = shutil.disk_usage(run.root).free
    last = latest_complete(run, quiet=True)
    needed = (
        f"the last complete checkpoint {last.path.name} takes {size_of(last) / 2**20:.1f} MiB, "
        f"and the run resumes from it"
        if last is not None
        else "no checkpoint is complete yet"
    )
    return (
        f"no space left on the device writing {path}: {free / 2**20:.1f} MiB free now, {needed}; "
        "free space (or lower trainer.keep_last) and restart"
    )


def _prune(run: RunDir, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` complete checkpoints; an incomplete one newer
    than the newest complete one is left alone (it may be being written)."""
    complete = [c.path for c in run.checkpoint_dirs() if c.complete]
    if not complete:
        return
    keep = set(complete[-keep_last:])
    best = best_step(run)  # early stopping's best checkpoint outlives the newer ones
    if best is not None:
        keep.add(run.checkpoint(best).path)
    newest = complete[-1]
    for ckpt in run.checkpoint_dirs():
        if ckpt.path not in keep and ckpt.path.name < newest.name:
            shutil.rmtree(ckpt.path, ignore_errors=True)
