"""barber-stream's options: the parser, and the settings and memory budget they describe.

`stream_parser()` builds the parser (one function per option group); `settings_from_args` turns
the parsed options into `PruneSettings` (a recipe's, overridden by every option given) and
`budget_from_args` into a `MemoryBudget`. `ArgumentParser` raises `UsageError` instead of printing
usage and exiting. Nothing here runs a pruning step.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
from pathlib import Path
from typing import NoReturn

from barber.distributed import DEFAULT_TIMEOUT
from barber.errors import UsageError, exit_code_table
from barber.prune import Granularity, InitMethod, Metric, Pattern
from barber.settings import DEFAULT_RECIPE, RECIPES, Reconstruct

#: The signals that stop a run after the current block (`barber.cli.GracefulStop`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

__all__ = ["DEMO_OUT", "DTYPES", "STOP_SIGNALS", "STREAM_EPILOG", "ArgumentParser", "apply_demo", "budget_from_args",
           "resolve_device", "save_from_args", "settings_from_args", "stream_parser"]


DTYPES = ("float32", "bfloat16", "float16")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (one line, exit code 2) instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _size_arg(text: str) -> int:
    """argparse type of a memory budget such as 6GiB or 500MiB (see `barber.budget.parse_bytes`)."""
    from barber.budget import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hidden_arg(text: str) -> str:
    """argparse type of --hidden-states: "pinned", the old name of host, still works (with a notice)."""
    if text == "pinned":
        print("barber-stream: --hidden-states pinned is deprecated, use host", file=sys.stderr)
        return "host"
    return text


def resolve_device(name: str):
    """A torch.device for `name`; cuda without a GPU is a UsageError."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name") from None


DEMO_OUT = "runs/smollm2-135m-50"


_INTERRUPTIONS = """\
interruptions:
  After every block (or every --state-interval seconds), the pruned block and the state needed
  to continue are saved in OUT/.barber-work/. A run that stops for any reason (Ctrl-C, SIGTERM, a crash, a full disk,
  a power cut) continues from the last finished block when the same command is run again, and
  writes the same bytes as an uninterrupted run. Ctrl-C or SIGTERM stop after the current block;
  a second one stops at once. A state saved with another checkpoint, calibration data or
  settings is refused (--overwrite starts over). OUT is complete only once barber_report.json
  exists; the shards appear there only when all are written.
"""


def _exit_codes() -> str:
    """The exit-code table of the help: success, one line per error class's code, the signal stops."""
    rows = [(0, "success"), *exit_code_table()]
    rows += [(128 + sig, f"stopped by {sig.name}{' (Ctrl-C)' if sig == signal.SIGINT else ''}, resumable")
             for sig in STOP_SIGNALS]
    lines = ["exit codes:"]
    for code, text in rows:
        lines.append(textwrap.fill(text, 98, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7))
    return "\n".join(lines) + "\n"


