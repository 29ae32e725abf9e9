"""Packed against dense bytes on disk, and the bit-for-bit load back (issue #13's acceptance).

Prunes a checkpoint (default: the fetched SmolLM2-135M) 2:4 and 50% unstructured, each into a dense
and a packed output in one dtype (default bfloat16), then prints for each pattern the bytes on disk of
every safetensors file (embeddings and headers included), packed / dense, and whether every tensor of
the packed output, unpacked by `barber.checkpoint` and by `barber.load_pruned`, equals the dense
output's bit for bit.

    python tools/experiments/packed_size.py --nsamples 8 --seqlen 128 --work runs/packed_size
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from barber import assets, load_pruned
from barber.api import prune_and_evaluate
from barber.checkpoint import Checkpoint
from barber.packed import SaveFormat
from barber.prune import Pattern
from barber.settings import RECIPES


def disk_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a.view(torch.uint8) == b.view(torch.uint8)).all())


def loads_back(dense: Path, packed: Path) -> tuple[bool, bool]:
    """(every tensor read through Checkpoint equal, every load_pruned parameter equal), bit for bit."""
    d, p = Checkpoint.open(dense), Checkpoint.open(packed)
    read = d.tensor_names == p.tensor_names and all(same_bits(d.tensor(n), p.tensor(n)) for n in d.tensor_names)
    md, mp = load_pruned(dense).state_dict(), load_pruned(packed).state_dict()
    loaded = md.keys() == mp.keys() and all(same_bits(md[k], mp[k]) for k in md)
    return read, loaded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="default: the fetched SmolLM2-135M")
    ap.add_argument("--work", default="runs/packed_size")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--patterns", default="2:4,unstructured")
    args = ap.parse_args()
    ckpt = Path(args.ckpt) if args.ckpt else assets.smollm2_dir()
    work = Path(args.work)
    dtype = getattr(torch, args.dtype)
    rows = []
    for pat in args.patterns.split(","):
        pattern = Pattern.parse(pat)
        settings = RECIPES["refit"].settings(pattern)
        outs = {}
        for fmt in ("dense", "packed"):
            out = work / f"{pat.replace(':', '')}-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            prune_and_evaluate(ckpt, out, settings, assets.botchan_path(), nsamples=args.nsamples,
                               seqlen=args.seqlen, save=SaveFormat(fmt, dtype))
            print(f"{pat} {fmt}: pruned in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            outs[fmt] = out
        read, loaded = loads_back(outs["dense"], outs["packed"])
        dense, packed = disk_bytes(outs["dense"]), disk_bytes(outs["packed"])
        encodings = {}
        for entry in json.loads((outs["packed"] / "config.json").read_text())["barber"]["tensors"].values():
            encodings[entry["encoding"]] = encodings.get(entry["encoding"], 0) + 1
        rows.append({"pattern": pat, "dtype": args.dtype, "dense_bytes": dense, "packed_bytes": packed,
                     "ratio": round(packed / dense, 4), "encodings": encodings,
                     "checkpoint_read_bit_identical": read, "load_pruned_bit_identical": loaded})
    print(f"{'pattern':<13} {'dense bytes':>12} {'packed bytes':>12} {'ratio':>6}  encodings / bit-identical")
    for r in rows:
        print(f"{r['pattern']:<13} {r['dense_bytes']:>12} {r['packed_bytes']:>12} {r['ratio']:>6.4f}  "
              f"{r['encodings']} / read {r['checkpoint_read_bit_identical']}, load {r['load_pruned_bit_identical']}")
    print(json.dumps(rows))
    ok = all(r["ratio"] <= 0.72 and r["checkpoint_read_bit_identical"] and r["load_pruned_bit_identical"]
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
