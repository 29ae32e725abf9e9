"""Typed wrappers around the native ops (the only module that calls torch.ops.barber).

Each op has a fake (meta) implementation so it traces under torch.compile, and a
`backend` argument: "auto" uses the native kernel when the extension is built and the
pure-torch reference (barber.reference) otherwise; "native" insists on the kernel;
"torch" forces the reference. Masks are not differentiable.
"""

from __future__ import annotations

from typing import Literal

import torch

from barber import _native, reference

Backend = Literal["auto", "native", "torch"]

build_info = _native.build_info

# --- mask ops: topk_mask, nm_mask, rebuild_mask ------------------------------------

# --- packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask -----------------