class _StreamHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in the help, and the epilog printed as written."""


STREAM_EPILOG = _INTERRUPTIONS + "\n" + _exit_codes()


def stream_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="barber-stream",
        description=(
            "Prune a Hugging Face checkpoint one transformer block at a time: an initial mask "
            "(magnitude, Wanda or SparseGPT), then the LLM-Barber block-aware mask rebuild."
        ),
        epilog=STREAM_EPILOG,
        formatter_class=_StreamHelpFormatter,
    )
    _io_options(p.add_argument_group("input and output"))
    _pruning_options(p.add_argument_group("pruning"))
    _calibration_options(p.add_argument_group("calibration"))
    _runtime_options(p.add_argument_group("runtime"))
    _evaluation_options(p.add_argument_group("evaluation"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _io_options(io) -> None:
    io.add_argument("--ckpt", help="input checkpoint directory (config.json, safetensors, tokenizer); never written")
    io.add_argument("--out", help="output directory (must not be the input or inside it)")
    io.add_argument(
        "--overwrite", action="store_true", help="replace a previous barber result or interrupted run in --out"
    )
    io.add_argument(
        "--state-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="save the resume state (the calibration hidden states) at most every SECONDS instead of after every "
        "block: less disk traffic on fast GPUs, at most SECONDS of work redone on a resume",
    )
    io.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out (the default when one exists; with this flag, "
        "having nothing to resume is an error)",
    )
    io.add_argument(
        "--save-format", choices=["dense", "packed"], default="dense",
        help="dense: every tensor as in the input, pruned entries +0.0 (what every engine reads); packed: each "
        "pruned linear as values + metadata, PyTorch's CUTLASS 2:4 layout for 2:4 runs (16-bit weights), values + "
        "a bitmask otherwise (smaller files; read by barber.load_pruned and barber-eval)",
    )
    io.add_argument("--save-dtype", choices=DTYPES, default=None,
                    help="store every floating tensor in this dtype (default: the input's)")
    io.add_argument("--no-report", action="store_true",
                    help="do not write report.md and report.png beside barber_report.json")
    io.add_argument(
        "--demo",
        action="store_true",
        help=f"prune the fetched SmolLM2-135M (50%%, the default recipe) into {DEMO_OUT} and print perplexity "
        "before and after on held-out Wikipedia text",
    )


def _pruning_options(m) -> None:
    m.add_argument(
        "--sparsity", type=float, default=None,
        help="fraction pruned per row, in [0, 1) (default 0.5; N:M implies 1-N/M)",
    )
    m.add_argument(
        "--pattern", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8 (N kept of every M)"
    )
    m.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=DEFAULT_RECIPE,
        help="the starting point the options below override: "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()),
    )
    m.add_argument("--init", choices=[e.value for e in InitMethod], default=None,
                   help="initial mask (default: the recipe's, wanda)")
    m.add_argument(
        "--magnitude-scope",
        choices=["row", "layer"],
        default="row",
        help="magnitude ranking per output row, or per matrix as the reference code does",
    )
    rebuild = m.add_mutually_exclusive_group()
    rebuild.add_argument("--rebuild", action="store_true",
                         help="run the Barber rebuild even where the recipe does not (refit)")
    rebuild.add_argument("--no-rebuild", action="store_true", help="no Barber rebuild, whatever the recipe")
    m.add_argument(
        "--rebuild-ratio",
        type=float,
        default=None,
        help="alpha, fraction of beneficial swaps made (default: wanda and N:M 0.01, magnitude and sparsegpt 0.1)",
    )
    m.add_argument(
        "--granularity",
        choices=[e.value for e in Granularity],
        default=None,
        help="rebuild group, whose kept count never changes: row (exact sparsity per row), column (per input "
        "column), layer (per matrix) or block (per sub-block); rows may drift from the target sparsity with the "
        "last three (default: wanda and N:M row, magnitude block, sparsegpt layer)",
    )
    m.add_argument(
        "--metric", choices=[e.value for e in Metric], default="wg", help="rebuild score: |W|*sqrt(A), |W| or sqrt(A)"
    )
    m.add_argument(
        "--retain-reconstruction",
        action="store_true",
        help="keep the initial method's updated weights (SparseGPT) instead of resetting to dense values",
    )
    _reconstruct_options(m)


def _reconstruct_options(m) -> None:
    m.add_argument(
        "--reconstruct",
        choices=[e.value for e in Reconstruct],
        default=None,
        help="re-fit the kept weights on the final mask by least squares (masks and zeros unchanged): layer "
        "(each linear against the dense layer on its own inputs), subblock (linear by linear through each "
        "sub-block, against the dense sub-block's outputs), or none (default: the recipe's)",
    )
    m.add_argument("--reconstruct-damp", type=float, default=0.01,
                   help="re-fit ridge towards the dense weights, as a fraction of the mean diagonal of X^T X")
    m.add_argument("--reconstruct-shrink", type=float, default=0.25,
                   help="re-fit: pull X^T X this far towards its diagonal (0: trust the calibration windows' "
                   "correlations, 1: no re-fit); against over-fitting a small calibration set")
    m.add_argument("--reconstruct-iters", type=int, default=8,
                   help="conjugate-gradient iterations per linear of the re-fit (at most)")


def _calibration_options(c) -> None:
    c.add_argument(
        "--calib",
        default=None,
        help="text, JSON lines with a 'text' field (.jsonl/.json, optionally .gz), or token ids "
        "[nsamples, seqlen] in .safetensors/.npy/.pt (default: the fetched Botchan text)",
    )
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seed of the window sampling")
    c.add_argument(
        "--sample-groups", type=int, default=8, metavar="G",
        help="every calibration statistic is a sum over G groups of consecutive windows in a fixed order, so the "
        "output is the same whatever the micro-batch, memory or number of ranks (default 8, at most --nsamples; "
        "a data-parallel run needs at most G ranks; another G changes the last bits of sums)",
    )


def _runtime_options(r) -> None:
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="dtype of forwards and hidden states (gradients are float32)"
    )
    r.add_argument(
        "--batch-size", type=int, default=0,
        help="windows per forward/backward call; 0 = automatic (about 1024 tokens on a CPU, 8192 on a GPU, "
        "lowered to fit the memory budget; mixture-of-experts models: always 1)",
    )
    r.add_argument("--max-cpu-memory", type=_size_arg, default=None, metavar="SIZE",
                   help="peak RSS budget, e.g. 6GiB or 500MiB (default: 80%% of the memory available at start)")
    r.add_argument("--max-gpu-memory", type=_size_arg, default=None, metavar="SIZE",
                   help="GPU memory budget, e.g. 6GiB (default: 90%% of the free GPU memory, at most 9 GiB)")
    r.add_argument("--hidden-states", type=_hidden_arg, choices=["auto", "device", "host", "disk"], default="auto",
                   help="where calibration hidden states live: on the compute device, in host memory (page-locked "
                   "on a GPU run), or in a file under --out/.barber-work; auto = the first that fits the budgets")
    r.add_argument("--no-prefetch", action="store_true", help="do not read the next block while this one computes")
    r.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="under torchrun: give up on a rank that neither answers nor fails after this long "
                   f"(default {DEFAULT_TIMEOUT:.0f}; a rank that dies is noticed at once)")
    r.add_argument("--allow-tf32", action="store_true",
                   help="let float32 matmuls on a GPU use TF32 "
                        "(faster; gradients, hence a few mask entries, may change)")


def _evaluation_options(e) -> None:
    e.add_argument("--eval", default=None, metavar="TEXT", help="measure the perplexity of the result on this text")
    e.add_argument("--eval-windows", type=int, default=None, help="evaluate at most N windows")
    e.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default: --seqlen)")
    e.add_argument("--eval-dense", action="store_true", help="also measure the input's perplexity, for comparison")


def apply_demo(args: argparse.Namespace) -> None:
    """The README's first command: SmolLM2-135M, 50% Wanda + Barber, sized for a few minutes on 2 cores."""
    from barber import assets
    from barber.layout import STATE_FILE, WORK_DIR

    if args.ckpt is None:
        args.ckpt = str(assets.smollm2_dir())
    if args.out is None:
        args.out = DEMO_OUT
        # replace an earlier demo result, but let an interrupted demo resume
        args.overwrite = not args.resume and not (Path(DEMO_OUT) / WORK_DIR / STATE_FILE).exists()
    if args.calib is None:
        args.calib = str(assets.botchan_path())
    if args.eval is None:
        args.eval = str(assets.wiki_text_path())
    args.nsamples, args.seqlen = 32, 256
    args.eval_seqlen = args.eval_seqlen or 512
    args.eval_windows = args.eval_windows or 16
    args.eval_dense = True


