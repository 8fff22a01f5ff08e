"""syncnorm.lightning.SyncNormLayerSync with a real Lightning Trainer.

The parity test fits a float64 LightningModule with ``Trainer(accelerator="cpu", devices=2,
strategy="ddp_spawn", plugins=[SyncNormLayerSync()])``, each rank given its own half of every global
batch by an explicit sampler (Lightning's own sampler replacement is off, so the split is the one
written here, and each rank records what it saw). The oracle is one process, no Lightning, no syncnorm:
plain torch BatchNorm trained with SGD on the whole batch. After fit, every rank's module holds its
original classes (recorded in the worker after Lightning's teardown reverted the plugin) and its
state_dict and optimizer state equal the oracle's to 1e-10; so does the main process's module, into
which Lightning loads rank 0's weights.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_on_ranks
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

import syncnorm
from syncnorm.lightning import SyncNormLayerSync

WORLD = 2
LOCAL_BATCH = 4
STEPS = 3
TOL = 1e-10


def build_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU(), nn.Linear(6, 2),
    ).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH * STEPS
    x = torch.randn(n, 3, 5, 5, generator=generator, dtype=torch.float64) * 2 + 0.5
    return x, torch.randn(n, 2, generator=generator, dtype=torch.float64)


def make_optimizer(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class Indexed(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = make_data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


class RankHalf(torch.utils.data.Sampler):
    """Global batch k is samples [8k, 8k+8); rank r gets the contiguous half [8k+4r, 8k+4r+4)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        for step in range(STEPS):
            start = step * WORLD * LOCAL_BATCH + self.rank * LOCAL_BATCH
            yield from range(start, start + LOCAL_BATCH)

    def __len__(self) -> int:
        return STEPS * LOCAL_BATCH


class Regressor(pl.LightningModule):
    def __init__(self, report_dir: str) -> None:
        super().__init__()
        self.net = build_net()
        self.report_dir = report_dir
        self.seen: list[list[int]] = []

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(Indexed(), batch_size=LOCAL_BATCH, sampler=RankHalf(self.global_rank))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        index, x, y = batch
        self.seen.append(index.tolist())
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())

    def teardown(self, stage: str) -> None:
        # Runs in each worker after the strategy's teardown, i.e. after the plugin's revert.
        torch.save({
            "state": self.state_dict(),
            "optimizer": self.trainer.optimizers[0].state_dict(),
            "classes": [type(m) for m in self.net],
            "seen": self.seen,
        }, Path(self.report_dir) / f"rank{self.global_rank}.pt")


def train_one_process() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    net = build_net()
    optimizer = make_optimizer(net.parameters())
    x, y = make_data()
    batch = WORLD * LOCAL_BATCH
    for step in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(net(x[step * batch:(step + 1) * batch]), y[step * batch:(step + 1) * batch]).backward()
        optimizer.step()
    return net, optimizer


def trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=WORLD, max_steps=STEPS, use_distributed_sampler=False, precision="64-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kwargs,  # type: ignore[arg-type]
    )


def assert_close_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        torch.testing.assert_close(got[key], want[key], atol=TOL, rtol=0, msg=key)


def test_ddp_spawn_with_the_plugin_trains_what_one_process_trains_on_the_whole_batch(tmp_path: Path) -> None:
    model = Regressor(str(tmp_path))
    classes = [type(m) for m in model.net]
    trainer(tmp_path, strategy="ddp_spawn", plugins=[SyncNormLayerSync()]).fit(model)

    oracle, oracle_optimizer = train_one_process()
    want = {f"net.{key}": value for key, value in oracle.state_dict().items()}
    for rank in range(WORLD):
        report = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        batch = WORLD * LOCAL_BATCH
        assert report["seen"] == [
            list(range(k * batch + rank * LOCAL_BATCH, k * batch + (rank + 1) * LOCAL_BATCH)) for k in range(STEPS)
        ]
        assert report["classes"] == classes, f"rank {rank} does not hold its original classes after fit"
        assert_close_states(report["state"], want)
        got_momentum = report["optimizer"]["state"]
        want_momentum = oracle_optimizer.state_dict()["state"]
        assert got_momentum.keys() == want_momentum.keys()
        for index in want_momentum:
            torch.testing.assert_close(got_momentum[index]["momentum_buffer"], want_momentum[index]["momentum_buffer"],
                                       atol=TOL, rtol=0)
    # Lightning loads rank 0's weights back into the caller's module.
    assert [type(m) for m in model.net] == classes
    assert_close_states(model.state_dict(), want)


