"""Two processes (gloo): rank 0 builds the sample-order cache while rank 1 waits at the barrier."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from data_fixtures import synthetic_documents, train_tokenizer, write_jsonl

from megakv.config.data import DataConfig
from megakv.data.preprocess import preprocess

SEQ = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: DataConfig, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from megakv.data.loader import build_data, micro_batches

        seen = {}
        waiting = os.path.join(out_dir, "rank1_is_waiting")

        def barrier() -> None:
            seen["cache_at_entry"] = len(os.listdir(cfg.cache_dir)) if os.path.isdir(cfg.cache_dir) else 0
            if rank == 1:
                open(waiting, "w").close()
            start = time.time()
            dist.barrier()
            seen["waited"] = time.time() - start

        if rank == 0:  # start building only once rank 1 sits in the barrier, then build slowly
            while not os.path.exists(waiting):
                time.sleep(0.05)
            time.sleep(0.5)
        data = build_data(cfg, SEQ, is_builder=rank == 0, barrier=barrier, train_samples=400)
        batches = micro_batches(data.train, 40, 8, 2, rank, world)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), built=data.built_cache_entries,
                 fingerprint=data.fingerprint, waited=seen["waited"], cache_at_entry=seen["cache_at_entry"],
                 inputs=np.concatenate([x.numpy() for x, _ in batches]), first=data.train[0],
                 cache_files=len(os.listdir(cfg.cache_dir)))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.distributed
def test_one_rank_builds_the_cache_while_the_other_waits(tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tok")
    jsonl = write_jsonl(tmp_path / "raw" / "c.jsonl", synthetic_documents(80, seed=4))
    preprocess([str(jsonl)], tokenizer, tmp_path / "data" / "c", progress=False)
    cfg = DataConfig(datasets=[str(tmp_path / "data" / "c")], cache_dir=str(tmp_path / "cache"),
                     valid_fraction=0.1)
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(out)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (np.load(out / f"rank{r}.npz") for r in range(2))
    assert int(r0["built"]) > 0 and int(r1["built"]) == 0  # only the builder built
    assert int(r1["cache_files"]) == int(r0["cache_files"]) > 0  # the waiter found it complete
    assert str(r0["fingerprint"]) == str(r1["fingerprint"])
    assert np.array_equal(r0["first"], r1["first"])
    assert int(r1["cache_at_entry"]) == 0 and float(r1["waited"]) > 0.4  # it waited for the whole build

    from megakv.data.loader import build_data, micro_batches

    single = build_data(cfg, SEQ, is_builder=False)  # one process sees the same step as both ranks together
    whole = np.concatenate([x.numpy() for x, _ in micro_batches(single.train, 40, 8, 2, 0, 1)])
    assert np.array_equal(np.concatenate([r0["inputs"], r1["inputs"]]), whole)
