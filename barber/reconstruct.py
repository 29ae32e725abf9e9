"""Re-fitting the kept weights on the final mask (docs/algorithm.md §9, "Weight reconstruction").

For one linear with dense weight W_d [out, in] and kept mask M, the re-fit solves, row by row,

    min over w_r supported on K_r of  sum_t (w_r . x_t - y_rt)^2 + lam * ||w_r - w_d,r||^2

where x_t are the linear's calibration inputs on the sparse trajectory, y_t its targets and
lam = damp * mean(diag(H)). With H = sum_t x_t x_t^T and B = sum_t y_t x_t^T (order-fixed sums
over samples, `barber.fold`, so any number of ranks gives the same bits) the normal equations of
row r are

    (H + lam I)[K_r, K_r] w = (B + lam W_d)[r, K_r].

Two ways to choose the inputs and targets (`Reconstruct`):

- ``layer``: the inputs the statistics pass recorded (the dense block on the sparse trajectory)
  and the dense layer's outputs on them, so B = W_d H: no extra pass over the data.
- ``subblock``: linear group by linear group through the sub-block (q/k/v then o; gate/up then
  down): a group's inputs come from the already re-fitted groups before it, and its targets are
  the dense sub-block's values at that point (the dense linear applied to the dense sub-block's
  input for it). The sub-block's output is thus fitted to the dense sub-block's output.

Before solving, H is shrunk towards its diagonal, H <- (1 - g) H + g diag(H), and B likewise
(`reconstruct_shrink` g, default 0.25): a few thousand calibration tokens estimate the off-diagonal
entries poorly, and the unshrunk solution over-fits them (docs/algorithm.md §9.1).

Pruned entries stay exactly +0.0 and the masks never change. The solver is conjugate gradients on
all rows at once, preconditioned by diag(H + lam I) and projected onto each row's kept set: one
[out, in] x [in, in] matmul per iteration, at most `reconstruct_iters` of them.
`exact_masked_lstsq` solves every row directly (for tests and for measuring the solver).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from barber import prune
from barber.fold import Chunk
from barber.model import Positions, SubBlock
from barber.settings import PruneSettings, Reconstruct
from barber.timing import phase

__all__ = ["exact_masked_lstsq", "masked_pcg", "plan_bytes", "refit_subblock", "stages"]

Tensors = dict[str, torch.Tensor]
#: Relative residual at which a row's conjugate gradients stop.
TOLERANCE = 1e-5


def stages(sub: SubBlock) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The sub-block's linear groups in data order: those sharing the sub-block input, then the output one."""
    return sub.names[:-1], sub.names[-1:]


def damped(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """(H + lam I, lam) with lam = damp * mean(diag(H)) (lam > 0 unless H or damp is 0)."""
    lam = damp * float(torch.diagonal(hessian).mean())
    return hessian + lam * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device), lam


def masked_pcg(
    hessian: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, iters: int,
    tol: float = TOLERANCE,
) -> torch.Tensor:
    """Solve (H w_r)[K_r] = rhs[r, K_r] for every row r with w_r zero outside K_r (K_r = mask[r]).

    Jacobi-preconditioned conjugate gradients, all rows at once (float32): each row has its own
    step sizes and stops when its residual falls below `tol` of its right-hand side. `hessian`
    must be symmetric positive definite on every kept set (damped). Returns the solution [out, in].
    """
    m = mask.float()
    w = start.float() * m
    inv_diag = (1.0 / torch.diagonal(hessian)).unsqueeze(0) * m
    r = (rhs.float() - w @ hessian) * m
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1)
    stop = tol * tol * (rhs.float() * rhs.float() * m).sum(1).clamp_min(1e-30)
    for _ in range(iters):
        active = (r * r).sum(1) > stop
        if not bool(active.any()):
            break
        hp = (p @ hessian) * m
        php = (p * hp).sum(1)
        alpha = torch.where(active & (php > 0), rz / php.clamp_min(1e-30), torch.zeros_like(rz))
        w.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), hp, value=-1.0)
        z = r * inv_diag
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
    return w


