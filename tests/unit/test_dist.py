"""DDP plumbing (kdseg.dist): the one-process code path (the torchrun runs: e2e/test_ddp.py)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import RandomSampler

from kdseg import dist
from kdseg.data import build_loaders
from kdseg.models import FeatureTaps


def test_shard_sampler_covers_the_split_once_without_padding():
    data = list(range(7))
    shards = [list(dist.ShardSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(dist.ShardSampler(data, num_replicas=2, rank=r)) for r in range(2)] == [4, 3]
    assert list(dist.ShardSampler(data)) == data  # one process: the whole split, in order


def test_one_process_takes_the_distributed_code_path():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert not dist.init("cpu")  # nothing to join without torchrun / a multi-task job
    data = [(torch.full((3, 16, 16), float(i)), torch.zeros(16, 16, dtype=torch.long)) for i in range(10)]
    train, val = build_loaders(data, data[:5], batch_size=2, num_workers=0, seed=3)
    # one process: the plain seeded shuffle (the loader's own generator, saved by checkpoints)
    assert isinstance(train.sampler, RandomSampler) and dist.train_sampler(data, 3) is None
    assert list(val.sampler) == list(range(5))

    def epochs(loader):
        orders = []
        for epoch in (1, 2):
            dist.set_epoch(loader, epoch)  # a no-op here
            orders.append([int(i) for images, _ in loader for i in images[:, 0, 0, 0]])
        return orders

    orders = epochs(train)
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1]  # reshuffled per epoch
    assert epochs(build_loaders(data, data[:5], batch_size=2, num_workers=0, seed=3)[0]) == orders  # reproducibly
    assert dist.all_true(True) and not dist.all_true(False)
    model = nn.Module()
    assert dist.wrap_model(model, torch.device("cpu"), sync_bn=True) is model
    sums = {"loss": torch.tensor(3.0)}
    assert dist.reduce_epoch(sums, {"seen": 4, "void": 1}) == (sums, {"seen": 4, "void": 1})
    with dist.main_first():
        pass


def test_sync_batchnorm_conversion_keeps_feature_taps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    taps = FeatureTaps(model, ["1"])
    model = dist.convert_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm)
    model.eval()
    out = model(torch.randn(2, 3, 8, 8))
    assert taps["1"].shape == (2, 4, 6, 6) and torch.equal(torch.relu(taps["1"]), out)


def test_single_process_block_is_a_world_of_one():
    with dist.single_process():
        assert dist.world_size() == 1 and dist.is_main()