def test_sync_batchnorm_flag_and_the_plugin_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="sync_batchnorm=True"):
        trainer(tmp_path, strategy="ddp_spawn", sync_batchnorm=True, plugins=[SyncNormLayerSync()])


def test_revert_gives_back_the_original_classes_and_leaves_syncnorm_layers_built_by_the_user() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3), syncnorm.SyncBatchNorm(3), nn.BatchNorm1d(3))
    plugin = SyncNormLayerSync(exclude=["3"])
    assert plugin.apply(model) is model
    assert [type(m) for m in model] == [syncnorm.SyncBatchNorm, syncnorm.SyncBatchNorm, syncnorm.SyncBatchNorm,
                                        nn.BatchNorm1d]
    assert plugin.revert(model) is model
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.SyncBatchNorm, syncnorm.SyncBatchNorm, nn.BatchNorm1d]


def build_groups() -> None:
    """Stands for a group factory (module-level, so that it pickles)."""


def test_plugin_pickles_with_a_group_factory_and_refuses_a_group_object() -> None:
    plugin = pickle.loads(pickle.dumps(SyncNormLayerSync(build_groups, exclude=["head"])))
    assert plugin.process_group is build_groups and plugin.exclude == ["head"]
    with pytest.raises(TypeError, match="functools.partial"):
        pickle.dumps(SyncNormLayerSync(object()))


def test_plugin_is_a_layer_sync_of_every_installed_lightning_package() -> None:
    flavours = []
    for name in ("pytorch_lightning.plugins", "lightning.pytorch.plugins"):
        try:
            module = __import__(name, fromlist=["LayerSync"])
        except ImportError:
            continue
        flavours.append(name)
        assert isinstance(SyncNormLayerSync(), module.LayerSync), name
    assert flavours, "the test extra installs pytorch-lightning"


def lightning_mesh() -> Any:
    """The mesh Lightning's ModelParallelStrategy builds on 2 ranks without tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))


def data_parallel_mesh() -> Any:
    """A group factory that returns a 1-D sub-mesh (module-level, so that it pickles)."""
    return lightning_mesh()["data_parallel"]


def rank_plugin_with_a_mesh(factory: bool) -> dict[str, Any]:
    """On a Gloo rank: the plugin's apply with a mesh (or a factory of one), DDP training as Lightning's DDP
    strategy runs it on this rank's half of every global batch, then revert."""
    mesh = None if factory else lightning_mesh()
    plugin = SyncNormLayerSync(data_parallel_mesh if factory else mesh)
    net = build_net()
    plugin.apply(net)
    norms = [net[1], net[5]]
    groups = [layer.process_group for layer in norms]
    assert all(g is groups[0] for g in groups)
    if factory:
        assert groups[0] is data_parallel_mesh().get_group()  # the sub-mesh's own group
    else:
        assert groups[0] is not None and groups[0] is not dist.group.WORLD  # one group made for the 2-D mesh
    ranks = dist.get_process_group_ranks(groups[0])
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = make_optimizer(ddp.parameters())
    x, y = make_data()
    for step in range(STEPS):
        mine = slice((step * WORLD + dist.get_rank()) * LOCAL_BATCH, (step * WORLD + dist.get_rank() + 1) * LOCAL_BATCH)
        optimizer.zero_grad()
        F.mse_loss(ddp(x[mine]), y[mine]).backward()
        optimizer.step()
    plugin.revert(net)
    return {"ranks": ranks, "classes": [type(m) for m in net], "state": net.state_dict()}


@pytest.mark.parametrize("factory", [False, True], ids=["2-D-mesh", "factory-of-a-sub-mesh"])
def test_plugin_with_a_device_mesh_trains_what_one_process_trains_on_the_whole_batch(factory: bool) -> None:
    reports = run_on_ranks(WORLD, rank_plugin_with_a_mesh, factory)
    oracle, _ = train_one_process()
    classes = [type(m) for m in build_net()]
    for report in reports:
        assert report["ranks"] == [0, 1]
        assert report["classes"] == classes
        assert_close_states(report["state"], oracle.state_dict())