def exact_masked_lstsq(hessian: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same systems as `masked_pcg`, solved row by row in float64 (rows grouped by kept count)."""
    out = torch.zeros(rhs.shape, dtype=torch.float64, device=rhs.device)
    h, b = hessian.double(), rhs.double()
    counts = mask.sum(1)
    for k in counts.unique().tolist():
        rows = (counts == k).nonzero().squeeze(1)
        if k == 0:
            continue
        idx = mask[rows].float().argsort(dim=1, descending=True, stable=True)[:, :k]  # kept columns of each row
        sub = h[idx.unsqueeze(2), idx.unsqueeze(1)]  # [R, k, k]
        sol = torch.linalg.solve(sub, b[rows.unsqueeze(1), idx].unsqueeze(2)).squeeze(2)
        out[rows.unsqueeze(1), idx] = sol
    return out


def shrunk(matrix: torch.Tensor, diagonal: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) * matrix + shrink * diag(diagonal): a second-moment estimate pulled towards its diagonal."""
    if shrink == 0:
        return matrix
    return (1 - shrink) * matrix + torch.diag(shrink * diagonal)


def _refit(
    weight_dense: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
    cross: torch.Tensor, cross_diag: torch.Tensor, settings: PruneSettings,
) -> torch.Tensor:
    """The re-fitted weight (compute dtype, pruned entries +0.0), from H, B and the diagonal of X_d^T X_s.

    H and the cross moments are shrunk towards their diagonals by `reconstruct_shrink` (§9.1): at 1 the
    re-fit returns the dense values (a diagonal H couples no columns), at 0 it trusts the calibration
    windows' correlations fully.
    """
    wd, shrink = weight_dense.float(), settings.reconstruct_shrink
    hd, lam = damped(shrunk(hessian, torch.diagonal(hessian), shrink), settings.reconstruct_damp)
    rhs = (1 - shrink) * cross + wd * (shrink * cross_diag).unsqueeze(0) + lam * wd
    solved = masked_pcg(hd, rhs, current, mask, settings.reconstruct_iters)
    return prune.apply_mask(solved.to(current.dtype), mask)


def _objective(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, target_sq: float) -> float:
    """sum_t ||w x_t - y_t||^2 = tr(W H W^T) - 2 tr(W B^T) + sum_t ||y_t||^2, from the statistics."""
    w = w.float()
    return float(((w @ hessian) * w).sum() - 2 * (w * cross).sum()) + target_sq


def _inputs(states, sub: SubBlock, weights: Tensors, dense: Tensors, pos: Positions, group: tuple[str, ...]
            ) -> Iterator[tuple[Chunk, torch.Tensor, torch.Tensor]]:
    """(micro-batch, sparse input, dense input) of `group` for every micro-batch, [B, T, in] float32."""
    hidden = states.trajectory
    first = stages(sub)[0]
    with torch.no_grad():
        for c in states.chunks():
            x = sub.input(hidden.get(c.rows), weights)
            if group == first:  # the sub-block's input: the same for the sparse and the dense sub-block
                x = x.float()
                yield c, x, x
                continue
            yield c, _recorded(sub, x, weights, pos, group[0]), _recorded(sub, x, dense, pos, group[0])


def _recorded(sub: SubBlock, x: torch.Tensor, w: Tensors, pos: Positions, name: str) -> torch.Tensor:
    """The input of linear `name` when the sub-block core runs on `x` with weights `w`, as [B, T, in] float32."""
    seen: list[torch.Tensor] = []

    def linear(n: str, xin: torch.Tensor) -> torch.Tensor:
        if n == name:
            seen.append(xin)
        return F.linear(xin, w[n + ".weight"], w.get(n + ".bias"))

    sub.core(x, w, pos, linear)
    return seen[0].reshape(x.shape[0], -1, seen[0].shape[-1]).float()


def _group_statistics(states, sub, weights, dense, pos, group) -> tuple | None:
    """H = sum X_s^T X_s of the group's input, diag(sum X_d^T X_s), and per linear B = sum Y_d^T X_s
    and sum ||Y_d||^2 (for the sub-block's first group X_d = X_s, so B = W_d H, without the outputs).

    Every sum is order-fixed (`barber.fold`), one sample at a time; the result exists on rank 0
    (None on other ranks).
    """
    first = group == stages(sub)[0]
    hessian = states.fold()
    if not first:
        cross_diag = states.fold()
        cross, target_sq = {n: states.fold() for n in group}, {n: states.fold() for n in group}
    for c, xs, xd in _inputs(states, sub, weights, dense, pos, group):
        for j, s in enumerate(c.samples):
            a = xs[j].reshape(-1, xs.shape[-1])
            hessian.addmm(s, a.T, a)
            if first:
                continue
            b = xd[j].reshape(-1, xd.shape[-1])
            cross_diag.add(s, (b.double() * a.double()).sum(0))
            for n in group:
                y = b @ dense[n + ".weight"].float().T
                cross[n].addmm(s, y.T, a)
                target_sq[n].add(s, (y.double() * y.double()).sum())
    hessian = hessian.result()
    if first:
        if hessian is None:
            return None
        cross = {n: dense[n + ".weight"].float() @ hessian for n in group}
        target_sq = {n: float((cross[n] * dense[n + ".weight"].float()).sum()) for n in group}
        return hessian, torch.diagonal(hessian), cross, target_sq
    cross_diag = cross_diag.result()
    cross = {n: f.result() for n, f in cross.items()}
    target_sq = {n: f.result() for n, f in target_sq.items()}
    if hessian is None:
        return None
    return hessian, cross_diag.float(), cross, {n: float(t) for n, t in target_sq.items()}


def refit_subblock(
    sub: SubBlock, dense: Tensors, weights: Tensors, masks: Tensors, stats, states, pos: Positions,
    times: dict[str, float] | None = None,
) -> dict | None:
    """Re-fit every linear of `sub` in `weights` (in place) on its mask; returns the fit errors.

    The report gives, per linear, the calibration error sum_t ||w x_t - y_t||^2 relative to
    sum_t ||y_t||^2 before and after the re-fit (on that linear's own inputs and targets).
    `stats` (with X^T X) is used, and its Hessians dropped, in ``layer`` mode. Rank 0 solves and
    broadcasts each group's weights before the next group's statistics; other ranks return None.
    The solves' seconds (rank 0's alone) are added to `times["solve"]`.
    """
    settings, world = states.settings, states.world
    errors, times = {}, {} if times is None else times
    if settings.reconstruct is Reconstruct.LAYER:
        with phase(times, "solve"):
            if world.decides:
                for n in sub.names:
                    hessian = stats.xtx.pop(n)
                    wd = dense[n + ".weight"].float()
                    cross = wd @ hessian
                    target_sq = float((cross * wd).sum())
                    diag = torch.diagonal(hessian)
                    errors[n] = _refit_one(n, dense, weights, masks, hessian, diag, cross, target_sq, settings)
        world.share_weights(weights, [n + ".weight" for n in sub.names], dense)
        return {"relative_error": errors} if world.decides else None
    for group in stages(sub):
        statistics = _group_statistics(states, sub, weights, dense, pos, group)
        if statistics is not None:
            with phase(times, "solve"):
                hessian, cross_diag, cross, target_sq = statistics
                for n in group:
                    errors[n] = _refit_one(
                        n, dense, weights, masks, hessian, cross_diag, cross.pop(n), target_sq[n], settings
                    )
                del hessian, statistics
        world.share_weights(weights, [n + ".weight" for n in group], dense)
    return {"relative_error": errors} if world.decides else None


def _refit_one(n, dense, weights, masks, hessian, cross_diag, cross, target_sq, settings) -> list[float]:
    """Re-fit linear `n` in `weights`; returns [relative error before, after] on the calibration windows."""
    key = n + ".weight"
    scale = max(target_sq, 1e-30)
    before = _objective(weights[key], hessian, cross, target_sq) / scale
    weights[key] = _refit(dense[key], weights[key], masks[n], hessian, cross, cross_diag, settings)
    after = _objective(weights[key], hessian, cross, target_sq) / scale
    return [before, after]


def plan_bytes(block_shapes: dict[str, tuple[int, ...]], linears: tuple[str, ...], settings: PruneSettings) -> int:
    """Bytes the re-fit holds at its peak on the compute device, beyond the block's weights.

    ``layer``: one float32 X^T X per linear for the whole block (the statistics pass keeps them).
    Both: while one linear is solved, its group's H and B, the damped H, and the solver's five
    [out, in] float32 tensors (solution, residual, preconditioned residual, direction, H times it).
    """
    if settings.reconstruct is Reconstruct.NONE:
        return 0
    shapes = {n: block_shapes[n + ".weight"] for n in linears}
    held = sum(4 * i * i for _, i in shapes.values()) if settings.reconstruct is Reconstruct.LAYER else 0
    solve = max(4 * (2 * i * i + 2 * o * i) + 5 * 4 * o * i for o, i in shapes.values())
    return held + solve
