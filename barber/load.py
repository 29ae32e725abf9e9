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

Mixture-of-experts checkpoints store one matrix per expert; transformers 5 models hold a block's
experts as 3-D tensors (``mlp.experts.gate_up_proj`` [E, 2f, d], ``mlp.experts.down_proj`` [E, d, f]).
`to_model_layout` stacks them where the model asks for it, the way transformers' own loading does;
those experts stay dense on a GPU (semi-structured tensors are 2-D).
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

__all__ = ["load_pruned", "to_model_layout", "two_four_linears"]


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
    state = to_model_layout(state, set(model.state_dict()), ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if ckpt.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise UsageError(f"{ckpt.path}: weights do not match the transformers model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model = model.to(device).eval()
    if semi_structured:
        _to_semi_structured(model, [n for n in two_four_linears(ckpt) if n in state])
    return model


def to_model_layout(state: dict[str, torch.Tensor], wanted: set[str], ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """`state` with each block's experts stacked into 3-D tensors where the model holds them so."""
    moe = ckpt.family.moe
    if moe is None:
        return state
    for i in range(ckpt.num_layers):
        base = ckpt.block_tensor_name(i, "")
        if base + "mlp.experts.gate_up_proj" not in wanted:
            continue  # per-expert modules (transformers 4): the stored names are the model's
        gate_up, down = [], []
        for e in range(ckpt.config.num_experts):
            g, u, d = (base + n + ".weight" for n in moe.expert_linears(e))
            gate_up.append(torch.cat([state.pop(g), state.pop(u)]))
            down.append(state.pop(d))
        state[base + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state[base + "mlp.experts.down_proj"] = torch.stack(down)
        router = base + moe.router + ".weight"
        state[base + "mlp.gate.weight"] = state.pop(router)
    return state


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
