"""Reads the history records back from an offline W&B run file (wandb-core's
LevelDB-style log of wandb_internal_pb2.Record protobufs; wandb ships no reader).

File format (written by wandb-core, same as the old Python datastore):
  * 7-byte file header: b":W&B", magic 0xBEE1 (uint16 LE), version byte (0)
  * then a LevelDB-style log: 32 KiB blocks; each chunk has a 7-byte header
    <crc32:uint32 LE><length:uint16 LE><type:uint8>, type FULL=1, FIRST=2,
    MIDDLE=3, LAST=4 (0 = zero padding). crc is zlib.crc32 (IEEE) over the
    type byte followed by the payload. A block tail < 7 bytes is padding.
  * each reassembled payload is a serialized wandb_internal_pb2.Record.
"""
import json
import struct
import zlib
from typing import Iterator

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_history(run_file: str) -> list[dict]:
    """One dict per history record (run.log call) in a wandb .wandb file."""
    with open(run_file, "rb") as fh:
        buf = fh.read()
    if len(buf) < HEADER or buf[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a wandb run file (bad header)")
    _, magic, _ = struct.unpack_from("<4sHB", buf, 0)
    if magic != 0xBEE1:
        raise ValueError(f"{run_file}: bad magic {magic:#x}")
    history = []
    for raw in _payloads(buf, run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append(_row(record.history))
    return history


def _chunks(buf: bytes, run_file: str) -> Iterator[tuple[int, bytes]]:
    """(type, data) of each chunk, CRC-checked; stops at a truncated tail (a run still being written)."""
    pos, n = HEADER, len(buf)
    while pos < n:
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:  # trailer padding at the end of a block
            pos += left_in_block
            continue
        if pos + HEADER > n:
            return
        crc, length, ctype = struct.unpack_from("<IHB", buf, pos)
        if ctype == 0 and length == 0:  # zero padding / preallocated space
            pos += left_in_block
            continue
        start, end = pos + HEADER, pos + HEADER + length
        if end > n or length > left_in_block - HEADER:
            return
        data = buf[start:end]
        if zlib.crc32(data, zlib.crc32(bytes([ctype]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{run_file}: CRC mismatch at offset {pos}")
        pos = end
        yield ctype, data


def _payloads(buf: bytes, run_file: str) -> Iterator[bytes]:
    """Records reassembled from FULL chunks and FIRST..MIDDLE..LAST runs (an orphan fragment is dropped)."""
    pending = None
    for ctype, data in _chunks(buf, run_file):
        if ctype == FULL:
            pending = None
            yield bytes(data)
        elif ctype == FIRST:
            pending = bytearray(data)
        elif ctype in (MIDDLE, LAST) and pending is not None:
            pending += data
            if ctype == LAST:
                yield bytes(pending)
                pending = None


def _row(history) -> dict:
    row: dict = {}
    for item in history.item:
        keys = list(item.nested_key) if item.nested_key else [item.key]
        level = row
        for key in keys[:-1]:
            level = level.setdefault(key, {})
        level[keys[-1]] = _item_value(item)
    if "_step" not in row and history.HasField("step"):
        row["_step"] = history.step.num
    return row


def _item_value(item):
    which = item.WhichOneof("value")
    if which is None:
        return json.loads(item.value_json) if item.value_json else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)  # boolean / integer / number / text
