"""Token sampling shared by the autoregressive generators: the per-step distribution (temperature, top-k, top-p) and
speculative Jacobi decoding (SJD; Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with
Training-free Speculative Jacobi Decoding").

SJD runs over a small decode-step interface that any AR model with a KV cache provides (:class:`BlockDecoder`):
feed each row a block of ``k`` consecutive tokens starting at a per-row token index, writing their keys/values to the
cache, and get the (guided) logits of the token after each. The model keeps its own cache, guidance and layout.

The algorithm. Each row holds its committed tokens ``0 .. n - 1`` and ``L`` draft tokens ``n .. n + L - 1``, each
draft drawn from a known proposal distribution ``q``. One step feeds ``[token n - 1, drafts]`` and gets the model's
distributions ``p`` for tokens ``n .. n + L`` given the committed tokens and the drafts before each. Drafts are then
accepted in order, draft ``i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the token is
drawn from the residual ``max(0, p_i - q_i)`` (normalised) instead, and the step ends; if all ``L`` are accepted, the
token after them is drawn from ``p_L``. This is the speculative-sampling rule (Leviathan et al. 2023; Chen et al.
2023): each committed token has exactly the model's distribution given the tokens before it, whatever the proposals,
so the joint distribution of the sequence is that of plain token-by-token sampling. New drafts for the next step are
drawn fresh from the distributions this step computed at their indices (the Jacobi iteration; beyond the block, from
the last one), and their proposals are recorded. Greedy decoding (``top_k = 1``) accepts exactly the drafts plain
greedy decoding would produce, so it gives identical tokens.

Each row advances at its own pace; the block keeps a static size ``k = L + 1`` and, near the end of the sequence,
starts earlier (re-feeding committed tokens, whose logits are then not used) so that it never runs past the last
token index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from vfmtok.tokenizer.utils.errors import InvalidValueError

__all__ = ["filter_logits", "token_probabilities", "sample_tokens", "sample_tokens_by_inverse_cdf", "BlockDecoder",
           "SJDStats", "speculative_jacobi_decode"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k (``top_k > 0``) and outside the nucleus (``top_p < 1``) to -inf (a copy).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``: a token is dropped when
    the tokens ranked before it already hold more than ``top_p``; the most likely token is always kept.
    """
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before > top_p
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def token_probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from: ``softmax(filter(logits / temperature))`` over the last dimension."""
    logits = logits.float() / temperature
    if top_k > 0 or top_p < 1.0:
        logits = filter_logits(logits, top_k, top_p)
    return logits.softmax(dim=-1)


def sample_tokens(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``probs`` (..., V) -> (...), ``torch.multinomial`` with ``generator``."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, num_samples=1, generator=generator)[:, 0].reshape(probs.shape[:-1])


def sample_tokens_by_inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of ``probs`` (..., V) -> (...), by one uniform number per row against the cumulative
    distribution (float64). The same distribution as :func:`sample_tokens`, other draws for a seed; ``multinomial``
    draws V exponentials per row, which is most of an SJD step's bookkeeping on a small model (it samples the drafts
    of every row at every step), so SJD samples this way. Plain sampling keeps ``multinomial``: its tokens for a seed
    stay those of the reference code and of earlier runs."""
    cdf = probs.double().cumsum(dim=-1)
    uniform = torch.rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=torch.float64)
    target = (uniform * cdf[..., -1])[..., None]
    return torch.searchsorted(cdf, target, right=True)[..., 0].clamp(max=probs.shape[-1] - 1)


class BlockDecoder(Protocol):
    """What SJD needs from a model with a KV cache (set up for the batch, the first token's logits already known)."""

    def __call__(self, tokens: torch.Tensor, first_index: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, k): row b's image tokens ``first_index[b] .. first_index[b] + k - 1``, every token before
        them already fed. Returns logits (B, k, V); ``[:, j]`` predicts token ``first_index[b] + j + 1``. Keys and
        values of positions fed earlier than these are overwritten (a rejected draft's are replaced)."""


@dataclass
class SJDStats:
    """``steps``: block forwards of the batch after the first token's logits (plain decoding: ``num_tokens - 1``);
    the batch runs until its slowest row is done. ``tokens``: tokens committed by them, summed over the rows;
    ``row_steps``: the steps each row took until it was done, summed. ``tokens_per_step``: the mean tokens a row
    commits per step (1 for plain decoding)."""

    steps: int
    tokens: int
    rows: int
    row_steps: int

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.row_steps)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    return mask.long().cumprod(dim=1).sum(dim=1)


