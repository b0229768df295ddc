"""Nearest-code search and k-means, chunked so that neither the token count nor the codebook size
ever materialises a full (tokens x codes) distance matrix."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

# CPU: 512 x 2048 fp32 = 4 MiB of partial distances per chunk (fastest of a sweep on 2 threads at 16k
# and 100k codes: the min pass reads the block while it is still in cache). GPU: 4096 x 16384 =
# 256 MiB, few enough chunks that kernel launches do not dominate.
CPU_CHUNKS = (512, 2048)
GPU_CHUNKS = (4096, 16384)
DEFAULT_TOKEN_CHUNK = None  # None: pick by device
DEFAULT_CODE_CHUNK = None


def default_chunks(device: torch.device) -> tuple[int, int]:
    return CPU_CHUNKS if device.type == "cpu" else GPU_CHUNKS


@torch.no_grad()
def nearest_codes(
    z: torch.Tensor,
    codes: torch.Tensor,
    token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
    code_chunk: int | None = DEFAULT_CODE_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_k ||z_i - c_k||^2 for every row of ``z`` (N, d) against ``codes`` (K, d).

    Uses ||z||^2 - 2 z.c + ||c||^2 (one matmul per chunk) and keeps a running minimum over code
    chunks, so peak extra memory is ``token_chunk * code_chunk`` floats. Ties go to the lowest index.
    Returns (indices int64 (N,), squared distances (N,)).
    """
    if z.ndim != 2 or codes.ndim != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"nearest_codes: need z (N, d) and codes (K, d), got {tuple(z.shape)} and {tuple(codes.shape)}")
    auto_tokens, auto_codes = default_chunks(z.device)
    token_chunk = token_chunk or auto_tokens
    code_chunk = code_chunk or auto_codes
    if token_chunk < 1 or code_chunk < 1:
        raise ValueError(f"nearest_codes: token_chunk and code_chunk must be >= 1, got {token_chunk}, {code_chunk}")
    z = z.float()
    codes = codes.float()
    num_tokens, num_codes = z.shape[0], codes.shape[0]
    # one matmul gives ||c||^2 - 2 z.c: append a ones column to z and ||c||^2 to -2c (no bias copy,
    # no extra pass); the ||z||^2 term is constant per row and only added to the returned distance
    codes_aug = torch.cat([codes * -2.0, codes.pow(2).sum(1, keepdim=True)], dim=1)
    z_aug = torch.cat([z, torch.ones(num_tokens, 1, device=z.device)], dim=1)
    best_index = torch.empty(num_tokens, dtype=torch.int64, device=z.device)
    best_dist = torch.empty(num_tokens, dtype=torch.float32, device=z.device)
    for t0 in range(0, num_tokens, token_chunk):
        zc = z_aug[t0:t0 + token_chunk]
        run_min, run_arg = None, None
        for c0 in range(0, num_codes, code_chunk):
            partial = zc @ codes_aug[c0:c0 + code_chunk].t()
            chunk_min, chunk_arg = partial.min(dim=1)
            if run_min is None:
                run_min, run_arg = chunk_min, chunk_arg
                continue
            better = chunk_min < run_min  # strict: earlier chunk wins ties -> lowest index
            run_min = torch.where(better, chunk_min, run_min)
            run_arg = torch.where(better, chunk_arg + c0, run_arg)
        best_index[t0:t0 + token_chunk] = run_arg
        best_dist[t0:t0 + token_chunk] = (run_min + z[t0:t0 + token_chunk].pow(2).sum(1)).clamp_min(0.0)
    return best_index, best_dist


@torch.no_grad()
def kmeans(
    samples: torch.Tensor,
    num_clusters: int,
    iters: int = 10,
    generator: torch.Generator | None = None,
    cosine: bool = False,
    token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
    code_chunk: int | None = DEFAULT_CODE_CHUNK,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (chunked assignment, ``index_add_`` centroid sums). Centroids start at random
    samples (drawn with replacement when there are fewer samples than clusters); a cluster that
    loses all its points keeps its previous centroid. With ``cosine`` the centroids are
    re-normalised (spherical k-means). Returns (centroids (K, d), cluster sizes (K,))."""
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"kmeans: samples must be a non-empty (N, d) tensor, got {tuple(samples.shape)}")
    samples = samples.float()
    n, d = samples.shape
    gen_device = generator.device if generator is not None else "cpu"
    if n >= num_clusters:
        pick = torch.randperm(n, generator=generator, device=gen_device)[:num_clusters]
    else:
        pick = torch.randint(0, n, (num_clusters,), generator=generator, device=gen_device)
    centroids = samples[pick.to(samples.device)].clone()
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in tqdm(range(iters), desc="k-means init", disable=not progress, leave=False):
        assign, _ = nearest_codes(samples, centroids, token_chunk, code_chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
        counts = torch.zeros(num_clusters, device=samples.device).index_add_(0, assign, torch.ones(n, device=samples.device))
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
        if cosine:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids, counts
