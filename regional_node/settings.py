"""Regional node settings, read once from the environment (prefix `NODE_`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.model import DEFAULT_PERSONAL_GLOBAL_SHARE


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NODE_", extra="ignore")

    id: str = Field(default="node-1", description="This node's id, as registered.")
    region: str = Field(default="default")
    coordinator_url: str | None = Field(
        default=None, description="Base URL of the coordinator; unset = serve only."
    )
    token: str | None = Field(default=None, description="The node token from registration.")
    database_url: str = Field(default="sqlite:///./fedjewel-node.db")
    poll_seconds: float = Field(default=5.0, gt=0)
    local_epochs: int = Field(default=2, ge=1, le=100)
    learning_rate: float = Field(default=0.01, gt=0, le=10)
    batch_size: int = Field(default=256, ge=1, le=65536)
    num_negatives: int = Field(default=1024, ge=1)
    fedprox_mu: float = Field(default=0.0, ge=0)
    personalize: bool = Field(
        default=True,
        description="Serve the global model fine-tuned on this region's events: right after "
        "a round, the model this node trained in it; once no round is open, a fine-tune job "
        "of its own (NODE_PERSONALIZE_EPOCHS at NODE_PERSONALIZE_LEARNING_RATE, stopped at "
        "once when a round wants the node) replaces it. The fine-tuned weights never leave "
        "the node.",
    )
    personalize_epochs: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Epochs of the personalization fine-tune (DP nodes: "
        "NODE_DP_PERSONALIZE_EPOCHS). docs/evaluation.md has the measurements behind it.",
    )
    personalize_learning_rate: float = Field(
        default=0.003,
        gt=0,
        le=10,
        description="Learning rate of the personalization fine-tune, DP nodes too (gentler "
        "than NODE_LEARNING_RATE: it starts from a trained global model).",
    )
    personalize_global_share: float = Field(
        default=DEFAULT_PERSONAL_GLOBAL_SHARE,
        ge=0,
        le=1,
        description="When personalizing, serve (1 - share) x the fine-tuned weights + share x "
        "the global version they started from (model interpolation; 0 = the fine-tuned "
        "weights alone). docs/evaluation.md has the measurements behind the default.",
    )
    personalize_select: bool = Field(
        default=False,
        description="Pick the fine-tune's length, 1 to NODE_PERSONALIZE_MAX_EPOCHS, on a "
        "validation split of this region's events (each user's last item held out), then "
        "fine-tune on all of them that long; NODE_PERSONALIZE_EPOCHS when no user can be held "
        "out (DP nodes: NODE_DP_PERSONALIZE_SELECT).",
    )
    personalize_max_epochs: int = Field(
        default=10,
        ge=1,
        le=100,
        description="With NODE_PERSONALIZE_SELECT: the longest fine-tune it may pick.",
    )
    dp_personalize_epochs: int = Field(
        default=10,
        ge=1,
        le=100,
        description="With NODE_DP_ENABLED: epochs of the personalization fine-tune (instead of "
        "NODE_PERSONALIZE_EPOCHS), or with NODE_DP_PERSONALIZE_SELECT when no user can be held "
        "out. The global model carries DP noise; the fine-tune's weights never leave the "
        "region. docs/privacy.md has the measurements behind the default.",
    )
    dp_personalize_select: bool = Field(
        default=True,
        description="With NODE_DP_ENABLED: pick the fine-tune's length, 1 to "
        "NODE_DP_PERSONALIZE_MAX_EPOCHS, on a validation split (instead of "
        "NODE_PERSONALIZE_SELECT). docs/privacy.md has the measurements behind the default.",
    )
    dp_personalize_max_epochs: int = Field(
        default=20,
        ge=1,
        le=100,
        description="With NODE_DP_ENABLED and NODE_DP_PERSONALIZE_SELECT: the longest "
        "fine-tune it may pick.",
    )
    personalize_soup: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Fine-tunes (differing in their seed) averaged into the served model, a "
        "model soup (DP nodes: NODE_DP_PERSONALIZE_SOUP); each one costs a fine-tune's time.",
    )
    dp_personalize_soup: int = Field(
        default=3,
        ge=1,
        le=10,
        description="With NODE_DP_ENABLED: fine-tunes averaged into the served model (instead "
        "of NODE_PERSONALIZE_SOUP). docs/privacy.md has the measurements behind the default.",
    )
    train_threads: int = Field(default=1, ge=1, le=64, description="torch threads of the trainer")
    train_nice: int = Field(
        default=10, ge=0, le=19, description="CPU niceness of the training worker process."
    )
    serve_threads: int = Field(
        default=1, ge=1, le=64, description="torch threads of the serving process."
    )
    update_encoding: Literal["dense", "float16", "int8", "topk", "topk8", "sign"] = Field(
        default="dense",
        description="How updates are packed; falls back to dense when the coordinator "
        "does not list it in supported_encodings.",
    )
    update_topk_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of entries a topk / topk8 update keeps (unset: 0.01 for topk, "
        "0.2 for topk8).",
    )
    recommend_search: Literal["ivf", "exact"] = Field(
        default="ivf",
        description="ivf: score only the items of the best k-means clusters of the item "
        "vectors (built once per model version; recall@10 in docs/performance.md); exact: "
        "score every item. Catalogs of at most 4 x NODE_IVF_CANDIDATES items, and requests "
        "whose filters leave at most a quarter of the catalog, are always scored exactly.",
    )
    ivf_clusters: int = Field(
        default=0, ge=0, description="IVF clusters per model version (0: about 2 x sqrt(items))."
    )
    ivf_candidates: int = Field(
        default=2000,
        ge=1,
        description="IVF: clusters are probed, best centroid first, until they hold this "
        "many items the request's filters allow; those are scored exactly.",
    )
    holdout_eval: bool = Field(
        default=True,
        description="Hold out each user's last item to report held-out HR@10 (only when "
        "at least NODE_MIN_USERS_FOR_METRICS users are held out; else train on every item).",
    )
    min_users_for_metrics: int = Field(
        default=20, ge=1, description="Metrics over fewer users are not sent to the coordinator."
    )
    api_keys: str = Field(
        default="", description="Comma-separated storefront API keys (X-API-Key header)."
    )
    allow_anonymous: bool = Field(
        default=False,
        description="Serve /v1/recommend and /v1/events without an API key (a key that is "
        "sent must still be valid).",
    )
    max_events_per_batch: int = Field(default=10_000, ge=1)
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Largest request body (a POST /v1/events batch); a bigger one is refused "
        "with 413 while it streams, before it is parsed.",
    )
    backoff_max_seconds: float = Field(default=60.0, gt=0)
    # Privacy (docs/privacy.md).
    dp_enabled: bool = Field(default=False, description="User-level differential privacy.")
    dp_algorithm: Literal["fedavg", "dpsgd"] = Field(
        default="fedavg",
        description="fedavg: one clipped SGD step per sampled user, noised once a round; "
        "dpsgd: NODE_DP_SGD_STEPS noised steps of per-user clipped gradients a round.",
    )
    dp_sgd_steps: int = Field(
        default=20, ge=1, le=10_000, description="dpsgd: noisy steps per round (each one counted)."
    )
    dp_sgd_learning_rate: float = Field(
        default=0.01, gt=0, le=10, description="dpsgd: learning rate of the node's optimizer."
    )
    dp_sgd_clip_norm: float = Field(
        default=1.0, gt=0, description="dpsgd: L2 clip of one user's gradient."
    )
    dp_sgd_optimizer: Literal["adam", "sgd"] = Field(
        default="adam",
        description="dpsgd: the node's optimizer; sgd with NODE_DP_SGD_STEPS=1 and lr 1 sends "
        "the noisy mean gradient (the coordinator's optimizer then takes the step).",
    )
    dp_noise_nodes: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="Distributed DP: each node adds 1/sqrt(n) of the noise, so only the sum "
        "of at least n nodes' updates is private. Needs secure aggregation and dpsgd with "
        "one step a round; set n to the coordinator's minimum cohort. 1: the node's own.",
    )
    dp_clip_norm: float = Field(
        default=5.0,
        gt=0,
        description="fedavg: L2 clip of each user unit's delta (docs/privacy.md).",
    )
    dp_learning_rate: float = Field(
        default=10.0, gt=0, le=100, description="fedavg: local learning rate of each user unit."
    )
    dp_optimizer: Literal["sgd", "adam"] = Field(
        default="sgd",
        description="fedavg: local optimizer of each user unit: one SGD step keeps the gradient's "
        "shape, Adam's first step moves every touched weight by the learning rate.",
    )
    dp_server_lr: float = Field(
        default=1.0,
        gt=0,
        le=100,
        description="fedavg: server learning rate: the node scales its noisy mean by it before "
        "sending (post-processing, no privacy cost).",
    )
    dp_noise_multiplier: float = Field(
        default=1.0, ge=0, description="Noise stddev / sensitivity of the clipped sum."
    )
    dp_epsilon_budget: float = Field(
        default=8.0, gt=0, description="The node refuses to train past this epsilon."
    )
    dp_delta: float = Field(
        default=1e-5, gt=0, lt=1, description="DP delta the accountant reports epsilon for."
    )
    dp_groups: int = Field(
        default=0, ge=0, description="fedavg: 0: one unit per user; n: users hashed into n buckets."
    )
    dp_sampling_rate: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Poisson rate of users sampled into each DP round (fedavg) or step (dpsgd).",
    )
    secure_aggregation: bool = Field(default=False, description="Pairwise-mask every update.")
    secagg_wait_seconds: float = Field(
        default=120.0,
        gt=0,
        description="How long past the round's deadline to wait for the secure-aggregation "
        "cohort to seal (past each later deadline the coordinator sets for an unsealed "
        "round, up to three).",
    )
    insights_enabled: bool = Field(default=True, description="Push regional aggregates.")
    insights_min_users: int = Field(
        default=20, ge=1, description="Cells from fewer distinct users are suppressed."
    )
    insights_weeks: int = Field(
        default=8, ge=1, le=104, description="Weeks of trend in a regional insights report."
    )
    insights_noise_scale: float = Field(
        default=2.0,
        ge=0,
        description="Laplace noise scale on insight counts (0 = none): keeps a suppressed "
        "cell from being recovered as a difference of published counts.",
    )
    insights_interval_seconds: float = Field(
        default=300.0, gt=0, description="Seconds between regional insights pushes."
    )
    log_json: bool = False

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @model_validator(mode="after")
    def _distributed_noise_needs_a_linear_masked_sum(self) -> NodeSettings:
        if self.dp_noise_nodes > 1 and not (
            self.secure_aggregation and self.dp_algorithm == "dpsgd" and self.dp_sgd_steps == 1
        ):
            raise ValueError(
                "NODE_DP_NOISE_NODES > 1 splits the noise over a sum that only secure "
                "aggregation keeps hidden, of updates that add up linearly: it needs "
                "NODE_SECURE_AGGREGATION=true, NODE_DP_ALGORITHM=dpsgd and NODE_DP_SGD_STEPS=1"
            )
        return self

    @model_validator(mode="after")
    def _need_keys_or_anonymous(self) -> NodeSettings:
        if not self.api_key_list and not self.allow_anonymous:
            raise ValueError(
                "no storefront API keys: set NODE_API_KEYS, or NODE_ALLOW_ANONYMOUS=true to "
                "serve without authentication"
            )
        return self