@torch.no_grad()
def speculative_jacobi_decode(
    decode: BlockDecoder,
    first_logits: torch.Tensor,
    num_tokens: int,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    window: int = 8,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, SJDStats]:
    """Sample ``num_tokens`` tokens per row by SJD with ``window`` draft tokens (module docstring).

    ``first_logits`` (B, V): the logits of token 0; ``probabilities(logits) -> probs`` the per-token distribution
    (e.g. :func:`token_probabilities` with the sampling settings), applied to guided logits. Returns the tokens
    (B, num_tokens) and :class:`SJDStats`. Random draws (proposals, acceptance, residuals) use ``generator``.
    """
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InvalidValueError(f"the SJD window must be an integer >= 1 (draft tokens per step), got {window!r}")
    total = int(num_tokens)
    batch, device = first_logits.shape[0], first_logits.device
    # The block [last committed token, L drafts] must fit before the last token index (the last token is never fed).
    drafts = min(window, total - 2)
    block = drafts + 1
    rows = torch.arange(batch, device=device)
    seq = torch.zeros(batch, total, dtype=torch.long, device=device)
    p0 = probabilities(first_logits)
    seq[:, 0] = sample_tokens_by_inverse_cdf(p0, generator)
    committed = torch.ones(batch, dtype=torch.long, device=device)  # n: tokens 0 .. n - 1 are final
    offsets = torch.arange(max(drafts, 0), device=device)
    # The first drafts come from token 0's distribution: a proposal like any other (spatially close tokens).
    proposals = p0[:, None].expand(batch, max(drafts, 0), -1).contiguous()
    if drafts > 0:
        draft_index = (committed[:, None] + offsets).clamp(max=total - 1)
        seq.scatter_(1, draft_index, sample_tokens_by_inverse_cdf(proposals, generator))
    steps = tokens = row_steps = 0
    while total > 1 and bool((committed < total).any()):
        start = torch.minimum(committed - 1, torch.full_like(committed, total - 1 - block))
        fed = seq.gather(1, start[:, None] + torch.arange(block, device=device))
        p = probabilities(decode(fed, start))  # (B, block, V): [:, j] is for token start + j + 1
        lag = committed - 1 - start  # > 0 only near the end: slots for committed tokens come first
        if drafts > 0:
            index = committed[:, None] + offsets
            valid = index < total
            slot = (lag[:, None] + offsets).clamp(max=block - 1)
            p_drafts = p[rows[:, None], slot]  # (B, L, V)
            x = seq.gather(1, index.clamp(max=total - 1))
            ratio = p_drafts.gather(2, x[..., None])[..., 0] / proposals.gather(2, x[..., None])[..., 0]
            accept = (torch.rand(x.shape, generator=generator, device=device) < ratio) & valid
            accepted = _leading_true(accept)
        else:
            accepted = torch.zeros_like(committed)
        # The token after the accepted drafts: the residual of the rejected draft, or p after all of them.
        after = (lag + accepted).clamp(max=block - 1)
        next_p = p[rows, after]
        if drafts > 0:
            rejected = accepted < drafts
            at = accepted.clamp(max=drafts - 1)
            residual = (p_drafts[rows, at] - proposals[rows, at]).clamp(min=0)
            mass = residual.sum(dim=-1, keepdim=True)
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_drafts[rows, at])
            next_p = torch.where(rejected[:, None], residual, next_p)
        new_token = sample_tokens_by_inverse_cdf(next_p, generator)
        position = committed + accepted
        has_next = position < total
        seq[rows[has_next], position[has_next]] = new_token[has_next]
        advanced = torch.where(committed < total, (position + 1).clamp(max=total) - committed,
                               torch.zeros_like(committed))
        steps, tokens = steps + 1, tokens + int(advanced.sum())
        row_steps += int((committed < total).sum())
        committed = committed + advanced
        if drafts > 0:  # fresh drafts from this step's distributions at their indices (beyond the block: the last)
            index = committed[:, None] + offsets
            slot = (index - 1 - start[:, None]).clamp(max=block - 1)
            proposals = p[rows[:, None], slot]
            new_drafts = sample_tokens_by_inverse_cdf(proposals, generator)
            keep = index < total
            seq[rows[:, None].expand_as(index)[keep], index[keep]] = new_drafts[keep]
    return seq, SJDStats(steps=steps, tokens=tokens, rows=batch, row_steps=row_steps)
