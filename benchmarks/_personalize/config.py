"""The run configuration and the training budget every method shares.

The budget is one object for all methods (same rounds, local epochs, batch size, optimizer family and learning-rate
rule), so no method is tuned harder than another. The learning-rate rule is by parameter *kind*, not by method:
parameters of the pre-trained backbone get ``lr_backbone``, prompt tokens (VPT's prompts, FedPGP's low-rank factors)
get ``lr_prompt``, and the other parameters that start from scratch (heads, FedPerfix's adapters) get ``lr_new``
(:mod:`.train`). Which methods run is not written here: selections are tags on the methods (:mod:`.methods`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Optional, Tuple


@dataclass(frozen=True)
class Budget:
    """Hyper-parameters, identical for every method (method-specific ones are the paper's defaults, scaled)."""

    rounds: int = 12
    local_epochs: int = 2
    batch_size: int = 32
    optimizer: str = "AdamW"  # every client, every method; re-created each round (clients are stateless)
    lr_prompt: float = 2e-2  # prompt tokens (VPT's prompts, FedPGP's factors; chosen on validation, issue 24)
    lr_new: float = 5e-3  # heads, FedPerfix's adapters (chosen on validation)
    lr_backbone: float = 5e-4  # pre-trained weights, for the methods that train them (FedAvg, FedPerfix, vanilla)
    weight_decay: float = 1e-3  # pFedPG's client weight decay
    num_prompts: int = 10  # K (pFedPG, FedVPT: 10)
    lowrank_rank: int = 4  # r of FedPGP's U V (FedPGP: 4 or 8 with K = 16)
    fedpgp_mu: float = 1.0  # μ, weight of the knowledge-guided loss (FedPGP: 1)
    fedpgp_temperature: float = 0.5  # τ (FedPGP: 0.5)
    prefix_bottleneck: Optional[int] = None  # m; None = 2/3·D, FedPerfix's 256 for ViT-S's D = 384
    prefix_scale: float = 1.5  # s (FedPerfix: 1.5)
    generator_optimizer: str = "default"  # pFedPG's server: "default" (the library's), "paper" (Eq. 5), SGD or Adam
    generator_lr: float = 1e-3  # pFedPG's server rate α for SGD / Adam (unused by "default" and "paper")
    generator_descriptor_tokens: Optional[int] = None  # None = K (one query per prompt token)
    fraction: float = 1.0  # share of clients per round (seeded sample, at least one client)

    def bottleneck(self, embed_dim: int) -> int:
        """FedPerfix's adapter width m for a backbone of width D (256 at D = 384, i.e. 2/3·D, unless set)."""
        return self.prefix_bottleneck or max(8, round(embed_dim * 2 / 3))


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen ViT: a registered timm name, its overrides, and how it was pre-trained."""

    model: str = "vit_tiny_patch16_224"  # registered timm name; the overrides below make it small
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    global_pool: str = "avg"  # mean of the patch tokens: a from-scratch ViT learns far faster on 900 images
    class_token: bool = False
    checkpoint: Optional[str] = None  # local weights file (then `model` is used as is: no overrides)
    pretrain_epochs: int = 30
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 64
    pretrain_letters: int = 6864  # letter drawings per epoch (6 per glyph), beside the 1,618 training digits
    pretrain_seed: int = 0  # one public backbone for every run seed (the papers' one pre-trained ViT)

    @property
    def is_custom(self) -> bool:
        """True when a real model / checkpoint was given (no size overrides, no pre-training)."""
        return self.checkpoint is not None

    def timm_kwargs(self) -> Dict[str, Any]:
        if self.is_custom:
            return {}
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            global_pool=self.global_pool,
            class_token=self.class_token,
        )


@dataclass(frozen=True)
class DataConfig:
    """How the embedded digits are split (see :mod:`.data`; ignored when ``--data`` gives real folders)."""

    split: str = "domain"  # "domain" (shift families) or "dirichlet" (clean, label skew)
    clients: Optional[int] = None  # None: 8 for domain (4 families x 2), 10 for dirichlet
    families: int = 4  # shift families of --split domain (client c is in family c mod families)
    classes_per_client: int = 5  # --split domain: classes each client holds
    alpha: float = 0.1
    train_per_client: int = 100
    val_per_client: int = 50
    test_per_client: int = 100  # one test image = 1 accuracy point per client
    evaluate: str = "test"  # "test", or "val" for the learning-rate sweep and the pilot (never reported)
    data: Optional[str] = None  # real data: one ImageFolder per client


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; ``asdict`` goes into the JSON."""

    methods: Tuple[str, ...] = ()  # filled by the command line from the methods' tags
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)  # independent repetitions: new split, shift strengths, heads, batches
    threads: int = 1  # torch intra-op threads per process
    workers: int = 1  # parallel processes, each running one (seed, method) at a time
    last_rounds: int = 3  # the reported accuracy is the mean over the last rounds
    eval_every: int = 3  # accuracies are measured every eval_every-th round and in the last rounds (in-process engine)
    engine: str = "local"  # "local" (in-process, worker processes) or "flower" (Flower's simulation runtime)
    out: str = "results"
    cache: str = ""
    probe_convergence: bool = False  # --pilot: repeat FedVPT's last round with twice the local epochs
    rebuild_backbone: bool = False  # --pretrain: pre-train the default backbone anew instead of loading the shipped one
    smoke: bool = False
    budget: Budget = field(default_factory=Budget)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def measured(self, round: int) -> bool:
        """Whether the in-process engine measures the accuracies of ``round`` (0-based): every ``eval_every``-th
        round and the last ``last_rounds`` ones (the table reads only those; the curves show the others too).
        Evaluation only reads the models, so skipping it changes no trained number (``Federation.run_round``)."""
        return (round + 1) % self.eval_every == 0 or round >= self.budget.rounds - self.last_rounds


def smoke(cfg: RunConfig) -> RunConfig:
    """A seconds-long version of ``cfg`` for the test suite: tiny ViT, 3 clients, 2 rounds, little data."""
    return replace(
        cfg,
        smoke=True,
        budget=replace(cfg.budget, rounds=min(cfg.budget.rounds, 2), local_epochs=1, batch_size=16, num_prompts=4,
                       lowrank_rank=2),
        backbone=cfg.backbone if cfg.backbone.is_custom else replace(
            cfg.backbone, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrain_epochs=1,
            pretrain_letters=512,
        ),
        data=replace(cfg.data, clients=cfg.data.clients or 3, families=min(cfg.data.families, 3),
                     train_per_client=32, val_per_client=8, test_per_client=24),
    )


QUICK_ROUNDS = 4


def quick(cfg: RunConfig, rounds_given: bool = False) -> RunConfig:
    """``--quick``: a short look, about 145 CPU-seconds (``QUICK_ROUNDS`` rounds unless ``--rounds`` was given)."""
    if rounds_given:
        return cfg
    return replace(cfg, budget=replace(cfg.budget, rounds=min(cfg.budget.rounds, QUICK_ROUNDS)))
