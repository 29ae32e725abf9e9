"""Command-line entry points. Only this module touches argv, stdout/stderr and logging setup.

- `barber-eval` (`eval_main`): streaming perplexity of a checkpoint on a text file.

`run_cli(body, argv)` is the shared wrapper: it parses nothing itself, runs `body(argv)`, and turns a
`BarberError` into ``error: <one line>`` on stderr plus the error's exit code (never a traceback).
`ArgumentParser` raises `UsageError` instead of printing usage and exiting.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from barber.errors import BarberError, DataError, UsageError

DTYPES = ("float32", "bfloat16", "float16")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` (one line, exit code 2) instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def run_cli(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI body; a BarberError becomes `error: <message>` on stderr and its exit code."""
    try:
        return body(argv)
    except BarberError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def setup_logging(verbose: int) -> None:
    """WARNING by default, INFO with -v, DEBUG with -vv (stderr)."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def resolve_device(name: str):
    """A torch.device for `name`; cuda without a GPU is a UsageError."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name") from None


def read_text(path: str) -> str:
    """The text of an evaluation file; missing or unreadable is a DataError."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read text ({exc})") from None


def _eval_parser() -> ArgumentParser:
    p = ArgumentParser(prog="barber-eval", description="Streaming perplexity of a Hugging Face checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + safetensors + tokenizer)")
    p.add_argument("--text", required=True, help="UTF-8 evaluation text")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most W windows")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward call (default 1)")
    p.add_argument("--bos", action="store_true", help="prepend one BOS token to the token stream")
    p.add_argument("--json", default=None, help="also write the result and settings to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _eval_body(argv: Sequence[str] | None) -> int:
    args = _eval_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UsageError(f"--max-windows must be at least 1, got {args.max_windows}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")

    import torch

    from barber.checkpoint import Checkpoint
    from barber.evaluate import perplexity
    from barber.tokenizer import load_tokenizer

    device = resolve_device(args.device)
    ckpt = Checkpoint.open(args.ckpt)
    tokenizer = load_tokenizer(ckpt.path)
    text = read_text(args.text)
    bos_id = None
    if args.bos:
        if tokenizer.bos_id is None:
            raise UsageError("--bos: the tokenizer has no BOS token")
        bos_id = tokenizer.bos_id
    ids = tokenizer.encode(text)
    result = perplexity(
        ckpt, ids, seqlen=args.seqlen, max_windows=args.max_windows, device=device,
        dtype=getattr(torch, args.dtype), batch_size=args.batch_size, bos_id=bos_id,
        progress=not args.no_progress,
    )
    result.settings["text"] = str(args.text)
    result.settings["tokenizer"] = str(tokenizer.path)
    bos_note = "BOS prepended" if args.bos else "no BOS prepended"
    print(
        f"perplexity {result.ppl:.4f} (nll {result.nll:.6f}; {result.n_windows} windows of {args.seqlen} tokens, "
        f"{bos_note}, {args.dtype} on {device})"
    )
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--json {args.json}: cannot write ({exc.strerror or exc})") from None
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `barber-eval`; returns the exit status."""
    return run_cli(_eval_body, argv)
