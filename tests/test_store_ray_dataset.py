"""StageOutput.ray_dataset: a stage's shards as a Ray Dataset, listed by a footer-reader pool sized to the shards."""

from __future__ import annotations

import os

import pytest

from speed_ray import store
from speed_ray.store import FOOTER_ACTORS_ENV, RunStore, footer_actors


def test_footer_actors_one_per_hundred_files_between_1_and_32():
    assert [footer_actors(n) for n in (0, 1, 10, 100, 101, 250, 3200, 3201, 10**6)] == [1, 1, 1, 1, 2, 3, 32, 32, 32]


@pytest.fixture
def indexer_pools(monkeypatch):
    """The actor count of every FooterFileIndexer that Ray Data builds (what its footer listing will start)."""
    from ray.data._internal.datasource_v2.formats.parquet import footer_file_indexer as ffi

    seen: list[int] = []
    init = ffi.FooterFileIndexer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self._num_actors)

    monkeypatch.setattr(ffi.FooterFileIndexer, "__init__", recording_init)
    return seen


def _stage(tmp_path, shards: int):
    out = RunStore(str(tmp_path)).stage("s", "fp")
    for i in range(shards):
        out.write_shard(f"{i:05d}", {"id": [f"{i}-{j}" for j in range(3)], "x": [j for j in range(3)]})
    return out


def test_a_small_stage_is_listed_by_one_footer_reader_and_reads_every_row(ray_local, tmp_path, indexer_pools,
                                                                        monkeypatch):
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    out = _stage(tmp_path, 12)
    ds = out.ray_dataset()
    assert indexer_pools == [1]                   # Ray's default: 32 actors for these 12 files
    assert FOOTER_ACTORS_ENV not in os.environ    # the driver's environment is left as it was
    assert sorted(r["id"] for r in ds.take_all()) == sorted(f"{i}-{j}" for i in range(12) for j in range(3))


def test_a_large_stage_gets_more_footer_readers(ray_local, tmp_path, indexer_pools, monkeypatch):
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.setattr(store, "FILES_PER_FOOTER_ACTOR", 4)
    _stage(tmp_path, 10).ray_dataset()
    assert indexer_pools == [3]


def test_the_users_own_footer_setting_wins(ray_local, tmp_path, indexer_pools, monkeypatch):
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "7")
    _stage(tmp_path, 2).ray_dataset()
    assert indexer_pools == [7]
    assert os.environ[FOOTER_ACTORS_ENV] == "7"
