"""Connected components over candidate pairs, one representative (the lowest id) per cluster.

Union-find as vectorized min-label hooking with pointer jumping (Shiloach & Vishkin, "An O(log n)
parallel connectivity algorithm", 1982), over the ids that appear in pairs only: pairs are far fewer
than documents, so memory follows the duplicates, not N.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def min_labels(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """labels[i] = the smallest node in i's component, for nodes 0..n-1 and undirected edges (src, dst)."""
    lab = np.arange(n, dtype=np.int64)
    if len(src) == 0:
        return lab
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    while True:
        lu, lv = lab[src], lab[dst]
        m = np.minimum(lu, lv)
        new = lab.copy()
        # Hook both current roots onto the smaller one; labels only decrease and stay in the component.
        np.minimum.at(new, lu, m)
        np.minimum.at(new, lv, m)
        while True:  # pointer jumping flattens the trees
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, lab):
            return lab
        lab = new


def clusters(edges: pa.Table) -> pa.Table:
    """From pairs (src, dst, exact) to one row per clustered id: id, dedup_cluster, duplicate_of, removed_reason.

    dedup_cluster is the cluster's lowest id, which is kept (duplicate_of and removed_reason null). A
    removed id is an "exact_duplicate" when an exact copy with a lower id exists (what exact dedup alone
    would drop), else a "near_duplicate".
    """
    id_type = edges.schema.field("src").type
    if edges.num_rows == 0:
        return pa.table({"id": pa.array([], id_type), "dedup_cluster": pa.array([], id_type),
                         "duplicate_of": pa.array([], id_type), "removed_reason": pa.array([], pa.string())})
    src_ids = edges.column("src").combine_chunks()
    dst_ids = edges.column("dst").combine_chunks()
    uniq = pc.unique(pa.concat_arrays([src_ids, dst_ids]))
    uniq = uniq.take(pc.sort_indices(uniq))  # code order = id order, so the smallest code is the lowest id
    src = pc.index_in(src_ids, value_set=uniq).to_numpy()
    dst = pc.index_in(dst_ids, value_set=uniq).to_numpy()
    n = len(uniq)
    lab = min_labels(src, dst, n)
    exact = edges.column("exact").to_numpy(zero_copy_only=False)
    exact_lab = min_labels(src[exact], dst[exact], n)
    codes = np.arange(n)
    is_rep = lab == codes
    reason = np.where(is_rep, None, np.where(exact_lab != codes, "exact_duplicate", "near_duplicate"))
    rep_ids = uniq.take(pa.array(lab))
    return pa.table({"id": uniq, "dedup_cluster": rep_ids,
                     "duplicate_of": pc.if_else(pa.array(is_rep), pa.nulls(n, id_type), rep_ids),
                     "removed_reason": pa.array(reason.tolist(), pa.string())})


def find_duplicates(ids: Sequence, texts: Sequence[str | None], *, num_perm: int = 128, seed: int = 1,
                    ngram: int = 3, bands: int, rows: int, exact: bool = True, near: bool = True,
                    keep: np.ndarray | None = None) -> pa.Table:
    """The whole dedup in one process over a list of documents (tests, benchmark): the same core the stage
    runs distributed. Returns `clusters()` rows for every id in a cluster of two or more."""
    from speed_ray.dedup.lsh import bucket_edges, bucket_rows, band_hashes
    from speed_ray.dedup.minhash import exact_hashes, normalize, signatures

    id_arr = pa.array(ids)
    texts = [normalize(t) for t in texts]
    keys = (band_hashes(signatures(texts, num_perm, seed, ngram, normalized=True), bands, rows) if near
            else np.empty((len(texts), 0), dtype=np.uint64))
    ex = exact_hashes(texts, normalized=True) if exact else None
    rows_t = bucket_rows(id_arr, keys, ex, keep)
    return clusters(bucket_edges(rows_t))
