"""What each Wasserstein estimator reads, at a known population W2^2 (docs/method.md, "W").

Two Gaussian feature batches whose population W2^2 is exactly 1: a mean shift, or an isotropic spread change.
For each feature width d and batch size n, prints each estimator's value divided by the population W2^2
(mean over a few draws), normalize_features off. Ratios only, from one run.

    python benchmarks/wasserstein_scale.py [--dims 4 64 256] [--batches 64 256] [--draws 5]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkd_core.losses import wasserstein_distance  # noqa: E402

logger = logging.getLogger("wasserstein_scale")


def pair(kind: str, n: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "shift":
        mu = torch.zeros(d)
        mu[0] = 1.0
        return 0.3 * torch.randn(n, d, generator=g), 0.3 * torch.randn(n, d, generator=g) + mu
    s2 = 0.3 + d ** -0.5  # d (s2 - s1)^2 = 1
    return 0.3 * torch.randn(n, d, generator=g), s2 * torch.randn(n, d, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 64, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    g = torch.Generator().manual_seed(0)
    logger.info("| d | n | case | sliced | sinkhorn | emd |")
    logger.info("|---:|---:|---|---:|---:|---:|")
    for d in args.dims:
        for n in args.batches:
            for kind in ("shift", "spread"):
                sums = {"sliced": 0.0, "sinkhorn": 0.0, "emd": 0.0}
                for _ in range(args.draws):
                    fs, ft = pair(kind, n, d, g)
                    for method in sums:
                        sums[method] += wasserstein_distance(fs, ft, method, n_projections=256,
                                                             normalize=False).item() / args.draws
                logger.info("| %d | %d | %s | %.2f | %.2f | %.2f |", d, n, kind, sums["sliced"], sums["sinkhorn"],
                            sums["emd"])


if __name__ == "__main__":
    main()
