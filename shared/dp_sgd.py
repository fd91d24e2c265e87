"""User-level DP-SGD on a node: per-user gradients computed in one vectorized pass.

Abadi et al. (2016) with the *user* as the privacy unit (McMahan et al. 2018):
every step samples each of the region's users with probability `q` (Poisson, a
keyed coin as in `shared.dp_training`), computes each sampled user's gradient of
the mean loss over that user's own examples, clips it to L2 norm `clip_norm`,
sums, adds Gaussian noise `N(0, (z * clip_norm)^2)` per coordinate and divides
by the expected number of users `q * U`. The optimizer (Adam by default) only
reads that noisy mean, so its steps are post-processing; the accountant counts
one subsampled Gaussian release per step.

Per-user gradients come from `torch.func` (vmap over users of the gradient of a
functional copy of `HybridTwoTower`'s forward), so a step costs a few batched
passes instead of one Python-level training run per user. Users are processed
in chunks sorted by their number of examples, each chunk padded to its own
longest user, so padding stays small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import grad, vmap
from torch.nn import functional as F

from shared.dp_training import DPUpdate, is_frozen, noise_generator, poisson_coin
from shared.features import ItemFeatures
from shared.model import HybridTwoTower, ModelConfig
from shared.training import UserSequence

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DPSGDConfig:
    clip_norm: float  # L2 clip of one user's gradient
    noise_multiplier: float  # z: noise stddev / clip_norm
    sampling_rate: float  # q: Poisson rate of users per step
    steps: int  # DP-SGD steps per round (each one a release in the accountant)
    lr: float = 0.01
    optimizer: str = "adam"
    num_negatives: int = 256  # uniform catalog negatives shared by a step's users
    max_examples: int = 64  # a user's most recent examples that enter its gradient
    chunk_users: int = 64  # users per vectorized pass
    # Share of the noise stddev this node adds: 1 is the node's own guarantee; 1/sqrt(n)
    # splits one release's noise over n nodes (distributed DP: only their *sum* is
    # private, so it relies on secure aggregation and on every node adding its share).
    noise_share: float = 1.0

    def __post_init__(self) -> None:
        if self.clip_norm <= 0:
            raise ValueError("clip_norm must be positive")
        if self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError("sampling_rate must be in (0, 1]")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError("optimizer must be 'adam' or 'sgd'")
        if not 0 < self.noise_share <= 1:
            raise ValueError("noise_share must be in (0, 1]")


@dataclass(frozen=True)
class UserBatch:
    """Every user's examples, padded, as positions into the user's own item sequence.

    A user's next-item examples share one sequence (example t predicts item t from the
    items before it), so each user's item vectors are computed once per step and the
    histories index into them.
    """

    users: list[str]
    seq: torch.Tensor  # (U, S) catalog rows of the user's sequence (0-padded)
    history: torch.Tensor  # (U, M, L) positions into seq, left-padded
    types: torch.Tensor  # (U, M, L) event type ids, 0 = padding
    target: torch.Tensor  # (U, M) positions into seq
    country: torch.Tensor  # (U, M) country bucket of each example (as of its target)
    count: torch.Tensor  # (U,) examples per user (>= 1)


def pack_users(
    sequences: Mapping[str, UserSequence], max_history: int, max_examples: int
) -> UserBatch:
    """Users with at least one example, each with its `max_examples` most recent ones.

    The examples are exactly `shared.training.make_examples` of the user's sequence.
    """
    kept = [(u, sequences[u]) for u in sorted(sequences) if len(sequences[u].items) >= 2]
    n = len(kept)
    m = min(max_examples, max((len(s.items) - 1 for _, s in kept), default=1))
    s_len = max((len(s.items) for _, s in kept), default=1)
    seq = torch.zeros(n, s_len, dtype=torch.long)
    history = torch.zeros(n, m, max_history, dtype=torch.long)
    types = torch.zeros(n, m, max_history, dtype=torch.long)
    target = torch.zeros(n, m, dtype=torch.long)
    country = torch.zeros(n, m, dtype=torch.long)
    count = torch.zeros(n, dtype=torch.long)
    for i, (_, s) in enumerate(kept):
        seq[i, : len(s.items)] = torch.tensor(s.items)
        steps = list(range(1, len(s.items)))[-m:]
        count[i] = len(steps)
        # Padding examples repeat the first kept one (finite everywhere, masked out).
        for j in range(m):
            t = steps[j] if j < len(steps) else steps[0]
            lo = max(0, t - max_history)
            k = t - lo
            history[i, j, max_history - k :] = torch.arange(lo, t)
            types[i, j, max_history - k :] = torch.tensor(s.types_window(lo, t))
            target[i, j] = t
            country[i, j] = s.country_at(t)
    return UserBatch([u for u, _ in kept], seq, history, types, target, country, count)


def dense_bags(features: ItemFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_items, T) token ids and a (num_items, T) 1/len weight (0 on padding)."""
    ends = torch.cat([features.offsets[1:], torch.tensor([features.token_ids.numel()])])
    lengths = ends - features.offsets
    t = int(lengths.max()) if lengths.numel() else 1
    tokens = torch.zeros(features.num_items, t, dtype=torch.long)
    weight = torch.zeros(features.num_items, t)
    for i in range(features.num_items):
        k = int(lengths[i])
        s = int(features.offsets[i])
        tokens[i, :k] = features.token_ids[s : s + k]
        if k:
            weight[i, :k] = 1.0 / k
    return tokens, weight


