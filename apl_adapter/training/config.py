"""TrainConfig: every setting of an APL training run, with the paper's defaults."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from ..errors import APLAdapterError
from ..families import PipelineFamily

#: settings a resumed run may change (``TrainConfig.differences`` ignores them)
LRSchedule = Literal["constant", "cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
#: diffusers' schedules that need nothing beyond warm-up and the step count ('piecewise_constant' needs rules)
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)
RESUMABLE_CHANGES = frozenset(
    {
        "out", "steps", "resume", "resume_with_new_settings", "checkpoint_every", "checkpoints_total_limit",
        "log_every", "gradient_checkpointing", "report_to", "validation_prompts", "validation_every", "push_to_hub",
    }
)  # fmt: skip
#: run bookkeeping, not part of what made a prefix (``TrainConfig.recipe`` leaves these out)
BOOKKEEPING = RESUMABLE_CHANGES - {"steps", "gradient_checkpointing"}


@dataclass
class TrainConfig:
    """Settings of :func:`apl_adapter.training.train`. Defaults follow the paper (Adam, lr 1e-3, batch 1, m = 10).

    Example:

    ```python
    >>> from apl_adapter.training import TrainConfig
    >>> TrainConfig(base="sd15", data="apl-data", out="runs/apl", steps=2000, batch_size=4).c2
    'attribute'

    ```
    """

    base: str = field(
        metadata={"help": "Local diffusers folder of the base model (model_index.json, unet/, vae/ ...)."}
    )
    data: str = field(
        metadata={"help": "Training data folder: metadata.jsonl + images (see apl_adapter.training.data)."}
    )
    out: str = field(metadata={"help": "Run folder: adapter/ (final), checkpoint-N/, loss.csv, train_config.json."})
    steps: int = field(default=1000, metadata={"help": "Optimizer steps in total (a resumed run continues to this)."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (the paper: 1e-3)."})
    lr_schedule: LRSchedule = field(
        default="constant",
        metadata={
            "help": "diffusers' learning-rate schedule over --steps (diffusers.optimization.get_scheduler): 'constant' "
            "(the paper), 'cosine' (decay from lr to 0 at the last step), 'linear', 'constant_with_warmup', "
            "'cosine_with_restarts', 'polynomial'."
        },
    )
    lr_warmup_steps: int = field(
        default=0,
        metadata={"help": "Steps of linear warm-up from 0 to lr at the start of the schedule (0 = none, the paper)."},
    )
    prefix_len: int = field(default=10, metadata={"help": "Prefix length m (the paper: 10)."})
    prefix_init: Literal["random_uniform", "text", "vocab"] = field(
        default="random_uniform",
        metadata={
            "help": "Prefix initialisation: 'random_uniform' = U[0,1) (the authors), 'text' = the token embeddings of "
            "prefix_init_text (repeated to m), 'vocab' = m random vocabulary rows."
        },
    )
    prefix_init_text: str | None = field(
        default=None,
        metadata={"help": "Phrase for prefix_init='text', tokenized with the base folder's tokenizer (e.g. 'a')."},
    )
    prefix_depth: Literal["shallow", "deep"] = field(
        default="shallow",
        metadata={
            "help": "'shallow' = the paper (the m input vectors only); 'deep' = also learned keys and values at "
            "every encoder layer (prefix-tuning), starting from what the shallow prefix gives."
        },
    )
    hide_prefix_rows: bool = field(
        default=False,
        metadata={
            "help": "The UNet never sees the prefix's own output rows: the encoder returns [BOS][prompt][EOS][pad] "
            "(each prompt row computed behind the prefix), trained and saved that way (APLConfig.hide_prefix_rows). "
            "The paper shows those rows to every prompt, and they move scenes too; --text-preserve then holds "
            "everything a scene prompt gives the UNet."
        },
    )
    loss_space: Literal["eps", "v"] = field(
        default="eps",
        metadata={
            "help": "'eps' = the paper's loss; 'v' = the same difference in v-space (divided by alpha_bar_t), "
            "weighting large t far more. Measured on the world: v anonymizes less than eps (experiments, 2026-12-03). "
            "SD3 / FLUX (flow matching; the transformer predicts the velocity v = noise - z0): 'eps' = the paper's "
            "loss under the change of variable, (1 - sigma)^2 ||v(AP+c1) - v(c2)||^2 per example; 'v' = the plain "
            "velocity difference, weighted as the pipeline itself is trained (docs/sd3_flux.md)."
        },
    )
    encoders: list[str] = field(
        default_factory=list,
        metadata={
            "metavar": "ENCODER",
            "help": "SD3 / FLUX: the text encoders that get a prefix, trained jointly, by pipeline attribute (SD3: "
            "text_encoder = CLIP-L, text_encoder_2 = CLIP-G, text_encoder_3 = T5; FLUX: text_encoder = CLIP, "
            "text_encoder_2 = T5). Default: all of them. SD 1.x / 2.x has text_encoder only.",
        },
    )
    timestep_density: Literal["logit_normal", "uniform"] | None = field(
        default=None,
        metadata={
            "help": "SD3 / FLUX: how noise levels sigma are drawn, as diffusers' SD3 / FLUX training scripts do: "
            "'logit_normal' = sigmoid(N(0, 1)) (SD3's paper, the default), 'uniform' = U[0, 1); either indexes the "
            "scheduler's own (shifted) training grid. SD 1.x / 2.x draws t ~ U{0..999} (the paper)."
        },
    )
    guidance: float | None = field(
        default=None,
        metadata={
            "help": "FLUX.1-dev (guidance-distilled): the guidance value given to the transformer for both the "
            "prefixed prediction and its target (default 3.5, FluxPipeline's). Not for SD, SD3 or FLUX.1-schnell."
        },
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={
            "help": "SD3 / FLUX: the T5 window, as the pipeline's max_sequence_length (default: SD3 256, FLUX 512; "
            "FLUX.1-schnell uses 256). Train with the window you will sample with."
        },
    )
    identity_push: float = field(
        default=0.0,
        metadata={
            "help": "eta >= 0: identity targets eps(c2) - eta (eps(c1) - eps(c2)), pushed away from what the plain "
            "name prompt predicts (ESD's negative guidance; 0 = the paper). On the world with a deep prefix, 0.3 takes "
            "seen names down 16x but keeps fewer coarse attributes (67%); a shallow prefix loses scenes with it."
        },
    )
    push_from: Literal["name", "name_and_description"] = field(
        default="name",
        metadata={
            "help": "What the identity push moves away from: 'name' = eps(c1), the plain name prompt; "
            "'name_and_description' = eps of the name followed by its description ('a photo of <Name>, <c2's "
            "description>'), so the push direction holds the stated attributes fixed and keeps only what the name "
            "adds. Sampling with the push target itself on the world: attributes 85% -> 92.5% at eta 0.3 and 32.5% -> "
            "68.8% at eta 1; trained (deep, push 0.3, seed 0) seen names keep 90% of attributes but unseen names fall "
            "only 2.1x: the shared part it removes is what generalizes (experiments 2026-12-03-attributes-mechanism)."
        },
    )
    text_match: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: also pull the prefixed name's text-encoder output toward its description's, "
            "lambda * mean ||tau([AP] + c1) - tau(c2)||^2 over identity rows (0 = the paper; needs --c2 attribute). "
            "A target in the encoder's space, the same for every UNet that shares the encoder. Measured with push 0.3 "
            "(deep, seed 0): attributes 60.3% at 0.01, 70.6% at 0.1 with seen falling only 4.7x; no better than the "
            "push alone (66.9%) (experiments 2026-12-03-attributes-mechanism)."
        },
    )
    name_direction: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: also penalize the share r of the name's own direction d = eps(c1) - eps(c2) that the "
            "prefixed prediction keeps beyond its target's (-eta): lambda * mean (r + eta)^2 over identity rows, r = "
            "<eps([AP]+c1) - eps(c2), d> / ||d||^2 (0 = the paper). A ratio per row, so large t, where d is small "
            "and the eps loss leaves r at 0.2-0.4 (more on the sibling model), counts as much as small t. Measured "
            "(deep, seed 0; seen / unseen / late / transfer falls, attributes): push 0.3 alone 16/10/5/5.6x, 67%; "
            "+ 0.003: 20/15/8/11x, 51%; + 0.03: all to ~0, 25%; push 0 + 0.01: 49/2.9/8/4.1x, 63% "
            "(experiments 2026-12-03-training-variance)."
        },
    )
    guidance_relative: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: also penalize the whole identity error relative to the description's own guidance, "
            "lambda * mean ||eps([AP]+c1) - target||^2 / ||eps(c2) - eps('')||^2 over identity rows (0 = the paper). "
            "--name-direction holds the error along the name's direction only; across it the shipped prefix's "
            "error is 0.5-0.9 of the description's guidance at every t. Measured with the shipped recipe (seed 0; "
            "seen / unseen / late / transfer falls, attributes): without 20/15/8/11x, 51%; 0.01: 14/12/8/8.8x, 53%; "
            "0.03: 16/12/8/10x, 53%: the error across shrank about 15% and the name share kept rose, no gain "
            "(experiments 2026-12-04-attributes-ceiling)."
        },
    )
    attribute_hold: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: keep each stated attribute's pull in the prefixed prediction, lambda * mean_k s_k^2 "
            "over identity rows (0 = the paper): a_k = eps(c2) - mean eps(c2 with attribute k changed), s_k = "
            "<eps([AP]+c1) - eps(c2), a_k> / ||a_k||^2 (0 = kept). Needs c2_contrasts in the data (apl-world data "
            "writes them) and --c2 attribute; adds a UNet pass per contrast prompt of each identity row. On the "
            "world the shipped prefix loses 16-46% of each attribute's pull at t >= 667. Measured with the shipped "
            "recipe (seed 0; seen / unseen / late / transfer falls, attributes): + 0.03: 4.7/3.0/5.7/2.6x, 83%; "
            "with --name-direction 0.03 + 0.1: 16/3.8/6.7/4.8x, 68%: attributes come back, and names with them "
            "(experiments 2026-12-04-attributes-ceiling)."
        },
    )
    text_attribute_hold: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: --attribute-hold measured in the text encoder's output instead of the UNet's "
            "prediction: each stated attribute's pull b_k = m(tau(c2)) - mean m(tau(c2 with attribute k changed)), m "
            "the mean over positions, and lambda * mean_k s_k^2 with s_k the share of b_k that m(tau([AP] + c1)) loses "
            "(0 = the paper). What the encoder writes every UNet sharing it reads, so it keeps attributes on models "
            "the prefix never trained through. Needs c2_contrasts and --c2 attribute; costs one encoder pass per "
            "contrast prompt. Measured with push 0.3 without the attributes' pulls (bench seed 0, training seeds 0 / "
            "1; seen / unseen / late / transfer falls, attributes): without 19.6/60/8/16.7x, 62.8% / 12/5.5/inf/6.5x, "
            "60.3%; + 0.03: 98/60/13/8.8x, 73.6% / 20/60/40/6.5x, 74.4% (the sibling's tan skin 63% -> 86%); + 0.1: "
            "9.8/30/inf/4.1x, 82.5%. Held out (seeds 500 / 501, 0.03): attributes 66% -> 76%, falls kept, the "
            "sibling's scenes -2.5 points (experiments 2026-12-05-where-attributes-go)."
        },
    )
    text_name_direction: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: --name-direction measured in the text encoder's output instead of the UNet's "
            "prediction: d = m(tau(c1)) - m(tau(c2)) (c1 or --push-from's prompt; m the mean over positions; the "
            "attributes' pulls projected out with --push-without-attributes) and lambda * mean (r + eta)^2, r the "
            "share of d that m(tau([AP] + c1)) "
            "keeps (0 = the paper; needs --c2 attribute). A name taught to a UNet after the prefix (DreamBooth) is "
            "read only through what the encoder writes: across five prefixes with hidden rows the late names' text "
            "share r (0.10 ... 0.63) ordered their fall on the DreamBooth model (5.5x ... 1.3x). Measured with rows "
            "hidden (bench seed 0; seen / unseen / late / transfer falls, attributes): without (text preserve 0.01) "
            "to 0/7.4/3.7/24x, 85%; + 0.01: to 0/20/6.6/73x, 80%; + 0.03: 92/20/6.6/146x, 77% (base scenes -4.7); "
            "the shipped prefix (+ 0.01, text preserve 0.03, text attribute hold 0.1): to 0/59/6.6/146x, 80%, held "
            "out (seeds 500 / 501) 92/20/4.8/37x, 83% (experiments 2026-12-06-text-name-direction)."
        },
    )
    text_preserve: float = field(
        default=0.0,
        metadata={
            "help": "lambda >= 0: also keep prompts without a name (the preservation rows) where they were in the "
            "text encoder's output, lambda * mean ||tau([AP] + c)[m+1:] - tau_m(c)||^2 with tau_m the plain encoder "
            "at the positions the prefix moves the prompt to (0 = the paper; the prefix's own rows are not compared). "
            "Every prefix the eps loss trained moved scene captions' states about as far as changing their colour "
            "word (the 10-position shift alone: 0.7 of one, and no scene lost to it); what the encoder keeps, every "
            "UNet sharing it keeps (experiments 2026-12-05-text-preservation)."
        },
    )
    push_without_attributes: bool = field(
        default=False,
        metadata={
            "help": "Push along the name's direction with each stated attribute's pull projected out (least "
            "squares; the pulls as --attribute-hold measures them): the target moves away from the name without "
            "moving the attributes the description states. Needs --identity-push > 0, --c2 attribute and "
            "c2_contrasts in the data. On the world the shipped recipe's skin changes are all on tan-skinned people "
            "(the middle tone); sampling with the push target itself (seen names, 80 images): at eta 0.3 attributes "
            "85% -> 96%, tan skin 80% -> 95%, names 0% either way. The shipped prefix uses it: held out, attributes "
            "48% -> 66% and the sibling's scenes kept, every fall past its goal (experiments "
            "2026-12-04-recognizer-gate)."
        },
    )
    also_through: list[str] = field(
        default_factory=list,
        metadata={
            "metavar": "FOLDER",
            "help": "Other UNets that share the base's text encoder (local diffusers folders with unet/, or UNet "
            "folders), to train through as well: the loss is the mean over the base UNet and these, each against its "
            "own targets, so the prefix meets more than one UNet (beyond the paper; each one adds a base UNet's cost "
            "to a step). Measured on the world (deep, push 0.3, seed 0, through the auxiliary model): no gain; the "
            "name share kept on the sibling at t >= 800 was 0.32 (0.28 and 0.42 without it, two training seeds) and "
            "transfer fell 3.3x, inside the 2.7-5.6x that training seeds alone give (experiments 2026-12-03-training-"
            "variance).",
        },
    )
    attribute_boost: float = field(
        default=0.0,
        metadata={
            "help": "beta >= 0: identity targets also move further along the description, + beta (eps(c2) - eps('')) "
            "(0 = the paper; needs --c2 attribute). Tried against the push's attribute loss and measured worse on "
            "the world (attributes 66.9% -> 63.3% -> 59.4% at beta 0 / 0.3 / 1 with push 0.3; experiments 2026-12-03)."
        },
    )
    c2: Literal["attribute", "empty"] = field(
        default="attribute",
        metadata={"help": "Identity target: 'attribute' = the row's description (paper figure), 'empty' = ''."},
    )
    identity_fraction: float = field(
        default=0.5, metadata={"help": "Probability that a batch element is an identity triplet (the paper: 0.5)."}
    )
    batch_size: int = field(default=1, metadata={"help": "Examples per step and process (the paper: 1)."})
    seed: int = field(default=0, metadata={"help": "Seed of the prefix init and of every step's sampling."})
    checkpoint_every: int = field(default=0, metadata={"help": "Save checkpoint-N every N steps (0 = only at end)."})
    checkpoints_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many checkpoint-N folders; older ones are deleted (default: keep all)."},
    )
    resume: str | None = field(
        default=None, metadata={"help": "A checkpoint-N folder to continue from, or 'latest' (newest in --out)."}
    )
    resume_with_new_settings: bool = field(
        default=False,
        metadata={
            "help": "Let --resume continue with settings that differ from the run's train_config.json (lr, seed, "
            "data ...); without it such a resume is refused, naming the fields."
        },
    )
    resolution: int | None = field(
        default=None, metadata={"help": "Resize images to this square size; default: they must match the model."}
    )
    latent_mode: Literal["sample", "mean"] = field(
        default="sample", metadata={"help": "z0 = a VAE posterior sample per step (the authors) or its mean."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no",
        metadata={
            "help": "Autocast precision (Accelerate); frozen weights stay in their dtype (SD 1.x / 2.x), or are loaded "
            "in it (SD3 / FLUX: 2-12 B frozen parameters); the prefixes stay fp32."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute UNet/encoder activations in backward: less memory, slower (SD3 / FLUX: the "
            "transformer's; T5 is left alone, its dropout would switch on in training mode)."
        },
    )
    log_every: int = field(default=1, metadata={"help": "Write the loss to loss.csv (and the trackers) every N steps."})
    report_to: str = field(
        default="auto",
        metadata={
            "help": "Experiment trackers (Accelerate's): 'tensorboard', 'wandb', 'comet_ml', 'mlflow', ... or a comma "
            "list, 'all' (every one installed), 'none', or 'auto' (tensorboard when installed, else none). Logs go "
            "under <out>/trackers."
        },
    )
    validation_prompts: list[str] = field(
        default_factory=list,
        metadata={
            "metavar": "PROMPT",
            "help": "Prompts drawn without and with the prefix from the same seed (DDIM 20, CFG 7) into "
            "<out>/validation/step-N.png (a row per prompt: without | with); give a name and a scene.",
        },
    )
    validation_every: int = field(
        default=0, metadata={"help": "Draw the validation prompts every N steps as well as at the end (0 = end only)."}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "metavar": "REPO_ID",
            "help": "After training, upload adapter/ (weights, config, model card) to this Hugging Face Hub repo, e.g. "
            "'my-org/apl-sd15' (created if missing; needs the network and a token, e.g. from huggingface-cli login). "
            "The adapter is saved locally first, so a failed upload loses nothing.",
        },
    )

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.prefix_len >= 1, f"prefix_len must be >= 1, got {self.prefix_len}"),
            (
                0.0 <= self.identity_fraction <= 1.0,
                f"identity_fraction must be in [0, 1], got {self.identity_fraction}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (
                self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
                f"checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}",
            ),
            (self.validation_every >= 0, f"validation_every must be >= 0, got {self.validation_every}"),
            (
                not (self.validation_every and not self.validation_prompts),
                "validation_every needs validation_prompts (--validation-prompts 'a photo of <Name>' 'a red cube')",
            ),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
            ),
            (
                0 <= self.lr_warmup_steps < self.steps,
                f"lr_warmup_steps must be in [0, steps), got {self.lr_warmup_steps} with steps={self.steps}",
            ),
            (
                not (self.lr_warmup_steps and self.lr_schedule == "constant"),
                "'constant' has no warm-up: use --lr-schedule constant_with_warmup (or another) with --lr-warmup-steps",
            ),
            (
                self.prefix_init != "text" or bool(self.prefix_init_text),
                "prefix_init='text' needs prefix_init_text (--prefix-init-text), e.g. 'a photo of'",
            ),
            (
                self.prefix_init == "text" or self.prefix_init_text is None,
                f"prefix_init_text is read only with prefix_init='text' (--prefix-init text), got {self.prefix_init!r}",
            ),
            (
                self.prefix_depth in ("shallow", "deep"),
                f"prefix_depth must be 'shallow' or 'deep', got {self.prefix_depth!r}",
            ),
            (self.identity_push >= 0, f"identity_push must be >= 0, got {self.identity_push}"),
            (self.attribute_boost >= 0, f"attribute_boost must be >= 0, got {self.attribute_boost}"),
            (self.text_match >= 0, f"text_match must be >= 0, got {self.text_match}"),
            (self.name_direction >= 0, f"name_direction must be >= 0, got {self.name_direction}"),
            (self.guidance_relative >= 0, f"guidance_relative must be >= 0, got {self.guidance_relative}"),
            (self.attribute_hold >= 0, f"attribute_hold must be >= 0, got {self.attribute_hold}"),
            (self.text_attribute_hold >= 0, f"text_attribute_hold must be >= 0, got {self.text_attribute_hold}"),
            (self.text_preserve >= 0, f"text_preserve must be >= 0, got {self.text_preserve}"),
            (self.text_name_direction >= 0, f"text_name_direction must be >= 0, got {self.text_name_direction}"),
            (
                not (self.text_name_direction and self.c2 == "empty"),
                "text_name_direction measures the name against its description, so it needs --c2 attribute",
            ),
            (
                not (self.text_attribute_hold and self.c2 == "empty"),
                "text_attribute_hold keeps the attributes c2 states, so it needs --c2 attribute",
            ),
            (
                not (self.attribute_hold and self.c2 == "empty"),
                "attribute_hold keeps the attributes c2 states, so it needs --c2 attribute",
            ),
            (
                not self.push_without_attributes or (self.identity_push > 0 and self.c2 == "attribute"),
                "push_without_attributes shapes the push away from the name, so it needs --identity-push > 0 and "
                "--c2 attribute (the attributes come from c2)",
            ),
            (
                not (self.text_match and self.c2 == "empty"),
                "text_match needs c2='attribute' (an empty target has no description to encode like)",
            ),
            (
                self.push_from in ("name", "name_and_description"),
                f"push_from must be 'name' or 'name_and_description', got {self.push_from!r}",
            ),
            (
                self.push_from == "name" or (self.identity_push > 0 and self.c2 == "attribute"),
                "push_from='name_and_description' needs --identity-push > 0 and --c2 attribute (the description comes "
                "from c2)",
            ),
            (
                not (self.attribute_boost and self.c2 == "empty"),
                "attribute_boost needs c2='attribute' (an empty target has no description to boost)",
            ),
            (self.loss_space in ("eps", "v"), f"loss_space must be 'eps' or 'v', got {self.loss_space!r}"),
            (self.c2 in ("attribute", "empty"), f"c2 must be 'attribute' or 'empty', got {self.c2!r}"),
            (
                self.timestep_density in (None, "logit_normal", "uniform"),
                f"timestep_density must be 'logit_normal' or 'uniform', got {self.timestep_density!r}",
            ),
            (self.guidance is None or self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}"),
            (
                self.max_sequence_length is None or self.max_sequence_length >= 1,
                f"max_sequence_length must be >= 1, got {self.max_sequence_length}",
            ),
            (
                self.latent_mode in ("sample", "mean"),
                f"latent_mode must be 'sample' or 'mean', got {self.latent_mode!r}",
            ),
            (
                self.resolution is None or self.resolution % 8 == 0,
                f"resolution must be a multiple of 8: {self.resolution}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise APLAdapterError(message)

    def recipe(self) -> dict:
        """The settings that made a prefix, for its model card (folders by name only, run bookkeeping left out)."""
        recipe = {k: v for k, v in asdict(self).items() if k not in BOOKKEEPING and v is not None}
        recipe["base"], recipe["data"] = Path(self.base).name, Path(self.data).name
        if self.also_through:
            recipe["also_through"] = [Path(folder).name for folder in self.also_through]
        else:
            del recipe["also_through"]  # recipes from before the option read the same
        if not self.encoders:
            del recipe["encoders"]  # all of them; SD 1.x recipes read as before the option
        defaults = option_defaults()
        for name in (*FLOW_ONLY_OPTIONS, "hide_prefix_rows"):  # at their defaults they say nothing (recipes read
            # as before these options)
            if name in recipe and recipe[name] == defaults[name]:
                del recipe[name]
        return recipe

    def differences(self, saved: dict) -> list[str]:
        """The settings that differ from a run's saved ``train_config.json`` and would change what it trains.

        The run folder (a run may be moved), the step budget, checkpoint and log cadence, gradient checkpointing and
        the resume options may change.
        """
        mine = asdict(self)
        changed = []
        for name, value in mine.items():
            if name in RESUMABLE_CHANGES or name not in saved:
                continue
            old = saved[name]
            if name in ("base", "data"):  # the same folder written two ways
                value, old = str(Path(value).resolve()), str(Path(str(old)).resolve())
            elif name == "also_through" and isinstance(old, list):
                value, old = [str(Path(v).resolve()) for v in value], [str(Path(str(v)).resolve()) for v in old]
            if value != old:
                changed.append(f"{name} ({saved[name]!r} -> {mine[name]!r})")
        return changed

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


#: the options of SD 1.x / 2.x training that the flow loop does not port, each with what it would need
SD_ONLY_OPTIONS: dict[str, str] = {
    "prefix_depth": "a deep prefix (learned keys and values per layer; T5 has no prompt-independent start, and the "
    "CLIP encoders' deep prefix is not wired into SD3 / FLUX training)",
    "hide_prefix_rows": "hidden prefix rows (not wired into SD3 / FLUX training; T5 attends both ways)",
    "identity_push": "the identity push (the plain name prompt's prediction to push from; written for the SD 1.x eps "
    "loss)",
    "push_from": "push_from (part of the identity push)",
    "attribute_boost": "the attribute boost (written for the SD 1.x eps loss)",
    "text_match": "the text-encoder match term (one encoder's output; SD3 / FLUX join several)",
    "name_direction": "the name-direction term (written for the SD 1.x eps loss)",
    "guidance_relative": "the guidance-relative term (an unconditional prediction per step; FLUX has no such branch)",
    "attribute_hold": "the attribute hold (written for the SD 1.x eps loss)",
    "push_without_attributes": "push_without_attributes (written for the SD 1.x eps loss)",
    "text_attribute_hold": "the text attribute hold (one encoder's output; SD3 / FLUX join several)",
    "text_name_direction": "the text name-direction term (one encoder's output; SD3 / FLUX join several)",
    "text_preserve": "the text preservation term (one CLIP encoder's output and positions; SD3 / FLUX join several)",
    "also_through": "training through other denoisers",
    "resume": "resuming (no SD3 / FLUX checkpoints are written yet)",
    "checkpoint_every": "intermediate checkpoints",
    "checkpoints_total_limit": "checkpoint pruning (no checkpoints are written yet)",
    "validation_prompts": "validation images",
    "validation_every": "validation images",
    "push_to_hub": "uploading a per-encoder adapter folder to the Hub",
}
#: options that only mean something for SD3 / FLUX
FLOW_ONLY_OPTIONS = ("timestep_density", "guidance", "max_sequence_length")


def option_defaults() -> dict:
    """``{field name: default}`` of :class:`TrainConfig` (``MISSING`` for the required ones)."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(TrainConfig)}


def refuse_options(config: TrainConfig, family: PipelineFamily | None) -> None:
    """A clear error for every option set away from its default that ``family``'s loop does not implement (``None``
    = Stable Diffusion 1.x / 2.x), instead of doing something else silently."""
    defaults = option_defaults()

    def is_set(name: str) -> bool:
        return bool(getattr(config, name) != defaults[name])

    if family is None:
        given = [name for name in FLOW_ONLY_OPTIONS if is_set(name)]
        if config.encoders and config.encoders != ["text_encoder"]:
            given.append("encoders")
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise APLAdapterError(
                f"{flags}: for SD3 / FLUX folders only; {config.base} is a Stable Diffusion 1.x / 2.x folder (one "
                "text encoder, eps prediction, t ~ U{0..999}). Leave them out."
            )
        return
    given = [name for name in SD_ONLY_OPTIONS if is_set(name)]
    if given:
        what = "; ".join(f"--{name.replace('_', '-')}: {SD_ONLY_OPTIONS[name]}" for name in given)
        raise APLAdapterError(
            f"{config.base} is a {family.title} folder, and apl-train on {family.title} does not implement: {what}. "
            "Leave these options out (they work on Stable Diffusion 1.x / 2.x folders)."
        )
