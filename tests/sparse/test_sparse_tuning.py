"""Keys of the per-card Triton configuration cache, and its storage."""

from __future__ import annotations

import json

import pytest
import torch

from spamkern.sparse import tables
from spamkern.sparse.tuning import config_key, rows_bucket


@pytest.mark.parametrize(
    "m,bucket", [(1, 16), (16, 16), (17, 32), (64, 64), (65, 128), (4096, 4096)]
)
def test_rows_bucket(m, bucket):
    assert rows_bucket(m) == bucket


def test_config_key_separates_shape_density_dtype():
    base = config_key(300, 4096, 1024, (64, 64), 0.1, torch.float16)
    assert base == config_key(290, 4096, 1024, (64, 64), 0.11, torch.float16)
    assert base != config_key(300, 4096, 1024, (64, 64), 0.5, torch.float16)
    assert base != config_key(300, 4096, 1024, (64, 32), 0.1, torch.float16)
    assert base != config_key(300, 4096, 1024, (64, 64), 0.1, torch.bfloat16)
    assert base != config_key(1000, 4096, 1024, (64, 64), 0.1, torch.float16)


def test_records_persist_per_card_and_user_entries_win():
    card = "Test Card X1"
    tables.record(card, triton_config=("k1", {"BLOCK_M": 64}))
    tables.record(card, triton_config=("k1", {"BLOCK_M": 128}))
    tables.record(card, timing={"op": "bsr_linear", "m": 1})
    path = tables.cache_dir() / f"{tables.card_slug(card)}.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["card"] == card and on_disk["triton_configs"]["k1"] == {"BLOCK_M": 128}
    tables.forget_user_cache()  # a new process reads the file back
    data = tables.load(card)
    assert data["triton_configs"]["k1"]["BLOCK_M"] == 128 and len(data["timings"]) == 1
    assert tables.load("Another Card")["timings"] == []
