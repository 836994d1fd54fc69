"""Reads the history records back from an offline W&B run file (wandb-core's
LevelDB-style log of wandb_internal_pb2.Record protobufs; wandb ships no reader)."""
import json
import struct
import zlib

from wandb.proto import wandb_internal_pb2


def read_wandb_history(run_file: str) -> list[dict]:
    """Return one dict per history record (run.log call) in a wandb .wandb file.

    File format (written by wandb-core, same as the old Python datastore):
      * 7-byte file header: b":W&B", magic 0xBEE1 (uint16 LE), version byte (0)
      * then a LevelDB-style log: 32 KiB blocks; each chunk has a 7-byte header
        <crc32:uint32 LE><length:uint16 LE><type:uint8>, type FULL=1, FIRST=2,
        MIDDLE=3, LAST=4 (0 = zero padding). crc is zlib.crc32 (IEEE) over the
        type byte followed by the payload. A block tail < 7 bytes is padding.
      * each reassembled payload is a serialized wandb_internal_pb2.Record.
    """
    BLOCK = 32768
    HDR = 7
    with open(run_file, "rb") as fh:
        buf = fh.read()
    if len(buf) < 7 or buf[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a wandb run file (bad header)")
    ident, magic, version = struct.unpack_from("<4sHB", buf, 0)
    if magic != 0xBEE1:
        raise ValueError(f"{run_file}: bad magic {magic:#x}")

    payloads = []
    pending = None  # bytearray while assembling FIRST..MIDDLE..LAST
    pos = 7
    n = len(buf)
    while pos < n:
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HDR:  # trailer padding at end of block
            pos += left_in_block
            continue
        if pos + HDR > n:
            break  # truncated chunk header (e.g. run still being written)
        crc, length, ctype = struct.unpack_from("<IHB", buf, pos)
        if ctype == 0 and length == 0:  # zero padding / preallocated space
            pos += left_in_block
            continue
        start = pos + HDR
        end = start + length
        if end > n or length > left_in_block - HDR:
            break  # truncated / corrupt tail
        data = buf[start:end]
        if zlib.crc32(data, zlib.crc32(bytes([ctype]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{run_file}: CRC mismatch at offset {pos}")
        pos = end
        if ctype == 1:  # FULL
            payloads.append(bytes(data))
            pending = None
        elif ctype == 2:  # FIRST
            pending = bytearray(data)
        elif ctype == 3 and pending is not None:  # MIDDLE
            pending += data
        elif ctype == 4 and pending is not None:  # LAST
            pending += data
            payloads.append(bytes(pending))
            pending = None
        # else: orphan fragment -> ignore

    def item_value(item):
        which = item.WhichOneof("value")
        if which is None:
            return json.loads(item.value_json) if item.value_json else None
        if which == "none":
            return None
        if which == "json":
            return json.loads(item.json)
        return getattr(item, which)  # boolean / integer / number / text

    history = []
    for raw in payloads:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        h = rec.history
        row = {}
        for item in h.item:
            keys = list(item.nested_key) if item.nested_key else [item.key]
            d = row
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = item_value(item)
        if "_step" not in row and h.HasField("step"):
            row["_step"] = h.step.num
        history.append(row)
    return history