class PerUserGradients:
    """Per-user gradients of `HybridTwoTower`'s sampled-softmax loss, vectorized."""

    def __init__(
        self, config: ModelConfig, features: ItemFeatures, frozen: tuple[str, ...] = ()
    ) -> None:
        self.model = HybridTwoTower(config)
        self.config = config
        self.tokens, self.token_weight = dense_bags(features)
        self.num_rows = features.num_items  # catalog rows (may exceed the id table)
        # Frozen parameters get no gradient: not clipped, not noised, not released.
        self.names = [n for n, _ in self.model.named_parameters() if not is_frozen(n, frozen)]

        def item_vecs(
            p: StateDict, tokens: torch.Tensor, token_weight: torch.Tensor, rows: torch.Tensor
        ) -> torch.Tensor:
            emb = F.embedding(tokens[rows], p["content.weight"])  # (r, T, d)
            content = (emb * token_weight[rows].unsqueeze(-1)).sum(-2)
            content = F.linear(content, p["content_proj.weight"], p["content_proj.bias"])
            vec = content + F.embedding(rows, p["item_id.weight"])
            bias = F.linear(content, p["content_bias.weight"], p["content_bias.bias"])
            return torch.cat([vec, bias + F.embedding(rows, p["item_bias.weight"])], -1)

        def user_loss(
            trained: StateDict,
            fixed: StateDict,
            tokens: torch.Tensor,  # (I, T) content tokens of the chunk's item rows
            token_weight: torch.Tensor,  # (I, T)
            seq: torch.Tensor,  # (S,) chunk-local item ids of the user's sequence
            history: torch.Tensor,  # (M, L) positions into seq
            types: torch.Tensor,  # (M, L)
            target: torch.Tensor,  # (M,) positions into seq
            country: torch.Tensor,  # (M,)
            mask: torch.Tensor,  # (M,) float, 1 for real examples
            neg: torch.Tensor,  # (N,)
        ) -> torch.Tensor:
            p = {**fixed, **trained}
            d = config.embedding_dim
            seq_vecs = item_vecs(p, tokens, token_weight, seq)  # (S, d + 1)
            hist = seq_vecs[history][..., :d]  # (M, L, d)
            pos = seq_vecs[target]
            negv = item_vecs(p, tokens, token_weight, neg)
            recency = p["recency_weight"][-history.shape[-1] :]
            logits = p["event_weight"][types] + recency
            logits = logits.masked_fill(types == 0, float("-inf"))
            w = torch.softmax(logits, dim=-1)
            pooled = torch.einsum("ml,mld->md", w, hist)
            user = F.linear(pooled, p["user_proj.weight"], p["user_proj.bias"])
            user = user + F.embedding(country, p["country.weight"])
            user = torch.cat([user, torch.ones_like(user[:, :1])], -1)
            pos_logit = (user * pos).sum(-1, keepdim=True)
            neg_logits = user @ negv.T
            hit = seq[target].unsqueeze(1) == neg.unsqueeze(0)
            neg_logits = neg_logits.masked_fill(hit, -1e9)
            ce = torch.logsumexp(torch.cat([pos_logit, neg_logits], -1), -1) - pos_logit[:, 0]
            return (ce * mask).sum() / mask.sum()

        self._per_user = vmap(
            grad(user_loss), in_dims=(None, None, None, None, 0, 0, 0, 0, 0, 0, None)
        )

    def clipped_sum(
        self,
        params: StateDict,
        batch: UserBatch,
        idx: torch.Tensor,
        neg: torch.Tensor,
        clip_norm: float,
        chunk: int,
    ) -> tuple[StateDict, int]:
        """Sum over users `idx` of their gradients clipped to `clip_norm`; users clipped."""
        total = {k: torch.zeros_like(params[k]) for k in self.names}
        clipped = 0
        order = idx[torch.argsort(batch.count[idx])]
        for start in range(0, order.numel(), chunk):
            part = order[start : start + chunk]
            m = int(batch.count[part].max())
            types = batch.types[part, :m]
            # Histories are left-padded: the last columns hold every real event.
            real = (types > 0).any(dim=(0, 1))
            used = int(real.nonzero().min()) if bool(real.any()) else types.shape[-1] - 1
            types = types[..., used:]
            hist = batch.history[part, :m, used:]
            target = batch.target[part, :m]
            s_len = int(target.max()) + 1
            seq = batch.seq[part, :s_len]
            mask = (torch.arange(m).unsqueeze(0) < batch.count[part].unsqueeze(1)).float()
            # The chunk's users touch few rows of the id and content tables: their gradients
            # are taken with respect to those rows only (exactly the same values and norms as
            # the full tables' gradients, which are zero elsewhere), then scattered back.
            items, inverse = torch.unique(torch.cat([seq.reshape(-1), neg]), return_inverse=True)
            tokens, tok_inverse = torch.unique(self.tokens[items], return_inverse=True)
            # Catalog rows past the id table (items added since this version was made)
            # are content-only, as in `HybridTwoTower.item_vectors`: no id part, no id grad.
            known = items < params["item_id.weight"].shape[0]
            safe = torch.where(known, items, torch.zeros_like(items))
            local = dict(params)
            for k in ("item_id.weight", "item_bias.weight"):
                local[k] = params[k][safe] * known.unsqueeze(1).to(params[k].dtype)
            local["content.weight"] = params["content.weight"][tokens]
            grads = self._per_user(
                {k: v for k, v in local.items() if k in self.names},
                {k: v for k, v in local.items() if k not in self.names},
                tok_inverse,
                self.token_weight[items],
                inverse[: seq.numel()].reshape(seq.shape),
                hist,
                types,
                target,
                batch.country[part, :m],
                mask,
                inverse[seq.numel() :],
            )
            for k in ("item_id.weight", "item_bias.weight"):
                if k in grads:
                    grads[k] = grads[k] * known.view(1, -1, 1).to(grads[k].dtype)
            sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
            norms = sq.sqrt()
            factor = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
            clipped += int((norms > clip_norm).sum())
            for k, g in grads.items():
                summed = torch.einsum("b,b...->...", factor, g)
                if k == "content.weight":
                    total[k].index_add_(0, tokens, summed)
                elif k in ("item_id.weight", "item_bias.weight"):
                    total[k].index_add_(0, safe, summed)
                else:
                    total[k] += summed
        return total, clipped


