"""Data-parallel runs over torch.distributed (launched by torchrun): `World`, what the ranks exchange.

A run with W ranks splits the calibration samples by `barber.fold.SampleGroups` (group g on rank
g mod W). Every rank keeps only its samples' hidden states and runs the forwards over them; the
statistics reach rank 0 through `barber.fold.Fold` (point-to-point sends, folded in group order:
never a float all_reduce, whose order the backend chooses). Rank 0 decides the masks and the
re-fitted weights and broadcasts them (broadcast copies bits: exact); rank 0 alone touches the
output directory and writes the resume state. So W ranks write the bytes one process writes.

`World.solo()` is the single process (no torch.distributed at all). `World.from_environment` joins
the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo on the
CPU, NCCL with `--device cuda` (each rank on GPU LOCAL_RANK). A peer that dies closes its
connections, and the ranks waiting on it fail at once; a peer that hangs is given up after
`timeout` seconds. Either way a `DistributedError` (one line) ends the rank, torchrun stops the
others, and the same command resumes from the last committed block with any number of ranks.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from barber.errors import RESUME_HINT, DistributedError, UsageError

__all__ = ["DEFAULT_TIMEOUT", "World"]

#: Seconds a rank waits for a peer that neither answers nor dies (--dist-timeout).
DEFAULT_TIMEOUT = 1800.0


def _environment_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


@dataclass
class World:
    """This process's place in a run: `rank` of `size`, and the transport between ranks.

    Attributes:
        rank, size: torch.distributed's rank and world size (0 and 1 for a single process).
        backend: "gloo", "nccl" or None (single process).
        device: where tensors travel from (the rank's GPU for NCCL, else the CPU).
        sent, received: tensor bytes this rank sent and received so far (for the report and the
            benchmark; rank 0's decisions, a few bytes each, are not counted).
    """

    rank: int = 0
    size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sent: int = 0
    received: int = 0

    @classmethod
    def solo(cls) -> "World":
        return cls()

    @classmethod
    def from_environment(cls, device: str, timeout: float = DEFAULT_TIMEOUT) -> tuple["World", str]:
        """Join torchrun's process group if WORLD_SIZE > 1; returns (world, this rank's compute device).

        Raises:
            UsageError: a bad environment, or a CUDA run with fewer local GPUs than ranks on the node.
            DistributedError: the rendezvous failed.
        """
        if _environment_world_size() <= 1:
            return cls.solo(), device
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = torch.device(device).type == "cuda"
        if on_gpu:
            if local >= torch.cuda.device_count():
                raise UsageError(
                    f"--device cuda: local rank {local} needs GPU {local}, this node has {torch.cuda.device_count()}"
                )
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        backend = "nccl" if on_gpu else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
            except (RuntimeError, ValueError) as exc:
                raise DistributedError(f"cannot join the process group ({_short(exc)})") from None
        world = cls(dist.get_rank(), dist.get_world_size(), backend, torch.device(device if on_gpu else "cpu"))
        return world, device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def decides(self) -> bool:
        """Whether this rank decides masks and weights and writes files (rank 0)."""
        return self.rank == 0

    # ---- transport ------------------------------------------------------------------------------

    def _call(self, what: str, peer: int | None, fn, *args) -> None:
        try:
            fn(*args)
        except RuntimeError as exc:  # DistBackendError and DistNetworkError are RuntimeErrors
            who = f"rank {peer}" if peer is not None else "the other ranks"
            raise DistributedError(
                f"rank {self.rank} of {self.size}: lost {who} during {what} ({_short(exc)}); "
                f"the finished blocks are saved: {RESUME_HINT}"
            ) from None

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where the backend can move it (contiguous; on the rank's GPU for NCCL)."""
        t = tensor if tensor.is_contiguous() else tensor.contiguous()
        return t.to(self.device) if self.backend == "nccl" and t.device != self.device else t

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        t = self._staged(tensor)
        self._call("a send", dst, dist.send, t, dst)
        self.sent += t.numel() * t.element_size()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        """Receive into `tensor` (in place)."""
        import torch.distributed as dist

        t = self._staged(tensor)
        self._call("a receive", src, dist.recv, t, src)
        if t is not tensor:
            tensor.copy_(t)
        self.received += t.numel() * t.element_size()

    def broadcast(self, tensor: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (in place elsewhere); returns it. `count`: add it to sent/received."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        t = self._staged(tensor)
        self._call("a broadcast", None, dist.broadcast, t, 0)
        if t is not tensor:
            tensor.copy_(t)
        nbytes = t.numel() * t.element_size() if count else 0
        if self.decides:
            self.sent += nbytes * (self.size - 1)
        else:
            self.received += nbytes
        return tensor

    def share(self, obj: object = None) -> object:
        """Rank 0's `obj` (picklable) on every rank; the others' argument is ignored.

        For rank 0's decisions (start, commit, stop): a few bytes, not counted in sent/received.
        """
        if not self.distributed:
            return obj
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if self.decides else None
        size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
        self.broadcast(size, count=False)
        buf = data if data is not None else torch.empty(int(size[0]), dtype=torch.uint8)
        self.broadcast(buf, count=False)
        return obj if self.decides else pickle.loads(buf.numpy().tobytes())

    def share_weights(self, weights: dict[str, torch.Tensor], names: Iterable[str],
                      like: dict[str, torch.Tensor]) -> None:
        """Rank 0's `weights[name]` for every name, on every rank (stored into `weights` elsewhere).

        `like[name]` has the shape, dtype and device of each weight (the dense weight it replaces).
        """
        if not self.distributed:
            return
        for name in names:
            t = weights[name] if self.decides else torch.empty_like(like[name])
            weights[name] = self.broadcast(t)

    def close(self) -> None:
        """Leave the process group (a single process has none)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _short(exc: BaseException) -> str:
    """The gist of a backend's message: its first sentence, without a source-file prefix, at most 160 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../pair.cc:537] "
    text = re.split(r"\. (?=[A-Z])", text, maxsplit=1)[0]
    return text[:160]