def settings_from_args(args: argparse.Namespace):
    """PruneSettings from the parsed options: the recipe's, overridden by every option given.

    PruneSettings checks the values; the options that are not settings are checked here.
    """
    import torch

    try:
        pattern = Pattern.parse(args.pattern)
    except ValueError as exc:
        raise UsageError(f"--pattern: {exc}") from None
    sparsity = args.sparsity
    if pattern.structured:
        implied = 1 - pattern.n / pattern.m
        if sparsity is not None and abs(sparsity - implied) > 1e-12:
            raise UsageError(f"--sparsity {sparsity} contradicts --pattern {pattern} (which prunes {implied:g})")
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if not args.state_interval >= 0:
        raise UsageError(f"--state-interval must be >= 0 seconds, got {args.state_interval}")
    for name in ("nsamples", "seqlen"):
        if getattr(args, name) < {"seqlen": 2, "nsamples": 1}[name]:
            raise UsageError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    given = {
        "init": None if args.init is None else InitMethod(args.init),
        "rebuild": False if args.no_rebuild else True if args.rebuild else None,
        "ratio": args.rebuild_ratio,
        "granularity": None if args.granularity is None else Granularity(args.granularity),
        "retain_reconstruction": True if args.retain_reconstruction else None,
        "reconstruct": None if args.reconstruct is None else Reconstruct(args.reconstruct),
    }
    return _construct(
        RECIPES[args.recipe].settings,
        pattern=pattern,
        sparsity=sparsity,
        **{k: v for k, v in given.items() if v is not None},
        metric=Metric(args.metric),
        magnitude_per_matrix=args.magnitude_scope == "layer",
        device=str(resolve_device(args.device)),
        dtype=getattr(torch, args.dtype),
        batch_size=args.batch_size,
        sample_groups=args.sample_groups,
        allow_tf32=args.allow_tf32,
        reconstruct_damp=args.reconstruct_damp,
        reconstruct_shrink=args.reconstruct_shrink,
        reconstruct_iters=args.reconstruct_iters,
    )


