"""`ModelConfig`: the architecture facts barber needs, parsed from a Hugging Face `config.json`.

Both the transformers 4 and transformers 5 spellings are accepted:

- rotary base and scaling: `rope_theta` + `rope_scaling` (4.x) or one `rope_parameters` dict (5.x),
  which may be split per layer type (`full_attention` / `sliding_attention`, Gemma 3; 4.x:
  `rope_local_base_freq`); `partial_rotary_factor` at the top level (4.x) or inside `rope_parameters`;
- per-layer attention: `layer_types` (5.x) or, for Gemma, the 4.x default pattern (Gemma 2: every
  other layer sliding; Gemma 3: `sliding_window_pattern`, five sliding layers then one full);
- Qwen's `use_sliding_window`: `sliding_window` applies only when it is true, on the layers
  `layer_types` names (5.x) or, without it, on those transformers' rule for the model type picks
  (`max_window_layers`; see `_qwen_window_layers`);
- Gemma's `hidden_activation`, `query_pre_attn_scalar` and logit soft-capping;
- OPT's own names: `ffn_dim`, `activation_function`, `enable_bias`, `word_embed_proj_dim`, `do_layer_norm_before`;
- mixture-of-experts (`MOE_TYPES`): `num_local_experts` (Mixtral) or `num_experts` (Qwen),
  `num_experts_per_tok`, Qwen's `moe_intermediate_size`, `shared_expert_intermediate_size` and
  `norm_topk_prob`; every block must be a mixture-of-experts block (`mlp_only_layers` empty,
  `decoder_sparse_step` 1), as in every released checkpoint of these types.

Supported rotary types: `default`, `linear`, `llama3` (LLaMA-3.1 style) and `longrope` (Phi-3 128k,
Phi-3.5, Phi-4-mini). Any other type is a
`CheckpointError`, never a silent fallback to unscaled positions; so is any structure barber does
not model (a vision tower, experts outside `MOE_TYPES`, latent attention, bidirectional attention), with
one line naming the `model_type`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from barber.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
#: Attention kinds of `layer_types`: causal over the whole sequence, or over the last `sliding_window` tokens.
FULL, SLIDING = "full_attention", "sliding_attention"
#: Gemma's layer pattern where a 4.x config.json has no `layer_types`: every n-th layer is full (n from
#: `sliding_window_pattern` when given).
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}
#: Mixture-of-experts model types whose expert keys are read, not refused (see `_experts`).
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
#: config.json keys of structures barber does not model -> what they are (refused, naming the model_type).
_UNSUPPORTED_KEYS = {
    "vision_config": "a vision tower",
    "audio_config": "an audio tower",
    "num_local_experts": "mixture-of-experts blocks",
    "num_experts": "mixture-of-experts blocks",
    "n_routed_experts": "mixture-of-experts blocks",
    "kv_lora_rank": "multi-head latent attention",
    "use_bidirectional_attention": "bidirectional attention",
}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling (`rope_type` linear, llama3 or longrope; `default` is represented by None).

    longrope (Phi-3 128k, Phi-3.5, Phi-4-mini): each frequency is divided by its `short_factor` entry for
    sequences up to `original_max_position_embeddings` tokens and by its `long_factor` entry beyond, and
    cos/sin are multiplied by `attention_factor`.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only checkpoint, in family-neutral names.

    Attributes:
        model_type: the `model_type` of config.json (see `barber.families.FAMILIES`).
        hidden_size: width d of the residual stream.
        intermediate_size: MLP width (OPT `ffn_dim`).
        num_layers: number of transformer blocks.
        num_heads / num_kv_heads / head_dim: attention geometry (GQA when kv < heads).
        vocab_size: rows of the token embedding.
        max_position_embeddings: context length (OPT: rows of the learned table, minus the offset).
        norm_eps: RMSNorm / LayerNorm epsilon.
        hidden_act: MLP activation name (`silu`, `relu`, `gelu`, ...; Gemma `hidden_activation`).
        rope_theta: rotary base; None for learned positions (OPT).
        rope_scaling: None for unscaled rotary embeddings.
        local_rope_theta / local_rope_scaling: rotary base and scaling of the sliding-window layers where they
            differ from the full ones (Gemma 3: `rope_local_base_freq`); None: the same as the full layers.
        partial_rotary_factor: the fraction of head_dim that is rotated (the leading dimensions).
        tie_word_embeddings: the output head reuses the token embedding.
        attention_bias / mlp_bias: llama-style bias switches (Qwen2 q/k/v biases come from the family).
        sliding_window: local attention span (a query sees itself and the window - 1 tokens before it), or
            None for full causal attention everywhere.
        layer_types: per block, `FULL` or `SLIDING`; None: every block is `SLIDING` when `sliding_window`
            is set (Mistral, Phi-3), else `FULL`.
        query_pre_attn_scalar: attention scores are scaled by its inverse square root instead of head_dim's (Gemma).
        attn_logit_softcapping / final_logit_softcapping: scores and logits become cap * tanh(x / cap) (Gemma 2).
        word_embed_proj_dim: OPT embedding width (== hidden_size when there is no project_in/out).
        do_layer_norm_before: pre-LN (True) or post-LN (False, OPT-350m).
        final_layer_norm: OPT has a final LayerNorm only when pre-LN and not `_remove_final_layer_norm`.
        norm_affine: OPT `layer_norm_elementwise_affine`.
        qkv_bias: q/k/v carry biases by config.json's `qkv_bias` (Qwen2-MoE; o never does).
        num_experts: routed experts per block (0: a dense MLP); experts_per_token: how many each token uses.
        moe_intermediate_size: width of one routed expert (Mixtral: `intermediate_size`).
        shared_expert_intermediate_size: width of the always-on shared expert (Qwen2-MoE), else 0.
        norm_topk_prob: the chosen experts' probabilities are renormalised to sum to 1 (Mixtral always).
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    norm_affine: bool = True
    qkv_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def layer_type(self, i: int) -> str:
        """`FULL` or `SLIDING`: how block `i` attends."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return SLIDING if self.sliding_window is not None else FULL

    @property
    def uniform_layers(self) -> bool:
        """Every block attends alike (one `Positions` serves them all)."""
        return self.layer_types is None or len(set(self.layer_types)) == 1

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Parse a config.json file; any problem is a one-line `CheckpointError`."""
        data = read_config_json(path)
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a config.json dictionary (transformers 4 or 5 form)."""
        model_type = d.get("model_type")
        if not isinstance(model_type, str):
            raise CheckpointError("config.json has no model_type")
        _refuse_unsupported(model_type, d)
        if model_type == "opt":
            return _opt_config(d)
        return _rotary_config(model_type, d)


