"""Reads the history rows of an offline wandb run from its ``.wandb`` transaction log.

wandb 0.2x+ writes the log from its Go core and no longer ships a Python reader; the format is
LevelDB's log (32 KiB blocks of checksummed chunks) after a 7-byte W&B header, each record a
``wandb_internal_pb2.Record`` protobuf.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7  # checksum (4), length (2), chunk type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def history(run_dir: Path) -> list[dict]:
    """The logged rows of the one offline run under ``run_dir/wandb``."""
    (log,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    rows = []
    for record in records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return rows
