"""Command-line entry points. Only this module touches argv, stdout/stderr and logging setup.

- `barber-eval` (`eval_main`): streaming perplexity of a checkpoint (dense or packed) on a text file, and
  with --last-word the zero-shot last-word accuracy (`barber.zeroshot`).
- `barber-stream` (`stream_main`; also `python -m barber.stream`, the form torchrun launches): the pruner;
  it leaves report.md and report.png beside the JSON report (`barber.report_view`) unless --no-report.
- `barber-inspect` (`inspect_main`): checks and describes any output (`barber.inspector`), `--plot` draws one.

`run_cli(body, argv)` is the shared wrapper: it parses nothing itself, runs `body(argv)`, and turns a
`BarberError` into ``error: <one line>`` on stderr plus the error's exit code (never a traceback).
The options of `barber-stream` and what they mean are in `barber.options`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from barber.errors import RESUME_HINT, BarberError, Interrupted, UsageError
from barber.options import (
    DTYPES,
    STOP_SIGNALS,
    ArgumentParser,
    apply_demo,
    budget_from_args,
    resolve_device,
    save_from_args,
    settings_from_args,
    stream_parser,
)


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
    p.add_argument("--last-word", type=int, default=0, metavar="N",
                   help="also the zero-shot last-word accuracy (LAMBADA-style) on the first N paragraphs of --text "
                   "(barber.zeroshot; default 0: off)")
    p.add_argument("--last-word-context", type=int, default=256, metavar="TOKENS",
                   help="context tokens of each last-word item, at most (default 256)")
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
    if args.last_word < 0 or args.last_word_context < 1:
        raise UsageError("--last-word must be >= 0 and --last-word-context >= 1")

    import torch

    from barber.api import read_text
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
    needed = None if args.max_windows is None else args.max_windows * args.seqlen
    ids = tokenizer.encode_prefix(text, needed)
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
    payload = result.to_dict()
    if args.last_word:
        from barber.zeroshot import last_word_accuracy, last_word_items

        items = last_word_items(text, tokenizer.encode, args.last_word, args.last_word_context)
        lw = last_word_accuracy(ckpt, items, device=device, dtype=getattr(torch, args.dtype),
                                batch_size=args.batch_size, progress=not args.no_progress)
        print(f"last-word accuracy {lw.accuracy:.4f} ({lw.correct} of {lw.items} paragraphs, LAMBADA-style, "
              f"at most {args.last_word_context} context tokens)")
        payload["last_word"] = lw.to_dict()
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--json {args.json}: cannot write ({exc.strerror or exc})") from None
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `barber-eval`; returns the exit status."""
    return run_cli(_eval_body, argv)


# ---- barber-stream ------------------------------------------------------------------------------


class GracefulStop:
    """While active, SIGINT and SIGTERM ask the run to stop after the current block.

    Use as a context manager around the run and pass the instance as `should_stop`: calling it
    returns the number of the first signal received, or 0. A second signal raises
    KeyboardInterrupt at once. Handlers are installed only in the main thread, and the previous
    ones are restored on exit.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self, prog: str):
        self.prog = prog
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __call__(self) -> int:
        return self.signum

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write, not print: a handler may run in the middle of another write to stderr
        message = f"\n{self.prog}: {name} received, stopping after the current block (again to stop at once)\n"
        os.write(2, message.encode())

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _stream_body(argv: Sequence[str] | None) -> int:
    args = stream_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.demo:
        apply_demo(args)
    if not args.ckpt or not args.out:
        raise UsageError("barber-stream: --ckpt and --out are required (or --demo)")
    settings_from_args(args)  # bad options fail before joining a process group

    from barber.distributed import World

    world, args.device = World.from_environment(args.device, args.dist_timeout)
    try:
        return _prune_rank(args, world)
    finally:
        world.close()


def _prune_rank(args, world) -> int:
    """barber-stream's work on one rank (the only one without torchrun)."""
    from barber import assets
    from barber.api import Evaluation, prune_and_evaluate
    from barber.checkpoint import Checkpoint
    from barber.output import inspect_output
    from barber.pipeline import Pruner

    settings = settings_from_args(args)
    ckpt = Checkpoint.open(args.ckpt)
    if world.decides:  # before the slow parts
        inspect_output(ckpt.path, Path(args.out), overwrite=args.overwrite, resume=args.resume)
    budget = budget_from_args(args)
    # an impossible budget or more ranks than sample groups, before the slow parts
    Pruner(ckpt, settings, progress=False, budget=budget, world=world).prepare(args.nsamples, args.seqlen)
    evaluation = None
    if args.eval:
        evaluation = Evaluation(args.eval, args.eval_windows, args.eval_seqlen, args.eval_dense)
    with GracefulStop("barber-stream") as stop:
        try:
            prune_and_evaluate(
                ckpt, args.out, settings, Path(args.calib) if args.calib else assets.botchan_path(),
                nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, evaluation=evaluation, budget=budget,
                overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress and world.decides,
                should_stop=stop, state_interval=args.state_interval, save=save_from_args(args), say=print,
                world=world,
            )
            if not args.no_report and world.decides:
                from barber.report_view import write_report_files

                logging.getLogger("barber.cli").info("wrote %s", ", ".join(map(str, write_report_files(args.out))))
        except KeyboardInterrupt:
            signum = stop.signum or signal.SIGINT
            raise Interrupted(
                f"stopped at once by {signal.Signals(signum).name}; the blocks finished before are saved: "
                f"{RESUME_HINT}",
                signum,
            ) from None
    return 0


def stream_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `barber-stream`; returns the exit status."""
    return run_cli(_stream_body, argv)


# ---- barber-inspect -----------------------------------------------------------------------------


def _inspect_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="barber-inspect",
        description="Check and describe a barber output (dense or packed) or any checkpoint barber reads: per-layer "
        "sparsity and N:M validity (every group), bytes on disk against dense, the run's settings and quality. "
        "Exit status 0, 1 when a layer breaks its pattern, 3 for a damaged directory.",
    )
    p.add_argument("dir", help="the output directory")
    p.add_argument("--json", action="store_true", help="print the inspection as JSON")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="also draw the report picture (default: DIR/report.png)")
    p.add_argument("--summary", action="store_true", help="no per-layer lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _inspect_body(argv: Sequence[str] | None) -> int:
    args = _inspect_parser().parse_args(argv)
    setup_logging(args.verbose)
    from barber.inspector import format_text, inspect_output_dir

    ins = inspect_output_dir(args.dir, progress=not args.no_progress)
    if args.plot is not None:
        from barber.layout import REPORT_PNG
        from barber.report_view import plot

        sparsity: dict[str, list] = {}
        for layer in ins.layers:
            if layer.block is not None:
                sparsity.setdefault(layer.name.rsplit(".", 2)[-2], []).append((layer.block, layer.sparsity))
        try:
            plot(Path(args.plot) if args.plot else Path(ins.path) / REPORT_PNG, ins.report,
                 None if ins.report else sparsity, title=f"barber-inspect: {Path(ins.path).name}")
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    print(json.dumps(ins.to_json(), indent=2) if args.json else format_text(ins, layers=not args.summary))
    return 0 if ins.valid else 1


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `barber-inspect`; returns the exit status."""
    return run_cli(_inspect_body, argv)