def _get(d: Mapping[str, Any], key: str, kind: type, default: Any = ..., *, positive: bool = False) -> Any:
    """Read one typed field; a missing required field or a wrong type is a CheckpointError."""
    if key not in d or d[key] is None:
        if default is ...:
            raise CheckpointError(f"config.json is missing {key!r}")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CheckpointError(f"config.json field {key!r} should be {kind.__name__}, got {value!r}")
    if positive and not value > 0:
        raise CheckpointError(f"config.json field {key!r} should be positive, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise CheckpointError(f"config.json field {key!r} is not finite")
    return value


def token_id(d: Mapping[str, Any], key: str) -> int | None:
    """A special token id of config.json (`bos_token_id`, ...): an int, a list (the first is used) or null."""
    value = d.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refuse_unsupported(model_type: str, d: Mapping[str, Any]) -> None:
    """A one-line CheckpointError naming `model_type` when config.json describes a structure barber lacks."""
    for key, what in _UNSUPPORTED_KEYS.items():
        if model_type in MOE_TYPES and what == "mixture-of-experts blocks":
            continue
        if d.get(key) not in (None, False, 0):
            raise CheckpointError(f"model_type {model_type!r}: {what} ({key}) is not supported")


def _rope_params(d: Mapping[str, Any], kind: str) -> dict | None:
    """The `rope_parameters` dict of layer kind `kind` (5.x; None when absent or not split for that kind)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        params = params.get(kind)
    elif kind == SLIDING:
        return None  # one set of parameters for every layer
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"config.json field 'rope_parameters' should be an object, got {params!r}")
    return params


def _local_rope(d: Mapping[str, Any]) -> tuple[float | None, RopeScaling | None]:
    """Rotary base and scaling of the sliding layers where config.json gives them apart (Gemma 3)."""
    if _rope_params(d, SLIDING) is not None:
        return _rope(d, SLIDING)
    if d.get("rope_local_base_freq") is not None:
        return _get(d, "rope_local_base_freq", float, positive=True), None
    return None, None


def _partial_rotary(d: Mapping[str, Any], head_dim: int) -> float:
    """The rotated fraction of head_dim, from `rope_parameters` (5.x) or the top level (4.x)."""
    params = _rope_params(d, FULL) or {}
    factor = _get(params, "partial_rotary_factor", float, None) or _get(d, "partial_rotary_factor", float, 1.0)
    rotary = int(head_dim * factor)
    if not 0 < factor <= 1 or rotary % 2:
        raise CheckpointError(
            f"partial_rotary_factor={factor} gives {rotary} rotary dims of {head_dim}; need an even number"
        )
    return factor


def _layer_types(model_type: str, d: Mapping[str, Any], layers: int) -> tuple[str, ...] | None:
    """Per-block attention kinds: `layer_types`, Gemma's default pattern, or None (all blocks alike)."""
    types = d.get("layer_types")
    if types is None and model_type in _DEFAULT_PATTERN:
        every = _get(d, "sliding_window_pattern", int, _DEFAULT_PATTERN[model_type], positive=True)
        types = [SLIDING if (i + 1) % every else FULL for i in range(layers)]
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != layers:
        raise CheckpointError(f"config.json field 'layer_types' should list {layers} layer kinds, got {types!r}")
    for kind in types:
        if kind not in (FULL, SLIDING):
            raise CheckpointError(f"model_type {model_type!r}: layer type {kind!r} is not supported")
    return tuple(types)


def _qwen_window_layers(model_type: str, d: Mapping[str, Any], layers: int) -> tuple[str, ...] | None:
    """Which layers of a Qwen config with `use_sliding_window` attend through the window, by transformers'
    rule for that model type (where config.json lists no `layer_types`): Qwen2 and Qwen3 from layer
    `max_window_layers` on; Qwen2-MoE the even-numbered layers below it; Qwen3-MoE every layer (None)."""
    if model_type == "qwen3_moe":
        return None
    first = _get(d, "max_window_layers", int, 28)
    if model_type == "qwen2_moe":
        return tuple(SLIDING if (i + 1) % 2 and i < first else FULL for i in range(layers))
    return tuple(SLIDING if i >= first else FULL for i in range(layers))


def _rope(d: Mapping[str, Any], kind: str = FULL) -> tuple[float, RopeScaling | None]:
    """Rotary base and scaling of layer kind `kind`: `rope_parameters` (5.x) or `rope_theta`/`rope_scaling` (4.x)."""
    params = _rope_params(d, kind)
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"config.json field 'rope_parameters' should be an object, got {params!r}")
    if params:
        theta = _get(params, "rope_theta", float, None, positive=True)
        if theta is None:
            theta = _get(d, "rope_theta", float, 10000.0, positive=True)
        scaling = params
    else:
        theta = _get(d, "rope_theta", float, 10000.0, positive=True)
        scaling = d.get("rope_scaling")
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json field 'rope_scaling' should be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "longrope":
        return theta, _longrope(d, scaling)
    factor = _get(scaling, "factor", float, positive=True)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=factor)
    low = _get(scaling, "low_freq_factor", float, positive=True)
    high = _get(scaling, "high_freq_factor", float, positive=True)
    if not high > low:
        raise CheckpointError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    original = _get(scaling, "original_max_position_embeddings", int, positive=True)
    return theta, RopeScaling("llama3", factor, low, high, original)


