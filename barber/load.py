"""`load_pruned`: a transformers model from any barber output, dense or packed.

    from barber import load_pruned
    model = load_pruned("runs/out")                       # CPU: dense weights, bit for bit the dense output's
    model = load_pruned("runs/out", device="cuda", dtype=torch.bfloat16)  # 2:4 linears as torch.sparse tensors

The weights are read through `barber.checkpoint.Checkpoint`, which unpacks packed linears
(`barber.packed`), so a packed output loads to exactly the tensors of the dense output in the same
dtype. On a CUDA device, the linears of a 2:4 run become `torch.sparse.SparseSemiStructuredTensor`
weights (`to_sparse_semi_structured`, which builds the layout of the GPU at hand from the dense
weight), where their dtype (float16/bfloat16) and shape allow; the rest stay dense. transformers is
imported here only (it is not a dependency of the pruner).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from barber.checkpoint import Checkpoint
from barber.errors import UsageError
from barber.packed import CUTLASS_24
from barber.safetensors_format import read_header

log = logging.getLogger(__name__)

__all__ = ["load_pruned", "two_four_linears"]


def two_four_linears(ckpt: Checkpoint) -> list[str]:
    """Names of the linears a barber run pruned 2:4 (per its shards' metadata, or stored as CUTLASS 2:4)."""
    names = {name for name, (how, _) in ckpt.packed.items() if how.encoding == CUTLASS_24}
    for shard in ckpt.shard_files:
        barber = json.loads(read_header(ckpt.path / shard).metadata.get("barber", "{}"))
        names |= {name for name, entry in barber.get("tensors", {}).items() if entry.get("pattern") == "2:4"}
    return sorted(names)


def load_pruned(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    *, semi_structured: bool | None = None,
):
    """A transformers causal LM (eval mode) with the weights of the barber output `path`.

    Args:
        path: a barber output directory (dense or packed), or any checkpoint barber reads.
        device: where the model lives.
        dtype: the weights' dtype (default: as stored; a packed linear's stored dtype).
        semi_structured: make 2:4 linears `torch.sparse` semi-structured tensors (default: on CUDA only;
            needs float16/bfloat16 weights).

    Raises:
        CheckpointError: a damaged or unreadable output; UsageError: transformers missing, or
        `semi_structured` off CUDA.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UsageError("load_pruned needs transformers (pip install transformers)") from None
    device = torch.device(device)
    semi_structured = device.type == "cuda" if semi_structured is None else semi_structured
    if semi_structured and device.type != "cuda":
        raise UsageError(f"semi-structured 2:4 weights need a CUDA device, not {device}")
    ckpt = Checkpoint.open(path)
    state = {name: ckpt.tensor(name, dtype) for name in ckpt.tensor_names}
    ckpt.release()
    first = state[ckpt.block_tensor_name(0, ckpt.family.linears[0] + ".weight")]
    config = AutoConfig.from_pretrained(ckpt.path)
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=first.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if ckpt.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UsageError(f"{ckpt.path}: weights do not match the transformers model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model = model.to(device).eval()
    if semi_structured:
        _to_semi_structured(model, two_four_linears(ckpt))
    return model


def _no_init():
    """transformers' context that skips random initialisation (the weights are loaded next), if it has one."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext

        return nullcontext()
    return no_init_weights()


def _to_semi_structured(model: torch.nn.Module, names: list[str]) -> None:
    """Replace each named linear weight by its `to_sparse_semi_structured` form, where torch accepts it."""
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for name in names:
        module = model.get_submodule(name.removesuffix(".weight"))
        try:
            sparse = to_sparse_semi_structured(module.weight.data)
        except (RuntimeError, ValueError) as exc:  # dtype or shape the kernels do not take
            log.info("%s stays dense: %s", name, exc)
            continue
        module.weight = torch.nn.Parameter(sparse, requires_grad=False)
        converted += 1
    log.info("%d of %d 2:4 linears are semi-structured sparse", converted, len(names))
