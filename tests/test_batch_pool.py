"""Reused batch buffers (``BatchPool``) of the paper-dataset loaders: every batch equals a freshly
allocated one, buffers are reused when nothing refers to them, and a batch the consumer keeps (or a
view of it) is never overwritten, with and without worker processes."""
import pytest
import torch

import equimodal.data.base as base
from equimodal.data import load_dataset
from equimodal.data.base import BatchPool, iterate_batches

from test_avclips import fake_layout


@pytest.fixture
def ks(tmp_path):
    root = tmp_path / "ks"
    clips = [f"c{i}" for i in range(14)]
    fake_layout(root, clips, n_frames=4, size=(48, 36))
    (root / "train.csv").write_text("".join(f"{c},{'ab'[i % 2]}\n" for i, c in enumerate(clips[:12])))
    (root / "test.csv").write_text("c12,a\nc13,b\n")
    return load_dataset("kinetics-sounds", root=str(root), cache_dir=str(tmp_path / "c"), image_size=24,
                        frame_side=30, val_fraction=0.0).train


def expected(ds, epoch, seed, batch=2):
    """The batches of one pass, each allocated afresh by ``dataset[indices]`` (no pool)."""
    ds.set_epoch(epoch)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return [ds[order[s:s + batch].tolist()] for s in range(0, len(ds), batch)]


def same(a, b) -> bool:
    (xa, ya), (xb, yb) = a, b
    return torch.equal(ya, yb) and all(torch.equal(xa[m], xb[m]) for m in ("audio", "visual"))


@pytest.mark.parametrize("workers,persistent", [(0, True), (0, False), (2, True), (2, False)])
def test_streamed_batches_equal_fresh_ones_and_reuse_a_few_buffers(ks, workers, persistent):
    pointers = set()
    for epoch in (0, 1):
        truth = expected(ks, epoch, seed=epoch)
        got = 0
        for k, (x, y) in enumerate(iterate_batches(ks, 2, torch.Generator().manual_seed(epoch), num_workers=workers,
                                                   persistent_workers=persistent)):
            assert same((x, y), truth[k]), (epoch, k)
            pointers.add(x["visual"].data_ptr())
            del x, y  # as a training loop drops each batch
            got += 1
        assert got == len(truth) == 6
    kept = getattr(ks, "_equimodal_loaders", {})
    if persistent:
        assert len(pointers) <= base._pool_slots(workers), "12 batches come from the pool's few buffers"
        assert len(kept) == 1 and next(iter(kept.values()))[2] is not None, "one kept loader, with its pool"
    else:  # a loader per pass: a pool only in-process (worker processes would have to map a new one each pass)
        assert not kept
        if workers == 0:
            assert len(pointers) <= 2 * base._pool_slots(0)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_the_consumer_keeps_are_never_overwritten(ks, workers):
    ks.set_epoch(3)
    truth = expected(ks, 3, seed=5)
    # every batch kept whole; and, separately, only a view of the first one kept
    kept_all = list(iterate_batches(ks, 2, torch.Generator().manual_seed(5), num_workers=workers, persistent_workers=True))
    assert len(kept_all) == len(truth) and all(same(a, b) for a, b in zip(kept_all, truth))
    view = None
    for k, (x, _) in enumerate(iterate_batches(ks, 2, torch.Generator().manual_seed(5), num_workers=workers,
                                               persistent_workers=True)):
        if k == 0:
            view = x["visual"][1, :, 0]  # a view; the batch itself is dropped
    assert torch.equal(view, truth[0][0]["visual"][1, :, 0])


def test_an_abandoned_pass_leaves_the_next_pass_correct(ks):
    """A pass stopped after one batch (tasks still in flight in the workers) then a full pass of
    another epoch: the kept loader drains the old tasks and the pool reclaims their slots."""
    for epoch in (0, 1, 2):
        ks.set_epoch(epoch)
        for _ in iterate_batches(ks, 2, torch.Generator().manual_seed(epoch), num_workers=2, persistent_workers=True):
            break
    truth = expected(ks, 4, seed=4)
    ks.set_epoch(4)
    got = list(iterate_batches(ks, 2, torch.Generator().manual_seed(4), num_workers=2, persistent_workers=True))
    assert all(same(a, b) for a, b in zip(got, truth)) and len(got) == len(truth)
    pool = next(iter(ks._equimodal_loaders.values()))[2]
    assert BatchPool.FILLING not in pool.state


def test_without_storage_use_counts_batches_are_allocated_afresh(ks, monkeypatch):
    monkeypatch.setattr(base, "_storage_use_count", None)
    truth = expected(ks, 0, seed=0)
    ks.set_epoch(0)
    got = list(iterate_batches(ks, 2, torch.Generator().manual_seed(0), num_workers=0, persistent_workers=True))
    assert all(same(a, b) for a, b in zip(got, truth))
    assert not getattr(ks, "_equimodal_loaders", {}), "no pool: nothing worth keeping with 0 workers"


def test_pool_slot_is_free_again_only_when_every_view_is_gone():
    pool = BatchPool({"m": ((3,), torch.float32)}, batch_size=4, slots=1, shared=False)
    k = pool.acquire()
    assert k == 0 and pool.acquire() is None, "the one slot is being filled"
    inputs, labels = pool.lend(k, 2)
    view = inputs["m"][1:]
    del inputs, labels
    assert pool.acquire() is None, "a view of the lent batch is still alive"
    del view
    assert pool.acquire() == 0


def test_kept_workers_without_a_pool_still_see_each_epoch(ks, monkeypatch):
    """No pool (here: no storage use counts; on CUDA: pinned batches): the kept workers get the
    epoch with every batch all the same, so each pass equals fresh batches of its own epoch."""
    monkeypatch.setattr(base, "_storage_use_count", None)
    for epoch in (0, 1, 2):
        truth = expected(ks, epoch, seed=epoch)
        ks.set_epoch(epoch)
        got = list(iterate_batches(ks, 2, torch.Generator().manual_seed(epoch), num_workers=2, persistent_workers=True))
        assert len(got) == len(truth) and all(same(a, b) for a, b in zip(got, truth)), epoch
    (loader, _, pool), = ks._equimodal_loaders.values()
    assert pool is None and loader.persistent_workers, "one kept loader, no pool"