def _longrope(d: Mapping[str, Any], scaling: Mapping[str, Any]) -> RopeScaling:
    """longrope's factors, as transformers computes them (`original_max_position_embeddings` in the scaling
    dict or at the top level; `factor` and `attention_factor` derived where absent)."""
    original = _get(scaling, "original_max_position_embeddings", int, None, positive=True)
    if original is None:
        original = _get(d, "original_max_position_embeddings", int, positive=True)
    factor = _get(scaling, "factor", float, None, positive=True)
    if factor is None:
        factor = _get(d, "max_position_embeddings", int, positive=True) / original
    attention = _get(scaling, "attention_factor", float, None, positive=True)
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise CheckpointError(f"longrope rope scaling needs {key!r} as a list of positive numbers")
        factors[key] = tuple(float(v) for v in value)
    return RopeScaling("longrope", factor, original_max_position_embeddings=original, attention_factor=attention,
                       **factors)


def _rotary_config(model_type: str, d: Mapping[str, Any]) -> ModelConfig:
    """Every rotary model type (llama, mistral, qwen2/3, phi3, gemma2/3; the family table decides support)."""
    hidden = _get(d, "hidden_size", int, positive=True)
    heads = _get(d, "num_attention_heads", int, positive=True)
    kv_heads = _get(d, "num_key_value_heads", int, heads, positive=True)
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = _get(d, "head_dim", int, None, positive=True)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        head_dim = hidden // heads
    if head_dim % 2:
        raise CheckpointError(f"head_dim={head_dim} must be even for rotary embeddings")
    theta, scaling = _rope(d)
    local_theta, local_scaling = _local_rope(d)
    layers = _get(d, "num_hidden_layers", int, positive=True)
    use_window = _get(d, "use_sliding_window", bool, None)  # Qwen: sliding_window is inert unless true
    sliding = None
    if use_window is None:
        sliding = _get(d, "sliding_window", int, None, positive=True)
    elif use_window:
        sliding = _get(d, "sliding_window", int, positive=True)
    types = _layer_types(model_type, d, layers)
    if use_window and d.get("layer_types") is None:
        types = _qwen_window_layers(model_type, d, layers)
    partial = _partial_rotary(d, head_dim)
    for scale in (scaling, local_scaling):
        if scale is not None and scale.rope_type == "longrope":
            half = int(head_dim * partial) // 2
            if len(scale.short_factor) != half or len(scale.long_factor) != half:
                raise CheckpointError(
                    f"longrope factors should have {half} entries (half the rotary dims), got "
                    f"{len(scale.short_factor)} and {len(scale.long_factor)}"
                )
    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=_get(d, "intermediate_size", int, positive=True),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_get(d, "vocab_size", int, positive=True),
        max_position_embeddings=_get(d, "max_position_embeddings", int, 2048, positive=True),
        norm_eps=_get(d, "rms_norm_eps", float, 1e-6, positive=True),
        hidden_act=_get(d, "hidden_activation", str, None) or _get(d, "hidden_act", str, "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, False),
        attention_bias=_get(d, "attention_bias", bool, False),
        mlp_bias=_get(d, "mlp_bias", bool, False),
        sliding_window=sliding,
        layer_types=types,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        partial_rotary_factor=partial,
        query_pre_attn_scalar=_get(d, "query_pre_attn_scalar", float, None, positive=True),
        attn_logit_softcapping=_get(d, "attn_logit_softcapping", float, None, positive=True),
        final_logit_softcapping=_get(d, "final_logit_softcapping", float, None, positive=True),
        word_embed_proj_dim=hidden,
        qkv_bias=model_type == "qwen2_moe" and _get(d, "qkv_bias", bool, True),
        **_experts(model_type, d),
    )


