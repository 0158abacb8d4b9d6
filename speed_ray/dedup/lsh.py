"""MinHash-LSH banding: the band layout, band keys, and candidate pairs from rows that share a bucket.

LSH banding for MinHash: Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3.4
(http://www.mmds.org/). The band layout minimizes the same weighted false positive/negative areas as
datasketch's MinHashLSH (`_optimal_param` in datasketch/lsh.py), so both pick the same (bands, rows).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Band id of the pseudo-band whose key is the exact hash: exact duplicates share a bucket like near ones.
EXACT_BAND = -1

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def false_positive_rate(threshold: float, bands: int, rows: int) -> float:
    """Area under P(candidate | Jaccard s) for s < threshold (datasketch's definition)."""
    from scipy.integrate import quad

    return quad(lambda s: 1 - (1 - s ** float(rows)) ** float(bands), 0.0, threshold)[0]


def false_negative_rate(threshold: float, bands: int, rows: int) -> float:
    """Area under P(not candidate | Jaccard s) for s >= threshold (datasketch's definition)."""
    from scipy.integrate import quad

    return quad(lambda s: (1 - s ** float(rows)) ** float(bands), threshold, 1.0)[0]


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                  ) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted error areas."""
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = (false_positive_rate(threshold, b, r) * fp_weight
                   + false_negative_rate(threshold, b, r) * fn_weight)
            if err < best:
                best, opt = err, (b, r)
    return opt


def band_layout(threshold: float, num_perm: int, bands: int | None = None, rows: int | None = None) -> dict:
    """The layout used (configured or optimal) with its estimated false positive / negative rates."""
    if bands is None or rows is None:
        bands, rows = optimal_bands(threshold, num_perm)
    return {"bands": bands, "rows": rows, "num_perm": num_perm, "threshold": threshold,
            "false_positive_rate": false_positive_rate(threshold, bands, rows),
            "false_negative_rate": false_negative_rate(threshold, bands, rows)}


def _mix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _M1
    h = h ^ (h >> np.uint64(33))
    h = h * _M2
    return h ^ (h >> np.uint64(33))


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys: equal keys <=> equal band slices (up to 2^-64 collisions)."""
    n = sigs.shape[0]
    out = np.empty((n, bands), dtype=np.uint64)
    for k in range(bands):
        h = np.full(n, k + 1, dtype=np.uint64) * _GOLD
        for j in range(k * rows, (k + 1) * rows):
            h = _mix64(h ^ sigs[:, j].astype(np.uint64))
        out[:, k] = h
    return out


def bucket_rows(ids: pa.Array, keys: np.ndarray, exact: np.ndarray | None = None,
                keep: np.ndarray | None = None) -> pa.Table:
    """Explode to (band, key, id) rows: one per band per kept document, plus the exact pseudo-band."""
    n, bands = keys.shape
    idx = np.arange(n) if keep is None else np.flatnonzero(keep)
    parts_band, parts_key, parts_idx = [], [], []
    if bands and idx.size:
        parts_band.append(np.repeat(np.arange(bands, dtype=np.int16)[None, :], idx.size, 0).ravel())
        parts_key.append(keys[idx].ravel())
        parts_idx.append(np.repeat(idx, bands))
    if exact is not None and idx.size:
        parts_band.append(np.full(idx.size, EXACT_BAND, dtype=np.int16))
        parts_key.append(exact[idx])
        parts_idx.append(idx)
    if not parts_band:
        return pa.table({"band": pa.array([], pa.int16()), "key": pa.array([], pa.uint64()),
                         "id": pa.array([], ids.type)})
    take = np.concatenate(parts_idx)
    return pa.table({"band": np.concatenate(parts_band), "key": np.concatenate(parts_key),
                     "id": ids.take(pa.array(take))})


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Which bucket partition a key goes to (the shuffle's hash partitioning)."""
    return ((keys >> np.uint64(17)) % np.uint64(num_partitions)).astype(np.int64)


def bucket_edges(rows: pa.Table) -> pa.Table:
    """Candidate pairs (src, dst, exact) from (band, key, id) rows: each bucket links its lowest id to the others.

    A star per bucket gives the same connected components as all pairs, in linear size.
    `exact` is True when the pair shares the exact-hash pseudo-band. Pairs are unique and src < dst.
    """
    empty = pa.table({"src": pa.array([], rows.schema.field("id").type),
                      "dst": pa.array([], rows.schema.field("id").type), "exact": pa.array([], pa.bool_())})
    if rows.num_rows < 2:
        return empty
    order = pc.sort_indices(rows, sort_keys=[("band", "ascending"), ("key", "ascending"), ("id", "ascending")])
    rows = rows.take(order)
    band = rows.column("band").to_numpy()
    key = rows.column("key").to_numpy()
    new_bucket = np.ones(len(band), dtype=bool)
    new_bucket[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1])
    head = np.maximum.accumulate(np.where(new_bucket, np.arange(len(band)), 0))
    member = np.flatnonzero(~new_bucket)
    if member.size == 0:
        return empty
    ids = rows.column("id").combine_chunks()
    src, dst = ids.take(pa.array(head[member])), ids.take(pa.array(member))
    edges = pa.table({"src": src, "dst": dst, "exact": band[member] == EXACT_BAND})
    edges = edges.filter(pc.not_equal(edges.column("src"), edges.column("dst")))  # a re-written row of one doc
    if edges.num_rows == 0:
        return empty
    # One row per pair; exact if any band that linked it was the exact one.
    g = edges.group_by(["src", "dst"]).aggregate([("exact", "any")])
    return pa.table({"src": g.column("src"), "dst": g.column("dst"), "exact": g.column("exact_any")})
