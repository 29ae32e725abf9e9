"""Pure-torch reference of every barber op. These docstrings define the semantics.

Total order (shared with csrc/core/order.h): higher score ranks first; among equal
scores the lower column index ranks first. NaN scores are rejected with an error
naming the op; +inf and -inf are ordinary values. Masks are torch.bool, True = kept.
The reference uses stable sorts, never torch.topk (which has no tie order).
"""

from __future__ import annotations

import torch

# --- mask ops: topk_mask, nm_mask, rebuild_mask ------------------------------------
#
# Ranking details shared with csrc/core/order.h: scores are compared as floats after a
# conversion to float32 (exact for float16 and bfloat16), so -0.0 equals +0.0 (they tie
# and the column index decides). Errors are RuntimeErrors with the native ops' messages.

_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_scores(op: str, scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise RuntimeError(f"barber::{op}: expected scores to be 2-D [rows, cols], got shape {list(scores.shape)}")
    if scores.dtype not in _SCORE_DTYPES:
        raise RuntimeError(f"barber::{op}: expected scores of dtype float32, float16 or bfloat16, got {scores.dtype}")


def _ranking_scores(op: str, scores: torch.Tensor) -> torch.Tensor:
    """float32 copy of scores with -0.0 turned into +0.0; raises on NaN."""
    s = scores.float()
    if bool(torch.isnan(s).any()):
        raise RuntimeError(f"barber::{op}: scores contain NaN")
    return torch.where(s == 0, torch.zeros((), dtype=s.dtype, device=s.device), s)


def _ranks(s: torch.Tensor) -> torch.Tensor:
    """rank[..., j] = position of entry j in its row's total order (0 = best), int64."""
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(s.shape[-1], device=s.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k best entries of every row.

    Args:
        scores: [rows, cols] float32, float16 or bfloat16, any strides.
        k: 0 <= k <= cols.

    Returns:
        bool [rows, cols], exactly k True per row: the first k of the row in the total order
        (higher score first; equal scores -> lower column first). NaN raises.
    """
    _check_scores("topk_mask", scores)
    cols = scores.shape[1]
    if not 0 <= k <= cols:
        raise RuntimeError(f"barber::topk_mask: expected 0 <= k <= cols={cols}, got k={k}")
    return _ranks(_ranking_scores("topk_mask", scores)) < k


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every group of m consecutive columns keep the n best.

    Args:
        scores: [rows, cols] float32, float16 or bfloat16, cols divisible by m.
        n, m: 0 <= n <= m, m >= 1.

    Returns:
        bool [rows, cols], exactly n True in every group (cols 0..m-1, m..2m-1, ...),
        chosen by the total order within the group. NaN raises.
    """
    _check_scores("nm_mask", scores)
    rows, cols = scores.shape
    if m < 1:
        raise RuntimeError(f"barber::nm_mask: expected m >= 1, got m={m}")
    if not 0 <= n <= m:
        raise RuntimeError(f"barber::nm_mask: expected 0 <= n <= m={m}, got n={n}")
    if cols % m != 0:
        raise RuntimeError(f"barber::nm_mask: expected the number of columns to be divisible by m={m}, got {cols}")
    s = _ranking_scores("nm_mask", scores).reshape(rows, cols // m, m)
    return (_ranks(s) < n).reshape(rows, cols)


def rebuild_mask(scores: torch.Tensor, mask: torch.Tensor, ratio: float, m: int = 0) -> torch.Tensor:
    """LLM-Barber mask rebuild, per row (docs/algorithm.md §4.4, N:M §4.6, ties §1.1); one piece: the spec's twin.

    Per row, P = pruned entries (mask False), K = kept entries (mask True). Sort P
    best-first (a1, a2, ...) and K worst-first (b1, b2, ...) in the total order ("worst" =
    last: lowest score, and among equal scores the higher column). R = #{i <= min(|P|, |K|) :
    score(a_i) > score(b_i)} (strictly greater scores; these i form a prefix), and
    s = floor(ratio * R) computed in float64. The rebuild regrows a1..as and prunes b1..bs,
    so every row keeps exactly as many entries as before; ratio = 0 returns the mask
    unchanged. With ratio = 1 no beneficial pair is left: the best pruned score is at most
    the worst kept score.

    N:M variant (m > 0): s and a1..as are chosen from the whole row as above; then every
    group of m consecutive columns that regrew r entries prunes the r worst (total order)
    of its previously kept entries instead of b1..bs, so every group keeps its count. The
    input must keep the same number of entries in every group (a valid N:M mask), and a
    group may not regrow more entries than it kept (impossible when n >= m - n, as in 2:4
    and 4:8); both raise.

    Args:
        scores: [rows, cols] float32, float16 or bfloat16.
        mask: bool [rows, cols] on the device of scores, True = kept.
        ratio: 0 <= ratio <= 1 (the paper's mask rebuilding ratio, alpha).
        m: 0 for the unstructured rebuild, else the N:M group size (cols divisible by m).

    Returns:
        The rebuilt bool mask [rows, cols] (a new tensor). NaN scores raise.
    """
    op = "rebuild_mask"
    _check_scores(op, scores)
    if mask.dtype != torch.bool:
        raise RuntimeError(f"barber::{op}: expected mask of dtype torch.bool, got {mask.dtype}")
    if mask.shape != scores.shape:
        raise RuntimeError(
            f"barber::{op}: expected mask of the shape of scores {list(scores.shape)}, got {list(mask.shape)}"
        )
    if mask.device != scores.device:
        raise RuntimeError(f"barber::{op}: expected mask on the device of scores ({scores.device}), got {mask.device}")
    if not 0.0 <= ratio <= 1.0:
        raise RuntimeError(f"barber::{op}: expected 0 <= ratio <= 1, got ratio={ratio}")
    rows, cols = scores.shape
    if m < 0:
        raise RuntimeError(f"barber::{op}: expected m >= 0 (0: unstructured), got m={m}")
    if m > 0 and cols % m != 0:
        raise RuntimeError(f"barber::{op}: expected the number of columns to be divisible by m={m}, got {cols}")

    s = _ranking_scores(op, scores)
    kept = mask.clone()
    if m > 0 and rows > 0 and cols > 0:
        group_kept = kept.reshape(rows, cols // m, m).sum(-1)
        if bool((group_kept != group_kept[0, 0]).any()):
            raise RuntimeError(
                f"barber::{op}: expected an N:M mask that keeps the same number of entries in every group "
                f"of m={m} columns"
            )
    if rows == 0 or cols == 0:
        return kept

    rank = _ranks(s)  # 0 = best; unique per row
    # P best-first, then K: sort by (kept, rank). K worst-first, then P: sort by (pruned, -rank).
    grow_order = torch.sort(rank + cols * kept, dim=1).indices
    drop_order = torch.sort((cols - 1 - rank) + cols * ~kept, dim=1).indices
    n_kept = kept.sum(1, keepdim=True)
    pairs = torch.minimum(cols - n_kept, n_kept)
    position = torch.arange(cols, device=s.device).expand(rows, cols)
    better = s.gather(1, grow_order) > s.gather(1, drop_order)
    beneficial = (better & (position < pairs)).sum(1, keepdim=True)
    swaps = torch.floor(ratio * beneficial.double()).long()
    chosen = position < swaps
    regrow = torch.zeros_like(kept).scatter_(1, grow_order, chosen)
    if m == 0:
        drop = torch.zeros_like(kept).scatter_(1, drop_order, chosen)
        return (kept & ~drop) | regrow

    groups = cols // m
    regrown = regrow.reshape(rows, groups, m).sum(-1, keepdim=True)
    kept3 = kept.reshape(rows, groups, m)
    if bool((regrown > kept3.sum(-1, keepdim=True)).any()):
        raise RuntimeError(
            f"barber::{op}: a group of m={m} columns regrows more entries than it kept; "
            "lower the ratio, or keep n >= m - n per group"
        )
    # Previously kept entries of each group worst-first (then the pruned ones).
    worst_key = torch.where(kept, cols - 1 - rank, 2 * cols).reshape(rows, groups, m)
    worst_order = torch.sort(worst_key, dim=-1).indices
    chosen3 = torch.arange(m, device=s.device) < regrown
    drop = torch.zeros_like(kept3).scatter_(-1, worst_order, chosen3).reshape(rows, cols)
    return (kept & ~drop) | regrow


# --- packing ops: pack_24, unpack_24, pack_bitmask, unpack_bitmask -----------------

# Layout of 2:4 packing per element dtype: meta dtype, groups of 4 per meta word, row band
# and interweave of the CUTLASS meta reorder, CUTLASS minimum (and multiple) rows, cols.
_PACK24_LAYOUT = {
    torch.float16: (torch.int16, 4, 32, 4, 32, 64),
    torch.bfloat16: (torch.int16, 4, 32, 4, 32, 64),
    torch.int8: (torch.int32, 8, 16, 2, 16, 128),
}


def _pack24_layout(op: str, arg: str, dtype: torch.dtype) -> tuple:
    """The _PACK24_LAYOUT entry of `dtype`, or the error the native ops raise."""
    if dtype not in _PACK24_LAYOUT:
        hint = ""
        if dtype == torch.float32:
            hint = (
                " (float32 uses CUTLASS's 1:2 TF32 layout, which barber does not produce; "
                "cast to float16 or bfloat16)"
            )
        raise RuntimeError(f"{op}: expected {arg} of dtype float16, bfloat16 or int8, got {dtype}{hint}")
    return _PACK24_LAYOUT[dtype]


def _check_24_dense_shape(op: str, dtype: torch.dtype, rows: int, cols: int) -> None:
    """CUTLASS minimum shape of the dense matrix: 32x64 (16-bit) or 16x128 (int8), and multiples."""
    min_rows, min_cols = _PACK24_LAYOUT[dtype][4:]
    if not (rows >= min_rows and rows % min_rows == 0 and cols >= min_cols and cols % min_cols == 0):
        raise RuntimeError(
            f"{op}: expected a dense shape [rows, cols] with rows a positive multiple of {min_rows} and cols "
            f"a positive multiple of {min_cols} (CUTLASS 2:4 minimum for {dtype}), got [{rows}, {cols}]"
        )


def _meta_offsets(rows: int, ncols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Flat index in the reordered meta [rows, ncols] of every logical word (r, c), row-major.

    CUTLASS reorder_meta + ColumnMajorInterleaved<2> (csrc/core/pack24.h meta_offset):
    rows permuted within bands, 2x2 (row, col) tiles transposed off-diagonal, then
    column-major storage with 2 columns interleaved.
    """
    band, interweave = _PACK24_LAYOUT[dtype][2:4]
    r = torch.arange(rows, device=device).view(-1, 1).expand(rows, ncols)
    c = torch.arange(ncols, device=device).view(1, -1).expand(rows, ncols)
    r = r // band * band + (r % 8) * interweave + (r % band) // 8
    shift = ((r % 2 == 0) & (c % 2 == 1)).long() - ((r % 2 == 1) & (c % 2 == 0)).long()
    r, c = r + shift, c - shift
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def _group_codes(nonzero: torch.Tensor) -> torch.Tensor:
    """4-bit codes (int64) of groups [..., 4] with at most 2 nonzeros each.

    Low 2 bits: position of the first stored element; high 2 bits: the second. This is
    the encoder of torch's sparse_semi_structured_from_dense_cutlass, so groups with 0 or
    1 nonzeros get torch's positions: none -> 0xE, {0} -> 0x8, {1} -> 0x9, {2}/{3} -> 0xE.
    """
    m0, m1, _, m3 = nonzero.unbind(-1)
    expr0, expr1, expr2 = m0 & m1, ~m0 & m1, ~m0 & ~m1
    first = expr1.long() | (expr2.long() << 1)
    second = (expr0 | expr2 | m3).long() | ((expr1 | ~m1).long() << 1)
    return first | (second << 2)


def _to_signed(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 words holding unsigned bit patterns -> `dtype` (int16/int32) with the same bits."""
    bits = torch.iinfo(dtype).bits
    return torch.where(words >= 1 << (bits - 1), words - (1 << bits), words).to(dtype)


def pack_24(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 compression in PyTorch's CUTLASS (sm80) semi-structured layout.

    Args:
        dense: [rows, cols] float16, bfloat16 or int8, at most 2 nonzeros in every group of
            4 consecutive columns. rows and cols positive multiples of 32 and 64 (int8: 16
            and 128). float32 (CUTLASS's 1:2 TF32 layout) is rejected.

    Returns:
        values: [rows, cols/2], dtype of `dense`: each group's 2 stored elements in
            ascending column order. "Nonzero" is `x != 0` (-0.0 is zero, NaN is not);
            groups with fewer than 2 nonzeros store zeros, copied bit for bit, at the
            positions torch's encoder picks (see _group_codes).
        meta: [rows, cols/16] int16 (int8 input: [rows, cols/32] int32): the 4-bit group
            codes, group j of a word at bits 4j..4j+3, words moved to CUTLASS's
            reordered positions (_meta_offsets).

    Bit-identical to torch.sparse._semi_structured_conversions.
    sparse_semi_structured_from_dense_cutlass, except that a group with more than 2
    nonzeros raises here (torch silently drops values).
    """
    op = "barber::pack_24"
    if dense.dim() != 2:
        raise RuntimeError(f"{op}: expected a 2-D dense tensor, got {dense.dim()} dimensions")
    meta_dtype, groups_per_word = _pack24_layout(op, "dense", dense.dtype)[:2]
    rows, cols = dense.shape
    _check_24_dense_shape(op, dense.dtype, rows, cols)
    groups = dense.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    count = nonzero.sum(-1)
    if bool((count > 2).any()):
        row, group = (count > 2).nonzero()[0].tolist()
        raise RuntimeError(
            f"{op}: expected at most 2 nonzeros in every group of 4 columns, got {int(count[row, group])} in row "
            f"{row}, columns {4 * group}..{4 * group + 3} (prune to 2:4 before packing)"
        )
    codes = _group_codes(nonzero)
    positions = torch.stack((codes & 3, codes >> 2), dim=-1)
    values = groups.gather(-1, positions).reshape(rows, cols // 2)
    shifts = 4 * torch.arange(groups_per_word, device=dense.device)
    words = (codes.view(rows, -1, groups_per_word) << shifts).sum(-1)
    ncols = words.shape[1]
    meta = torch.empty(rows * ncols, dtype=meta_dtype, device=dense.device)
    meta[_meta_offsets(rows, ncols, dense.dtype, dense.device)] = _to_signed(words, meta_dtype).reshape(-1)
    return values, meta.view(rows, ncols)


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_24.

    Args:
        values: [rows, cols/2] float16, bfloat16 or int8.
        meta: [rows, cols/16] int16 (int8 values: [rows, cols/32] int32), as pack_24 made it.

    Returns:
        dense: [rows, cols], dtype of `values`, stored values at the coded positions and
        +0.0 (zero bits) elsewhere; bit-identical to torch's
        sparse_semi_structured_to_dense_cutlass. A group code whose two positions are not
        distinct and ascending (pack_24 never writes one) raises.
    """
    op = "barber::unpack_24"
    if values.dim() != 2:
        raise RuntimeError(f"{op}: expected 2-D values, got {values.dim()} dimensions")
    if meta.dim() != 2:
        raise RuntimeError(f"{op}: expected 2-D meta, got {meta.dim()} dimensions")
    meta_dtype, groups_per_word = _pack24_layout(op, "values", values.dtype)[:2]
    if meta.device != values.device:
        raise RuntimeError(f"{op}: expected meta on the device of values ({values.device}), got {meta.device}")
    if meta.dtype != meta_dtype:
        raise RuntimeError(f"{op}: expected meta of dtype {meta_dtype} for {values.dtype} values, got {meta.dtype}")
    rows, cols = values.shape[0], 2 * values.shape[1]
    _check_24_dense_shape(op, values.dtype, rows, cols)
    ncols = cols // (4 * groups_per_word)
    if tuple(meta.shape) != (rows, ncols):
        raise RuntimeError(
            f"{op}: expected meta of shape [{rows}, {ncols}] for values of shape [{rows}, {cols // 2}], "
            f"got [{meta.shape[0]}, {meta.shape[1]}]"
        )
    bits = torch.iinfo(meta_dtype).bits
    words = meta.reshape(-1)[_meta_offsets(rows, ncols, values.dtype, values.device)].long() & ((1 << bits) - 1)
    shifts = 4 * torch.arange(groups_per_word, device=values.device)
    codes = ((words.view(rows, ncols, 1) >> shifts) & 0xF).reshape(rows, cols // 4)
    first, second = codes & 3, (codes >> 2) & 3
    invalid = first >= second
    if bool(invalid.any()):
        row, group = invalid.nonzero()[0].tolist()
        raise RuntimeError(
            f"{op}: expected valid 2:4 metadata codes, got an invalid code for row {row}, columns "
            f"{4 * group}..{4 * group + 3} (meta is not the output of pack_24)"
        )
    dense = torch.zeros(rows, cols // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, torch.stack((first, second), dim=-1), values.reshape(rows, cols // 4, 2))
    return dense.view(rows, cols)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a bool mask [rows, cols] into uint8 [rows, ceil(cols/8)].

    Bit j (value 1 << j) of byte b of a row is column 8*b + j, i.e. numpy
    packbits(mask, axis=-1, bitorder="little") per row (compressed-tensors' `bitmask`).
    Padding bits of the last byte are zero.
    """
    op = "barber::pack_bitmask"
    if mask.dim() != 2:
        raise RuntimeError(f"{op}: expected a 2-D mask, got {mask.dim()} dimensions")
    if mask.dtype != torch.bool:
        raise RuntimeError(f"{op}: expected mask of dtype bool, got {mask.dtype}")
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_bitmask: uint8 [rows, ceil(cols/8)] -> bool [rows, cols].

    Padding bits beyond `cols` are ignored (as numpy unpackbits with count=cols).
    """
    op = "barber::unpack_bitmask"
    if bits.dim() != 2:
        raise RuntimeError(f"{op}: expected 2-D bits, got {bits.dim()} dimensions")
    if bits.dtype != torch.uint8:
        raise RuntimeError(f"{op}: expected bits of dtype uint8, got {bits.dtype}")
    if cols < 0:
        raise RuntimeError(f"{op}: expected cols >= 0, got {cols}")
    nbytes = (cols + 7) // 8
    if bits.shape[1] != nbytes:
        raise RuntimeError(
            f"{op}: expected bits.size(1) == ceil(cols/8) = {nbytes} for cols={cols}, got {bits.shape[1]}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.reshape(bits.shape[0], nbytes * 8)[:, :cols].bool()
