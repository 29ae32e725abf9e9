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
  input for it). The sub-block's output is thus fitted to the dense sub-block's output. The groups
  come in stages (`SubBlock.stages`): a mixture of experts has one group per expert in each stage
  (each expert's gate/up on its routed tokens, then each down), and a stage's sums are gathered in
  one pass over the data.

A linear that no calibration token reached (H = 0: an expert no token chose) is not re-fitted.

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

__all__ = ["exact_masked_lstsq", "masked_pcg", "plan_bytes", "refit_subblock"]

Tensors = dict[str, torch.Tensor]
#: Relative residual at which a row's conjugate gradients stop.
TOLERANCE = 1e-5


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


def _inputs(states, sub: SubBlock, weights: Tensors, dense: Tensors, pos: Positions, stage: int
            ) -> Iterator[tuple[Chunk, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(micro-batch, sparse inputs, dense inputs) of every group of stage `stage` (keyed by the group's
    first linear, [B, T', in] float32) for every micro-batch."""
    hidden = states.trajectory
    firsts = [g[0] for g in sub.stages[stage]]
    with torch.no_grad():
        for c in states.chunks():
            x = sub.input(hidden.get(c.rows), weights)
            if stage == 0 and not sub.fixed:  # the sub-block's input itself: one group reads it
                x = x.float()
                yield c, {firsts[0]: x}, {firsts[0]: x}
                continue
            xs = _recorded(sub, x, weights, pos, firsts)
            # Stage 0 of a mixture of experts: the routing depends on the sub-block input alone, so the
            # dense experts see the same tokens as the sparse ones.
            yield c, xs, (xs if stage == 0 else _recorded(sub, x, dense, pos, firsts))


def _recorded(sub: SubBlock, x: torch.Tensor, w: Tensors, pos: Positions, names: list[str]) -> dict:
    """The inputs of linears `names` when the sub-block core runs on `x` with weights `w`, [B, T', in] float32."""
    seen: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def linear(n: str, xin: torch.Tensor) -> torch.Tensor:
        if n in wanted:
            seen[n] = xin.reshape(xin.shape[0], -1, xin.shape[-1]).float()
        return F.linear(xin, w[n + ".weight"], w.get(n + ".bias"))

    sub.core(x, w, pos, linear)
    return seen


class _GroupSums:
    """The order-fixed sums of one group of linears that read one input (see `_stage_sums`)."""

    def __init__(self, states, group: tuple[str, ...], first: bool):
        self.group, self.first = group, first
        self.hessian = states.fold()
        if not first:
            self.cross_diag = states.fold()
            self.cross = {n: states.fold() for n in group}
            self.target_sq = {n: states.fold() for n in group}

    def add(self, s: int, a: torch.Tensor, b: torch.Tensor, dense: Tensors) -> None:
        """Sample s's terms, from its sparse input a and dense input b, [tokens, in] float32."""
        self.hessian.addmm(s, a.T, a)
        if self.first:
            return
        self.cross_diag.add(s, (b.double() * a.double()).sum(0))
        for n in self.group:
            y = b @ dense[n + ".weight"].float().T
            self.cross[n].addmm(s, y.T, a)
            self.target_sq[n].add(s, (y.double() * y.double()).sum())

    def result(self, dense: Tensors) -> tuple | None:
        """(H, diag(X_d^T X_s), B per linear, sum ||Y_d||^2 per linear) on rank 0; None on other ranks."""
        hessian = self.hessian.result()
        if self.first:
            if hessian is None:
                return None
            cross = {n: dense[n + ".weight"].float() @ hessian for n in self.group}
            target_sq = {n: float((cross[n] * dense[n + ".weight"].float()).sum()) for n in self.group}
            return hessian, torch.diagonal(hessian), cross, target_sq
        cross_diag = self.cross_diag.result()
        cross = {n: f.result() for n, f in self.cross.items()}
        target_sq = {n: f.result() for n, f in self.target_sq.items()}
        if hessian is None:
            return None
        return hessian, cross_diag.float(), cross, {n: float(t) for n, t in target_sq.items()}


def _stage_sums(states, sub, weights, dense, pos, stage: int) -> dict[tuple[str, ...], _GroupSums]:
    """Per group of stage `stage`, its open sums (`_GroupSums.result` closes them, one group at a time):
    H = sum X_s^T X_s of the group's input, diag(sum X_d^T X_s), and per linear B = sum Y_d^T X_s and
    sum ||Y_d||^2 (in stage 0 X_d = X_s, so B = W_d H, without the outputs).

    Every sum is order-fixed (`barber.fold`), one sample at a time.
    """
    sums = {g: _GroupSums(states, g, stage == 0) for g in sub.stages[stage]}
    for c, xs, xd in _inputs(states, sub, weights, dense, pos, stage):
        for g, group_sums in sums.items():
            a_all, b_all = xs[g[0]], xd[g[0]]
            for j, s in enumerate(c.samples):
                a = a_all[j].reshape(-1, a_all.shape[-1])
                group_sums.add(s, a, b_all[j].reshape(-1, b_all.shape[-1]), dense)
    return sums


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
                    if not bool(hessian.any()):  # no calibration token reached it (an unchosen expert)
                        continue
                    wd = dense[n + ".weight"].float()
                    cross = wd @ hessian
                    target_sq = float((cross * wd).sum())
                    diag = torch.diagonal(hessian)
                    errors[n] = _refit_one(n, dense, weights, masks, hessian, diag, cross, target_sq, settings)
        world.share_weights(weights, [n + ".weight" for n in sub.names], dense)
        return {"relative_error": errors} if world.decides else None
    for stage in range(len(sub.stages)):
        sums = _stage_sums(states, sub, weights, dense, pos, stage)
        with phase(times, "solve"):
            for group in sub.stages[stage]:  # closed one group at a time, in the same order on every rank
                group_stats = sums.pop(group).result(dense)
                if group_stats is None:  # another rank's
                    continue
                hessian, cross_diag, cross, target_sq = group_stats
                if not bool(hessian.any()):  # no calibration token reached the group (an unchosen expert)
                    continue
                for n in group:
                    errors[n] = _refit_one(
                        n, dense, weights, masks, hessian, cross_diag, cross.pop(n), target_sq[n], settings
                    )
                del group_stats, hessian, cross
        world.share_weights(weights, [n + ".weight" for g in sub.stages[stage] for n in g], dense)
    return {"relative_error": errors} if world.decides else None


def _refit_one(n, dense, weights, masks, hessian, cross_diag, cross, target_sq, settings) -> list[float]:
    """Re-fit linear `n` in `weights`; returns [relative error before, after] on the calibration windows."""
    key = n + ".weight"
    scale = max(target_sq, 1e-30)
    before = _objective(weights[key], hessian, cross, target_sq) / scale
    weights[key] = _refit(dense[key], weights[key], masks[n], hessian, cross, cross_diag, settings)
    after = _objective(weights[key], hessian, cross, target_sq) / scale
    return [before, after]


def plan_bytes(block_shapes: dict[str, tuple[int, ...]], subblocks, settings: PruneSettings) -> int:
    """Bytes the re-fit holds at its peak on the compute device, beyond the block's weights.

    `subblocks`: the `SubBlock.stages` of each of the block's sub-blocks.
    ``layer``: one float32 X^T X per linear for the whole block (the statistics pass keeps them).
    ``subblock``: a stage's sums of every group at once: H and its group partial per group, and after
    the first stage B and its partial per linear; then one group's results at a time (the first
    stage's B = W_d H for the group's linears).
    Both: while one linear is solved, the shrunk and the damped H, its B, right-hand side and float32
    dense weight, and the solver's five [out, in] float32 tensors (solution, residual, preconditioned
    residual, direction, H times it).
    """
    if settings.reconstruct is Reconstruct.NONE:
        return 0
    groups = [g for sub_stages in subblocks for stage in sub_stages for g in stage]
    shapes = {n: block_shapes[n + ".weight"] for g in groups for n in g}
    solve = max(2 * 4 * i * i + 8 * 4 * o * i for o, i in shapes.values())
    if settings.reconstruct is Reconstruct.LAYER:
        return sum(4 * i * i for _, i in shapes.values()) + solve
    cross = {g: sum(4 * shapes[n][0] * shapes[n][1] for n in g) for g in groups}  # B of a group's linears
    held = 0
    for sub_stages in subblocks:
        for k, stage in enumerate(sub_stages):
            hessians = sum(2 * 4 * shapes[g[0]][1] ** 2 for g in stage)
            crosses = max(cross[g] for g in stage) if k == 0 else sum(2 * cross[g] for g in stage)
            held = max(held, hessians + crosses)
    return held + solve
