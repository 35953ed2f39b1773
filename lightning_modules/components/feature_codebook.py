"""Keep-or-code: stage 2's next frame as one class per visual token instead of a regressed vector
(``StoryMLLMModule.codebook``).

A regression that gets part of an edit right draws worse than no edit at all: the mean of what a
token could become is none of them, and the de-tokenizer draws that blur. Here each token of the
next frame is a choice among ``K + 1`` classes: class 0 keeps the token of the frame being edited
(``edit_from``), class ``1 + k`` puts code ``k`` of a k-means codebook of the visual tokenizer's
tokens there. The label of a true token is the nearer of the two (keep, or its nearest code), the
loss is the labels' negative log-likelihood, and the decoded frame takes the likeliest class of
every token: each token is a real token or a code, never an average. On the tiny world's patch
tokens (``select_layer: 0``, 15% of them change per step) the codes quantise to 0.044 of the copy
baseline's error.

The codebook is fitted once, by k-means on tokens of the training split at the start of the first
``fit`` (:func:`fit_codebook`), and then travels in checkpoints and the export like any weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class CodebookConfig:
    """``size`` k-means codes fitted on ``fit_tokens`` tokens of the training split, ``iterations`` Lloyd steps;
    ``loss`` the labels' negative log-likelihood, whole or factored (below)."""

    size: int = 2048
    fit_tokens: int = 200_000
    iterations: int = 15
    seed: int = 0
    # "joint": the cross-entropy over the K + 1 classes. "factored": the same likelihood split in two, keep or
    # change (over every token) plus which code (over the tokens that change, averaged over those alone). Most
    # tokens keep (85% on the tiny world), so in the joint mean the codes are a small share of the loss;
    # factored, both terms have the same optimum (each has its own free logits: keep's against the codes', and
    # the codes' among themselves), so the decisions stay calibrated. Factored learns the codes sooner and
    # ends lower (tiny stage 2: 0.46 against 0.32 of the changing val tokens after 1000 steps, 0.71 against
    # 0.82 after 2000; README, "Not there yet")
    loss: str = "joint"

    def __post_init__(self):
        if self.loss not in ("factored", "joint"):
            raise ValueError(f"codebook.loss is 'factored' or 'joint', got {self.loss!r}")


class FeatureCodebook(nn.Module):
    """The codes (a buffer) and the head that scores keep-or-code for every token of width ``dim``."""

    def __init__(self, config: CodebookConfig, dim: int):
        super().__init__()
        self.config = config
        self.register_buffer("codes", torch.zeros(config.size, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.head = nn.Linear(dim, config.size + 1)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Take ``codes (K, D)`` as the codebook and mark it fitted."""
        self.codes.copy_(codes)
        self.fitted.fill_(True)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., K + 1)`` scores of keep (0) and of each code (1 + k) from output tokens ``(..., dim)``."""
        return self.head(tokens)

    @torch.no_grad()
    def labels(self, kept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per token, 0 where the kept token is at least as close to the target as its nearest code, else 1 + that code."""
        code_distance, code = nearest_code(target, self.codes)
        keep_distance = (target - kept).norm(dim=-1)
        return torch.where(keep_distance <= code_distance, 0, code + 1)

    def decode(self, kept: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The frame the labels say: the kept token where 0, code ``label - 1`` elsewhere."""
        coded = self.codes[(labels - 1).clamp(min=0)].to(kept.dtype)
        return torch.where((labels == 0)[..., None], kept, coded)

    def loss(self, logits: torch.Tensor, kept: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels' negative log-likelihood (``config.loss``), and the accuracy on the tokens that change
        (label != 0)."""
        labels = self.labels(kept.float(), target.float()).flatten()
        logits = logits.float().flatten(0, -2)
        changed = labels != 0
        if self.config.loss == "joint":
            nll = F.cross_entropy(logits, labels)
        else:
            log_p = logits.log_softmax(-1)
            keep_or_change = torch.where(changed, log_p[:, 1:].logsumexp(-1), log_p[:, 0])
            nll = -keep_or_change.mean()
            if changed.any():
                nll = nll + F.cross_entropy(logits[changed, 1:], labels[changed] - 1)
        with torch.no_grad():
            hits = (logits.argmax(-1) == labels)[changed]
            accuracy = hits.float().mean() if hits.numel() else logits.new_ones(())
        return nll, accuracy


def nearest_code(tokens: torch.Tensor, codes: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, the nearest code of every token ``(..., D)`` (in chunks: the
    full token x code distance matrix of a k-means fit would not fit in memory)."""
    flat = tokens.reshape(-1, tokens.shape[-1]).to(codes.dtype)
    distances, indices = [], []
    for part in flat.split(chunk):
        d, i = torch.cdist(part, codes).min(dim=-1)
        distances.append(d)
        indices.append(i)
    shape = tokens.shape[:-1]
    return torch.cat(distances).view(shape), torch.cat(indices).view(shape)


@torch.no_grad()
def kmeans(tokens: torch.Tensor, size: int, iterations: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means on ``tokens (M, D)``, seeded by k-means++ (each next seed drawn in proportion to its
    squared distance from the seeds so far, so no cluster is left without one); a code left empty is
    re-seeded on a random token so that all ``size`` stay in use."""
    if len(tokens) < size:
        raise ValueError(f"the codebook needs at least size={size} tokens to fit on; got {len(tokens)}: "
                         "lower codebook.size or raise codebook.fit_tokens")
    generator = torch.Generator().manual_seed(seed)
    tokens = tokens.float().cpu()
    # seeds from a sample of 8 tokens per code: one pass per seed over all tokens would take minutes
    pool = tokens[torch.randperm(len(tokens), generator=generator)[: 8 * size]]
    pool_norms = pool.pow(2).sum(-1)
    codes = torch.empty(size, tokens.shape[1])
    codes[0] = pool[0]
    nearest = (pool - codes[0]).pow(2).sum(-1)
    for k in range(1, size):
        cumulative = (nearest.clamp(min=0) + 1e-12).cumsum(0)  # drawn by inverse CDF: faster than multinomial
        pick = torch.searchsorted(cumulative, torch.rand((1,), generator=generator) * cumulative[-1]).clamp(max=len(pool) - 1)
        codes[k] = pool[pick[0]]
        nearest = torch.minimum(nearest, pool_norms - 2 * pool @ codes[k] + codes[k].pow(2).sum())
    for _ in range(iterations):
        _, assign = nearest_code(tokens, codes)
        sums = torch.zeros_like(codes).index_add_(0, assign, tokens)
        counts = torch.bincount(assign, minlength=size).float()
        reseed = tokens[torch.randint(len(tokens), (size,), generator=generator)]
        codes = torch.where((counts == 0)[:, None], reseed, sums / counts.clamp(min=1)[:, None])
    return codes


@torch.no_grad()
def fit_codebook(codebook: FeatureCodebook, frames: Iterable[torch.Tensor]) -> int:
    """Fit the codes on the tokens of ``frames`` (batches of ``(F, N, D)`` features), read until
    ``fit_tokens`` tokens are collected, and mark the codebook fitted; returns how many tokens it fitted on
    (fewer than ``fit_tokens`` where the frames run out)."""
    config, collected, count = codebook.config, [], 0
    for features in frames:
        collected.append(features.reshape(-1, features.shape[-1]).float().cpu())
        count += len(collected[-1])
        if count >= config.fit_tokens:
            break
    tokens = torch.cat(collected)[: config.fit_tokens] if collected else torch.zeros(0, codebook.codes.shape[1])
    codebook.set_codes(kmeans(tokens, config.size, config.iterations, config.seed))
    return len(tokens)
