"""DataLoader workers started inside a Prefect flow run (the DataLoader path on a GPU worker).

Workers forked from a process that runs a flow inherit Prefect's threads and exit handlers and die with exit
code 1 when shut down; the loader starts them from a forkserver instead, so shutting down is clean.
"""

from __future__ import annotations

import torch

from gkd_core.data import TorchLoader


def test_torch_loader_workers_shut_down_cleanly_inside_a_flow(prefect_harness: None) -> None:
    from prefect import flow

    @flow(name="loader-workers")
    def two_epochs() -> list[int]:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g)
        loader = TorchLoader(x, torch.arange(24) % 3, torch.zeros(1), torch.ones(1), batch_size=8, shuffle=True,
                             augment=True, crop_padding=1, hflip=True, num_workers=2)
        sizes = [len(xb) for _ in range(2) for xb, _ in loader]
        workers = list(loader._loader._iterator._workers)
        loader.close()  # raised "DataLoader worker ... exited unexpectedly with exit code 1" with forked workers
        return sizes + [w.exitcode for w in workers]

    assert two_epochs() == [8, 8, 8, 8, 8, 8, 0, 0]
