"""Vector quantizer (VQ-VAE, van den Oord et al. 2017) with the options the evidence favours
(tokenizers.md §6-§7): codebook learned by loss or by EMA with Laplace smoothing, k-means
initialisation, dead-code restart, cosine codes, factorised low-dimensional lookup (ViT-VQGAN /
Improved RVQGAN), SimVQ codebook, and an explicitly chosen gradient estimator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    QuantizerBase,
    QuantizerOutput,
    all_reduce_sum_,
    broadcast_from_rank0_,
    check_last_dim,
    code_histogram_stats,
    fp32_linear,
    fp32_no_autocast,
)
from .search import DEFAULT_CODE_CHUNK, DEFAULT_TOKEN_CHUNK, kmeans, nearest_codes

GRADIENT_ESTIMATORS = ("ste", "rotation", "softmax_ste")
CODEBOOK_UPDATES = ("loss", "ema")


def straight_through(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator (VQ-VAE eq. 3 convention): value q exactly, gradient identity to e,
    no gradient to q."""
    return q.detach() + (e - e.detach())


def rotation_trick(e: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2025, §4): q~ = sg[(|q|/|e|) R] e with
    R = I - 2 r r^T + 2 q^ e^T, r = (e^ + q^)/|e^ + q^|, applied as
    R e = e - 2 (e.r) r + 2 (e.e^) q^ without forming a d x d matrix. R and the scale are constants,
    so the gradient w.r.t. e is (|q|/|e|) R^T g and q gets none. The returned value is q exactly."""
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    e_hat = (e / e_norm).detach()
    q_hat = (q / q_norm).detach()
    r = F.normalize(e_hat + q_hat, dim=-1, eps=eps)
    scale = (q_norm / e_norm).detach()
    rotated = e - 2.0 * (e * r).sum(-1, keepdim=True) * r + 2.0 * (e * e_hat).sum(-1, keepdim=True) * q_hat
    out = scale * rotated
    return q.detach() + (out - out.detach())


def _check_arguments(dim, codebook_size, codebook_update, ema_decay, kmeans_init, dead_code_threshold,
                     restart_count, gradient, simvq) -> None:
    """One-line errors for :class:`VectorQuantizer` arguments that cannot work together."""
    if dim < 1 or codebook_size < 1:
        raise ValueError(f"VectorQuantizer: dim and codebook_size must be >= 1, got {dim}, {codebook_size}")
    if gradient not in GRADIENT_ESTIMATORS:
        raise ValueError(f"VectorQuantizer: gradient must be one of {GRADIENT_ESTIMATORS}, got {gradient!r}")
    if codebook_update not in CODEBOOK_UPDATES:
        raise ValueError(f"VectorQuantizer: codebook_update must be one of {CODEBOOK_UPDATES}, got {codebook_update!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"VectorQuantizer: ema_decay must be in [0, 1), got {ema_decay}")
    if dead_code_threshold < 0:
        raise ValueError(f"VectorQuantizer: dead_code_threshold must be >= 0, got {dead_code_threshold}")
    if simvq and (codebook_update != "loss" or kmeans_init or dead_code_threshold > 0):
        raise ValueError("VectorQuantizer: simvq=True needs codebook_update='loss', kmeans_init=False and "
                         "dead_code_threshold=0 (its codes all move through W; there is no per-code state)")
    if restart_count is not None and restart_count < dead_code_threshold:
        raise ValueError(f"VectorQuantizer: restart_count ({restart_count}) must be >= dead_code_threshold "
                         f"({dead_code_threshold}), or a restarted code is dead at once")


class VectorQuantizer(QuantizerBase):
    """Nearest-neighbour vector quantizer over channel-last inputs ``(..., dim)``.

    Args:
        dim: input channels D.
        codebook_size: number of codes K.
        codebook_dim: lookup dimension d; when it differs from ``dim`` a factorised lookup projects
            D -> d and back (Improved RVQGAN / ViT-VQGAN; pair it with ``cosine=True``).
        beta: commitment weight in ||sg(z) - q||^2 + beta ||z - sg(q)||^2.
        codebook_update: ``"loss"`` (codebook is a parameter trained by the codebook loss) or
            ``"ema"`` (codebook is a buffer updated by exponential moving averages, VQ-VAE App. A.1).
        ema_decay, ema_eps: EMA decay and Laplace-smoothing epsilon.
        kmeans_init, kmeans_iters: initialise the codebook by Lloyd's k-means on the first training batch.
            The EMA statistics then start from zero with bias correction, so the first batch's hits
            set them and clusters k-means left empty (always the case when K exceeds the batch) are
            dead from the first step (see ``_update_statistics``).
        dead_code_threshold: codes whose EMA hit count per batch falls below this are replaced by
            encoder outputs of the current batch, drawn without replacement with probability
            proportional to their squared quantisation error (EnCodec's restarts seeded like
            k-means++; EnCodec uses 2; keep it below tokens_per_batch / K). 0 turns restarts off.
        restart_count: EMA hit count a restarted code starts from. None (default): the uniform share
            of the step's tokens, tokens / K, and never below ``dead_code_threshold``. A code restarted
            at the threshold itself (EnCodec's and vector-quantize-pytorch's reset) is dead again after
            one step without a hit, which is the common case once K exceeds the tokens per step: the
            restarts then churn every step and the codes never settle. From tokens / K an unhit code
            stays alive for log(restart_count / threshold) / -log(decay) steps (~208 at threshold =
            share / 8, decay 0.99), time to collect the hits its share promises.
        cosine: l2-normalise inputs and codes (lookup by cosine similarity; z_q is the unit code).
        gradient: ``"ste"``, ``"rotation"`` or ``"softmax_ste"`` (IBQ); never chosen implicitly.
        softmax_temperature: temperature of the ``softmax_ste`` logits (negative squared distances).
        simvq: codebook C = W(B) with a frozen random base B ~ N(0, 1/d) and one learned linear W
            (Zhu et al. 2024); requires ``codebook_update="loss"``.
        token_chunk, code_chunk: chunk sizes of the nearest-code search (None: by device).

    ``forward(z)`` returns ``QuantizerOutput`` with ``indices`` of shape ``z.shape[:-1]`` (int64).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        beta: float = 0.25,
        codebook_update: str = "loss",
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 0.0,
        restart_count: float | None = None,
        cosine: bool = False,
        gradient: str = "ste",
        softmax_temperature: float = 1.0,
        simvq: bool = False,
        token_chunk: int | None = DEFAULT_TOKEN_CHUNK,
        code_chunk: int | None = DEFAULT_CODE_CHUNK,
    ):
        super().__init__()
        _check_arguments(dim, codebook_size, codebook_update, ema_decay, kmeans_init, dead_code_threshold,
                         restart_count, gradient, simvq)
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim or dim
        self.beta = beta
        self.codebook_update = codebook_update
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_threshold = dead_code_threshold
        self.restart_count = restart_count
        self.cosine = cosine
        self.gradient = gradient
        self.softmax_temperature = softmax_temperature
        self.simvq = simvq
        self.token_chunk = token_chunk
        self.code_chunk = code_chunk

        self._build_codebook()

    def _build_codebook(self) -> None:
        """The optional factorised projections, then the codes (parameter, EMA buffers or SimVQ's W(B))."""
        d = self.codebook_dim
        self.factorised = d != self.dim
        if self.factorised:
            self.project_in = nn.Linear(self.dim, d)
            self.project_out = nn.Linear(d, self.dim)
        init = torch.randn(self.codebook_size, d)
        if self.simvq:
            self.register_buffer("base_codebook", init / d ** 0.5)  # frozen, std d^-1/2 as in SimVQ
            self.codebook_map = nn.Linear(d, d, bias=False)
        elif self.codebook_update == "loss":
            self.codebook = nn.Parameter(init)
        else:
            if self.cosine:
                init = F.normalize(init, dim=1)
            self.register_buffer("codebook", init)
            # pretend every code was hit once at itself: unused codes then stay where they are
            self.register_buffer("ema_embed_sum", init.clone())
        self.register_buffer("cluster_size_ema", torch.ones(self.codebook_size))
        self.register_buffer("initialized", torch.tensor(not self.kmeans_init))
        # EMA of a constant 1 (Adam's / Sonnet's zero-debiasing weight 1 - decay^t since the k-means
        # start); 1 = fully warmed, i.e. the plain EMA of VQ-VAE App. A.1
        self.register_buffer("ema_weight", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before ema_weight existed hold fully warmed EMAs
        state_dict.setdefault(prefix + "ema_weight", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ codebook access
    def effective_codebook(self) -> torch.Tensor:
        """The (K, d) fp32 codes used for lookup (W(B) for SimVQ, unit rows when cosine)."""
        if self.simvq:
            codes = fp32_linear(self.codebook_map, self.base_codebook)
        else:
            codes = self.codebook.float()
        return F.normalize(codes, dim=1) if self.cosine else codes

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 indices ``(...)`` -> codes ``(..., dim)`` in fp32 (after ``project_out``)."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"VectorQuantizer.indices_to_codes: indices must be integer, got {indices.dtype}")
        with fp32_no_autocast(indices.device.type):
            q = F.embedding(indices.long(), self.effective_codebook())
            return fp32_linear(self.project_out, q) if self.factorised else q

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        check_last_dim(z, self.dim, "VectorQuantizer")
        in_dtype, lead_shape = z.dtype, z.shape[:-1]
        with fp32_no_autocast(z.device.type):
            flat = z.reshape(-1, self.dim).float()
            e = fp32_linear(self.project_in, flat) if self.factorised else flat
            if self.cosine:
                e = F.normalize(e, dim=1)
            if self.kmeans_init and self.training and not bool(self.initialized):
                self._kmeans_initialise(e.detach(), generator)

            codes = self.effective_codebook()
            indices, sq_err = nearest_codes(e.detach(), codes.detach(), self.token_chunk, self.code_chunk)
            q = F.embedding(indices, codes)  # gradient reaches the codebook (or W) through the gather

            if e.shape[0] == 0:
                # an empty shard (e.g. all of this process's samples dropped by RVQ dropout) still
                # takes part in the collective statistics below; its loss is an exact zero
                loss = (e.sum() + q.sum()) * 0.0
            elif self.codebook_update == "loss":
                loss = F.mse_loss(q, e.detach()) + self.beta * F.mse_loss(e, q.detach())
            else:
                loss = self.beta * F.mse_loss(e, q.detach())

            if self.gradient == "ste":
                e_q = straight_through(e, q)
            elif self.gradient == "rotation":
                e_q = rotation_trick(e, q)
            else:
                e_q = self._softmax_straight_through(e, codes, indices, q)
                if e.shape[0] > 0:
                    loss = loss + F.mse_loss(e_q, e)  # IBQ's "double quantisation" term

            out = fp32_linear(self.project_out, e_q) if self.factorised else e_q

            counts = torch.zeros(self.codebook_size, device=z.device).index_add_(
                0, indices, torch.ones_like(indices, dtype=torch.float32))
            stats = code_histogram_stats(counts)
            # dead codes: below the EMA threshold (counted before this step's restarts), else unused now
            # (right after k-means the EMA holds no batch yet, ema_weight = 0: count this batch's unused)
            stats["dead_codes"] = (torch.where(self.ema_weight > 0, self._dead_mask().sum(), stats["unused_codes"])
                                   if self.dead_code_threshold > 0 else stats["unused_codes"])
            if self.training:
                stats["restarted_codes"] = self._update_statistics(e.detach(), indices, counts, generator,
                                                                   sq_err)
        return QuantizerOutput(out.reshape(*lead_shape, self.dim).to(in_dtype), indices.reshape(lead_shape), loss, stats)

    def _softmax_straight_through(self, e, codes, indices, q):
        """IBQ index backpropagation (Shi et al. 2024, §3.2): p = softmax(logits) over all K codes;
        output value C[argmax] exactly; gradient as if z_q = (hard - sg(p) + p) C, so every code
        receives gradient through p. Logits are -||e - c||^2 / T (argmax = nearest code); memory is
        O(tokens x K)."""
        logits = (2.0 * e @ codes.t() - codes.pow(2).sum(1)) / self.softmax_temperature
        probs = logits.softmax(dim=1)
        soft = probs @ codes.detach()
        return q + (soft - soft.detach())

    # ------------------------------------------------------------------ training-time state
    def _dead_mask(self) -> torch.Tensor:
        return self.cluster_size_ema < self.dead_code_threshold

    @torch.no_grad()
    def _kmeans_initialise(self, e: torch.Tensor, generator) -> None:
        """k-means on the first training batch (rank 0's, broadcast to all processes). The EMA
        statistics are then set from this same batch's hits in ``_update_statistics``."""
        if e.shape[0] == 0:  # nothing local; rank 0's centroids arrive by broadcast
            centroids = torch.zeros(self.codebook_size, e.shape[1], device=e.device)
        else:
            centroids, _ = kmeans(e, self.codebook_size, self.kmeans_iters, generator, self.cosine,
                                  self.token_chunk, self.code_chunk)
        broadcast_from_rank0_(centroids)
        self.codebook.data.copy_(centroids)
        # zero-started, bias-corrected EMAs (see _update_statistics): no pretend hits
        if self.codebook_update == "ema":
            self.ema_embed_sum.zero_()
        self.cluster_size_ema.zero_()
        self.ema_weight.zero_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, e, indices, counts, generator, sq_err) -> int:
        """EMA hit counts (all processes summed), the EMA codebook update and dead-code restarts.

        After k-means init the EMAs are zero-started and bias-corrected (Adam, Kingma & Ba 2015 §3;
        the zero-debiased EMAs of Sonnet's VectorQuantizerEMA): with w_t = d w_{t-1} + (1 - d),
        w_0 = 0, the stored (debiased) statistics follow x <- x + (1 - d) / w_t (x_batch - x), i.e.
        every batch since the start is weighted d^(t-s) and nothing else. Before, the EMAs started
        at one pretend hit per code at its centroid. That start is in the wrong unit whenever the
        batch holds far more or far fewer tokens than codes: at 16k codes (0.25 hits per code and
        step) a code k-means left empty needed log(threshold) / log(d) steps (~400 at d = 0.99)
        to count as dead, so restarts came too late, and the one-batch k-means centroids kept a
        d^t share of every code for hundreds of steps. Without k-means (w = 1) this is exactly the
        plain EMA of VQ-VAE App. A.1."""
        counts = all_reduce_sum_(counts.clone())
        decay = self.ema_decay
        self.ema_weight.mul_(decay).add_(1.0 - decay)
        rate = (1.0 - decay) / self.ema_weight  # a 0-d tensor: no device sync
        self.cluster_size_ema.lerp_(counts, rate)
        if self.codebook_update == "ema":
            # VQ-VAE App. A.1: m_k <- d m_k + (1-d) sum_{i: k_i=k} e_i ; c_k = m_k / N~_k with
            # Laplace smoothing N~_k = (N_k + eps) / (n + K eps) * n
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, e)
            all_reduce_sum_(sums)
            self.ema_embed_sum.lerp_(sums, rate)
            n = self.cluster_size_ema.sum()
            smoothed = (self.cluster_size_ema + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
            new_codes = self.ema_embed_sum / smoothed.unsqueeze(1)
            # a code never hit since the zero start has no average yet: it keeps its value
            new_codes = torch.where((self.cluster_size_ema == 0).unsqueeze(1), self.codebook, new_codes)
            self.codebook.copy_(F.normalize(new_codes, dim=1) if self.cosine else new_codes)
        if self.dead_code_threshold <= 0:
            return 0
        reset = self.restart_count
        if reset is None:  # uniform share of this step's tokens (all processes), at least the threshold
            reset = max(float(counts.sum()) / self.codebook_size, self.dead_code_threshold)
        return self._restart_dead_codes(e, sq_err, generator, reset)

    @torch.no_grad()
    def _restart_dead_codes(self, e, sq_err, generator, reset: float) -> int:
        """Replace codes with EMA usage below the threshold by current encoder outputs (EnCodec /
        SoundStream restarts). The outputs are drawn without replacement with probability
        proportional to their squared distance to the nearest code (k-means++ D^2 seeding, Arthur &
        Vassilvitskii 2007): new codes go where the codebook is worst, never onto a point a code
        already sits on, and never two onto one point (uniform draws with replacement put several
        restarted codes on the same output; all but one of them stay dead). When there are more
        dead codes than such outputs, a random subset is restarted now and the rest on later steps.
        The dead mask is identical on every process (all-reduced counts); which codes restart and
        their replacements are rank 0's, broadcast. A restarted code's EMA count becomes ``reset``
        (see ``restart_count``)."""
        dead = self._dead_mask()
        num_dead = int(dead.sum())
        if num_dead == 0:
            return 0
        replacement = torch.zeros(num_dead, e.shape[1], device=e.device)
        take = torch.zeros(num_dead, device=e.device)
        if e.shape[0] > 0:  # else rank 0's choice arrives by broadcast
            gen_device = generator.device if generator is not None else "cpu"
            weights = sq_err.float().clamp_min(0.0).to(gen_device)
            num_new = min(num_dead, int((weights > 0).sum()))
            if num_new > 0:
                pick = torch.multinomial(weights, num_new, replacement=False, generator=generator)
                slots = torch.randperm(num_dead, generator=generator, device=gen_device)[:num_new].to(e.device)
                replacement[slots] = e[pick.to(e.device)]
                take[slots] = 1.0
        broadcast_from_rank0_(replacement)
        broadcast_from_rank0_(take)
        restart = torch.zeros_like(dead)
        restart[dead.nonzero().squeeze(1)[take.bool()]] = True
        replacement = replacement[take.bool()]
        self.codebook.data[restart] = replacement.to(self.codebook.dtype)
        self.cluster_size_ema[restart] = reset
        if self.codebook_update == "ema":
            self.ema_embed_sum[restart] = replacement * reset
        return int(restart.sum())

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"update={self.codebook_update}, gradient={self.gradient}, cosine={self.cosine}, simvq={self.simvq}")