def _coins(key: bytes, step: int, users: Sequence[str], rate: float) -> torch.Tensor:
    """Poisson coins of one step, keyed by the node's secret round key (as DP-FedAvg's)."""
    coins = [poisson_coin(key, f"sgd|{step}|{u}", rate) for u in users]
    return torch.tensor(coins, dtype=torch.bool)


def dp_sgd_update(
    config: ModelConfig,
    base_state: Mapping[str, torch.Tensor],
    features: ItemFeatures,
    sequences: Mapping[str, UserSequence],
    dp: DPSGDConfig,
    *,
    key: bytes,
    engine: PerUserGradients | None = None,
    users: UserBatch | None = None,
) -> DPUpdate | None:
    """The region's contribution for one round: `dp.steps` DP-SGD steps from the base.

    Returns the delta (trained - base) with `num_units` = users with an example, or None
    when no user has one. `engine` and `users` may be passed in to reuse them across rounds.
    """
    engine = engine or PerUserGradients(config, features)
    batch = users or pack_users(sequences, config.max_history, dp.max_examples)
    num_users = len(batch.users)
    if num_users == 0:
        return None
    g = noise_generator(key)  # secret: noise and negatives
    params = {k: base_state[k].detach().clone() for k in engine.names}
    tensors = [params[k] for k in engine.names]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(tensors, lr=dp.lr)
        if dp.optimizer == "adam"
        else torch.optim.SGD(tensors, lr=dp.lr)
    )
    std = dp.noise_multiplier * dp.clip_norm * dp.noise_share
    sampled = clipped = 0
    for step in range(dp.steps):
        picked = _coins(key, step, batch.users, dp.sampling_rate).nonzero().flatten()
        neg = torch.randint(0, engine.num_rows, (dp.num_negatives,), generator=g)
        current = {**base_state, **params}
        total, c = engine.clipped_sum(current, batch, picked, neg, dp.clip_norm, dp.chunk_users)
        sampled += int(picked.numel())
        clipped += c
        for k, t in zip(engine.names, tensors, strict=True):
            noisy = total[k] + torch.randn(t.shape, generator=g) * std if std > 0 else total[k]
            # The expected number of sampled users, not the drawn one: the drawn count
            # depends on who is in the data (the same denominator as DP-FedAvg).
            t.grad = noisy / (dp.sampling_rate * num_users)
        opt.step()
    delta = {
        k: (params[k] - base_state[k]) if k in params else torch.zeros_like(v)
        for k, v in base_state.items()
    }
    return DPUpdate(
        delta=delta,
        num_units=num_users,
        sampled_units=sampled,
        clipped_fraction=clipped / sampled if sampled else 0.0,
        noise_stddev=std,
    )
