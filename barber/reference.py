"""Pure-torch reference of every barber op. These docstrings define the semantics.

Total order (shared with csrc/core/order.h): higher score ranks first; among equal
scores the lower column index ranks first. NaN scores are rejected with an error
naming the op; +inf and -inf are ordinary values. Masks are torch.bool, True = kept.
The reference uses stable sorts, never torch.topk (which has no tie order).
"""

from __future__ import annotations

import torch

# --- mask ops: topk_mask, nm_mask, rebuild_mask ------------------------------------

# --- packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask -----------------
