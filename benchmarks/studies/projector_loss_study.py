"""Which normalisation for the projector loss? A small, CPU-only distillation study.

A fixed random teacher (2-layer GELU MLP, n_t = 64 features with offsets and uneven channel
scales) is distilled into a smaller student (n_s = 16) through an ``IndefiniteSubspaceProjector``,
student and projector trained together by Adam, with five candidate losses on (ẑ_s, ẑ_t):

    vkd-native  smooth-L1(D P_s z_s, P_t LN(z_t))        (layer norm in the teacher's coordinates)
    vkd-in-Rn   smooth-L1(D P_s z_s, LN(P_t z_t))        (layer norm after the learned embedding)
    nL1-native  L1(D P_s z_s, P_t LN(z_t))
    nL1-both    L1(LN(ẑ_s), LN(ẑ_t))                      ("normalized L1", both sides in R^n)
    sL1-both    smooth-L1(LN(ẑ_s), LN(ẑ_t))

The score does not depend on the loss: R² of the best linear map from held-out student features
to the teacher's features, i.e. how much of the teacher's representation the student captured
(the best any 16-dim linear function of these teacher features can reach is 0.87, its PCA).

    python benchmarks/studies/projector_loss_study.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradbalance import IndefiniteSubspaceProjector

IN, N_T, N_S, BATCH, LR = 32, 64, 16, 256, 1e-2
CHECKPOINTS = (400, 1500)


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:])


def vkd_native(proj: IndefiniteSubspaceProjector, z_s: Tensor, z_t: Tensor) -> Tensor:
    return proj.loss(z_s, z_t)


def vkd_in_rn(proj: IndefiniteSubspaceProjector, z_s: Tensor, z_t: Tensor) -> Tensor:
    e_s, e_t = proj(z_s, z_t)
    return F.smooth_l1_loss(e_s, _ln(e_t))


def nl1_native(proj: IndefiniteSubspaceProjector, z_s: Tensor, z_t: Tensor) -> Tensor:
    e_s, e_t = proj(z_s, _ln(z_t))
    return F.l1_loss(e_s, e_t)


def nl1_both(proj: IndefiniteSubspaceProjector, z_s: Tensor, z_t: Tensor) -> Tensor:
    e_s, e_t = proj(z_s, z_t)
    return F.l1_loss(_ln(e_s), _ln(e_t))


def sl1_both(proj: IndefiniteSubspaceProjector, z_s: Tensor, z_t: Tensor) -> Tensor:
    e_s, e_t = proj(z_s, z_t)
    return F.smooth_l1_loss(_ln(e_s), _ln(e_t))


LOSSES = {
    "vkd-native": vkd_native,
    "vkd-in-Rn": vkd_in_rn,
    "nL1-native": nl1_native,
    "nL1-both": nl1_both,
    "sL1-both": sl1_both,
}


def make_teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(IN, 128), nn.GELU(), nn.Linear(128, N_T))
    with torch.no_grad():  # realistic features: per-channel offsets and scales spanning 10x
        teacher[2].weight.mul_(torch.logspace(-0.5, 0.5, N_T)[:, None])
        teacher[2].bias.add_(torch.randn(N_T) * 2.0)
    return teacher.requires_grad_(False)


def r_squared(z_s: Tensor, z_t: Tensor) -> float:
    """Fraction of the teacher's (centred) variance explained by a least-squares map from z_s."""
    x = torch.cat([z_s, torch.ones(len(z_s), 1)], dim=1).double()
    y = z_t.double()
    fit = x @ torch.linalg.lstsq(x, y).solution
    return 1.0 - ((y - fit) ** 2).sum().item() / ((y - y.mean(0)) ** 2).sum().item()


def pca_bound(seed: int) -> float:
    """The best R² of any N_S-dim linear function of the teacher's features (top-N_S PCA)."""
    z_t = make_teacher(seed)(torch.randn(4096, IN)).double()
    z_t = z_t - z_t.mean(0)
    eigenvalues = torch.linalg.eigvalsh(z_t.T @ z_t)
    return (eigenvalues[-N_S:].sum() / eigenvalues.sum()).item()


def run(loss_name: str, dim: int, seed: int) -> list[float]:
    """Held-out R² after each of CHECKPOINTS steps of joint student + projector training."""
    teacher = make_teacher(seed)
    torch.manual_seed(seed + 1)
    student = nn.Sequential(nn.Linear(IN, 64), nn.GELU(), nn.Linear(64, N_S))
    proj = IndefiniteSubspaceProjector(N_T, N_S, dim)
    opt = torch.optim.Adam([*student.parameters(), *proj.parameters()], lr=LR)
    x_eval = torch.randn(2048, IN)
    scores = []
    for step in range(1, CHECKPOINTS[-1] + 1):
        x = torch.randn(BATCH, IN)
        loss = LOSSES[loss_name](proj, student(x), teacher(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS:
            with torch.no_grad():
                scores.append(r_squared(student(x_eval), teacher(x_eval)))
    return scores


def main() -> None:
    torch.set_num_threads(1)
    seeds = (0, 1, 2)
    print(f"n_t={N_T} n_s={N_S} batch={BATCH} Adam lr={LR} seeds={seeds}; held-out R², mean (min)")
    print("PCA bound per seed: " + " ".join(f"{pca_bound(seed):.3f}" for seed in seeds))
    print(f"{'loss':<11} {'dim':>4} " + " ".join(f"{f'{c} steps':>15}" for c in CHECKPOINTS))
    for dim in (N_T, 2 * N_T):
        for name in LOSSES:
            runs = [run(name, dim, seed) for seed in seeds]
            cells = []
            for column in zip(*runs, strict=True):
                cells.append(f"{sum(column) / len(column):.3f} ({min(column):.3f})")
            print(f"{name:<11} {dim:>4} " + " ".join(f"{c:>15}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
