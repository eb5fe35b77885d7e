#!/usr/bin/env python3
"""Independent safetensors reader (standard library only) to cross-check fixtures.

Usage: read_safetensors.py FILE  -- prints each tensor's dtype, shape and first values, and
checks the format: 8-byte little-endian header length, JSON header, data_offsets tiling the data.
"""
import json
import struct
import sys

FMT = {"F32": ("f", 4), "F64": ("d", 8), "I64": ("q", 8), "I32": ("i", 4), "BF16": ("H", 2)}


def bf16_to_float(bits):
    """Raw little-endian bfloat16 bits -> the exact float value (the top half of a float32)."""
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    out, pos = {}, 0
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        b, e = t["data_offsets"]
        assert b == pos, f"{name}: gap or overlap at {b} (expected {pos})"
        code, size = FMT[t["dtype"]]
        count = 1
        for d in t["shape"]:
            count *= d
        assert e - b == count * size, f"{name}: {e - b} bytes for shape {t['shape']}"
        values = struct.unpack(f"<{count}{code}", data[b:e])
        if t["dtype"] == "BF16":
            values = tuple(bf16_to_float(v) for v in values)
        out[name] = (t["dtype"], t["shape"], values)
        pos = e
    assert pos == len(data), "trailing bytes after the last tensor"
    return meta, out


if __name__ == "__main__":
    meta, tensors = read(sys.argv[1])
    print("metadata:", meta)
    for name, (dtype, shape, values) in tensors.items():
        print(f"{name} {dtype} {shape} {list(values[:4])}")