def _experts(model_type: str, d: Mapping[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of `ModelConfig` (empty for a dense model type)."""
    if model_type not in MOE_TYPES:
        return {}
    key = "num_local_experts" if "num_local_experts" in d else "num_experts"
    experts = _get(d, key, int, positive=True)
    per_token = _get(d, "num_experts_per_tok", int, positive=True)
    if per_token > experts:
        raise CheckpointError(f"num_experts_per_tok={per_token} is more than the {experts} experts")
    only = d.get("mlp_only_layers") or []
    step = _get(d, "decoder_sparse_step", int, 1, positive=True)
    if only or step != 1:
        raise CheckpointError(
            f"model_type {model_type!r}: dense MLP blocks between mixture-of-experts blocks "
            f"(mlp_only_layers={only}, decoder_sparse_step={step}) are not supported"
        )
    mixtral = model_type == "mixtral"
    return dict(
        num_experts=experts,
        experts_per_token=per_token,
        moe_intermediate_size=_get(d, "intermediate_size" if mixtral else "moe_intermediate_size", int, positive=True),
        shared_expert_intermediate_size=(
            _get(d, "shared_expert_intermediate_size", int, positive=True) if model_type == "qwen2_moe" else 0
        ),
        norm_topk_prob=True if mixtral else _get(d, "norm_topk_prob", bool, False),
    )


def _opt_config(d: Mapping[str, Any]) -> ModelConfig:
    """OPT: learned positions, LayerNorm, fc1/fc2 MLP, optional project_in/out and post-LN."""
    hidden = _get(d, "hidden_size", int, positive=True)
    heads = _get(d, "num_attention_heads", int, positive=True)
    if hidden % heads:
        raise CheckpointError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    bias = _get(d, "enable_bias", bool, True)
    pre_ln = _get(d, "do_layer_norm_before", bool, True)
    return ModelConfig(
        model_type="opt",
        hidden_size=hidden,
        intermediate_size=_get(d, "ffn_dim", int, positive=True),
        num_layers=_get(d, "num_hidden_layers", int, positive=True),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=_get(d, "vocab_size", int, positive=True),
        max_position_embeddings=_get(d, "max_position_embeddings", int, 2048, positive=True),
        norm_eps=1e-5,  # nn.LayerNorm default; OPT configs carry no epsilon
        hidden_act=_get(d, "activation_function", str, "relu"),
        tie_word_embeddings=_get(d, "tie_word_embeddings", bool, True),
        attention_bias=bias,
        mlp_bias=bias,
        word_embed_proj_dim=_get(d, "word_embed_proj_dim", int, hidden, positive=True),
        do_layer_norm_before=pre_ln,
        final_layer_norm=pre_ln and not _get(d, "_remove_final_layer_norm", bool, False),
        norm_affine=_get(d, "layer_norm_elementwise_affine", bool, True),
    )


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read config.json as a dictionary; a missing, unreadable or non-object file is a CheckpointError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
