"""Index build time, query latency and recall of the piece index (mtrain.evaluation.search_index).

``--synthetic N``: N random unit vectors of ``--dim`` dimensions; the exact index (IndexFlatIP)
and HNSW are both built and queried with ``--queries`` held-out random vectors one at a time
(what a user's query is), and HNSW's recall@10 is counted against the exact answers. Random
vectors have no cluster structure: the hardest case for HNSW's recall (in 128 dimensions every
random vector is nearly as far from a query as its nearest neighbour).

``--like EMBEDDINGS.npy`` (with ``--synthetic N``): the N vectors, and the queries, drawn instead
from a Gaussian mixture fitted (scikit-learn) to real piece embeddings as the index holds them
(unit length, centred, unit length again): a collection shaped like real music's, at a size no
corpus here has.

``--index DIR``: an index written by ``mtrain.embed``; rebuilt from its stored vectors (the
build time) and queried with its own pieces one at a time (each should find itself first).

    python bench/bench_search.py --synthetic 1000000 --dim 96 [--queries 200]
    python bench/bench_search.py --synthetic 1000000 --like runs/embed_out/embeddings.npy
    python bench/bench_search.py --index runs/embed_out
"""

import argparse
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from mtrain.evaluation.search_index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    PieceIndex,
    unit,
)

K = 10
# The mixture's components: about as many as the collections and styles of a corpus.
MIXTURE_COMPONENTS = 32


def latency(index: faiss.Index, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Median milliseconds per single-vector query, and the answers [queries, K]."""
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        _, ids = index.search(q[None], K)
        times.append(time.perf_counter() - started)
        found.append(ids[0])
    return 1e3 * statistics.median(times), np.stack(found)


def random_vectors(n: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((n, dim), dtype=np.float32))
    asked = unit(rng.standard_normal((queries, dim), dtype=np.float32))
    return vectors, asked, "random unit vectors"


def vectors_like(real: Path, n: int, queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    """N vectors and the queries drawn from a Gaussian mixture fitted to ``real`` embeddings
    as PieceIndex prepares them."""
    from sklearn.mixture import GaussianMixture

    pieces = unit(np.load(real))
    prepared = unit(pieces - pieces.mean(axis=0))
    started = time.perf_counter()
    mixture = GaussianMixture(MIXTURE_COMPONENTS, covariance_type="full", random_state=0)
    mixture.fit(prepared)
    drawn, _ = mixture.sample(n + queries)
    drawn = unit(np.random.default_rng(0).permutation(drawn))
    print(
        f"mixture of {MIXTURE_COMPONENTS} Gaussians fitted to {len(pieces)} embeddings of {real} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return drawn[:n], drawn[n:], "vectors drawn from it"


def synthetic(vectors: np.ndarray, asked: np.ndarray, what: str) -> None:
    (n, dim), queries = vectors.shape, len(asked)
    print(f"{n} {what}, dim {dim}, {queries} single-vector queries, k={K}")
    started = time.perf_counter()
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    print(f"exact (IndexFlatIP): build {time.perf_counter() - started:.2f} s", flush=True)
    exact_ms, truth = latency(exact, asked)
    print(f"exact: query {exact_ms:.2f} ms (median)", flush=True)
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw.add(vectors)
    build = time.perf_counter() - started
    print(f"hnsw (M {HNSW_M}, efConstruction {HNSW_EF_CONSTRUCTION}): build {build:.1f} s")
    for ef in (HNSW_EF_SEARCH // 2, HNSW_EF_SEARCH, 2 * HNSW_EF_SEARCH):
        hnsw.hnsw.efSearch = ef
        ms, found = latency(hnsw, asked)
        recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)])
        print(
            f"hnsw efSearch {ef}: query {ms:.3f} ms (median), recall@{K} {recall:.3f}, "
            f"{exact_ms / ms:.0f}x faster than exact",
            flush=True,
        )


def real(directory: Path) -> None:
    index = PieceIndex.load(directory)
    vectors = index.index.reconstruct_n(0, index.index.ntotal)
    started = time.perf_counter()
    again = faiss.IndexFlatIP(index.index.d) if index.kind == "exact" else None
    if again is not None:
        again.add(vectors)
    build = time.perf_counter() - started
    ms, found = latency(index.index, vectors)
    self_first = float(np.mean(found[:, 0] == np.arange(len(vectors))))
    print(
        f"{directory}: {len(vectors)} pieces, dim {index.index.d}, {index.kind}: build "
        f"{build * 1e3:.1f} ms, query {ms:.3f} ms (median), itself first {self_first:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--like", type=Path, help="real embeddings (.npy) to draw vectors like")
    parser.add_argument("--index", type=Path)
    args = parser.parse_args()
    if args.synthetic and args.like:
        synthetic(*vectors_like(args.like, args.synthetic, args.queries))
    elif args.synthetic:
        synthetic(*random_vectors(args.synthetic, args.dim, args.queries))
    if args.index:
        real(args.index)


if __name__ == "__main__":
    main()