#: PruneSettings field -> the option that sets it, for SettingsError messages.
_OPTION_OF = {
    "sparsity": "--sparsity", "ratio": "--rebuild-ratio", "granularity": "--granularity", "batch_size": "--batch-size",
    "reconstruct_damp": "--reconstruct-damp", "reconstruct_shrink": "--reconstruct-shrink",
    "reconstruct_iters": "--reconstruct-iters", "sample_groups": "--sample-groups",
}


def _construct(cls, **kwargs):
    """`cls(**kwargs)`, a SettingsError reworded with the option's name."""
    from barber.settings import SettingsError

    try:
        return cls(**kwargs)
    except SettingsError as exc:
        raise UsageError(f"{_OPTION_OF.get(exc.field, exc.field)} {exc.detail}") from None


def save_from_args(args: argparse.Namespace):
    """The SaveFormat of the parsed options (checked against the pattern and checkpoint by `prune_and_evaluate`)."""
    import torch

    from barber.packed import SaveFormat

    return SaveFormat(args.save_format, None if args.save_dtype is None else getattr(torch, args.save_dtype))


def budget_from_args(args: argparse.Namespace):
    """The MemoryBudget of the parsed options."""
    from barber.budget import MemoryBudget

    if args.allow_tf32 and not args.device.startswith("cuda"):
        logging.getLogger("barber.cli").warning("--allow-tf32 has no effect on %s", args.device)
    if args.max_gpu_memory is not None and not args.device.startswith("cuda"):
        raise UsageError(f"--max-gpu-memory needs --device cuda (got --device {args.device})")
    return MemoryBudget(
        cpu=args.max_cpu_memory, gpu=args.max_gpu_memory, hidden=args.hidden_states, prefetch=not args.no_prefetch
    )
