"""syncnorm in a Lightning Trainer: ``plugins=[SyncNormLayerSync()]``, on CPU processes or GPUs.

A small CNN on scikit-learn's 8x8 digits (shipped inside the package), 8 images a rank a step. During
``fit`` its BatchNorm2d layers are ``syncnorm.SyncBatchNorm`` (statistics of all ranks' images); after
``fit`` they are BatchNorm2d again, holding the trained running statistics. Rank 0 prints the layer
classes during and after fit, the final training loss and the test accuracy.

    python examples/train_lightning.py                      # 2 CPU processes, strategy="ddp_spawn"
    torchrun --nproc-per-node 2 examples/train_lightning.py --strategy ddp
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from syncnorm.lightning import SyncNormLayerSync


def digits() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 digits as (N, 1, 8, 8) images, split 80/20 in a fixed order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = len(x) * 4 // 5
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


def batchnorm_classes(module: nn.Module) -> str:
    return ", ".join(sorted({type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__}))


class DigitsNet(pl.LightningModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )
        self.batch_size = batch_size
        self.train_set, self.test_set = digits()

    def train_dataloader(self) -> DataLoader:
        # Lightning replaces the sampler with a DistributedSampler: each rank a disjoint share of every epoch.
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def on_train_start(self) -> None:
        if self.global_rank == 0:
            print(f"during fit, on {self.trainer.world_size} ranks: {batchnorm_classes(self)}", flush=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", default="ddp_spawn", choices=["ddp_spawn", "ddp"])
    parser.add_argument("--devices", type=int, default=2, help="processes (CPU) or GPUs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="images a rank a step")
    args = parser.parse_args()

    model = DigitsNet(args.batch_size)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this line
        print(f"before fit: {batchnorm_classes(model)}", flush=True)
    trainer = pl.Trainer(
        accelerator="auto", devices=args.devices, strategy=args.strategy, plugins=[SyncNormLayerSync()],
        max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    if trainer.global_rank == 0:
        model.eval()
        x, y = model.test_set.tensors
        with torch.no_grad():
            accuracy = (model.net(x).argmax(1) == y).float().mean().item()
        print(f"after fit: {batchnorm_classes(model)}")
        print(f"train loss {float(trainer.callback_metrics['train_loss']):.4f}, test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
