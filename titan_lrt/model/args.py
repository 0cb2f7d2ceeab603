"""Model arguments: the backbone knobs (DESIGN 2.1) and the LRT pathway (DESIGN 2.2, 2.4).

A plain baseline, the nanochat-like baseline and every LRT variant are the same
class; only these arguments differ. Flavors are named presets sized by depth.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from typing import Optional

from titan_lrt import allowed
from titan_lrt.allowed import setting

LRT_MODES = ("off", "interleaved", "jacobi")
PROJECTIONS = ("shared", "layerwise")
VALUE_EMBED_MODES = ("none", "alternate", "all")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


@dataclass
class LRTArgs:
    """The latent recurrent pathway and the schedule that trains it."""

    mode: str = setting("off", choices=LRT_MODES)
    """Training schedule: "off" (the plain baseline, no pathway), "interleaved"
    (pass 0 + S subset passes, DESIGN 2.4) or "jacobi" (K full passes)."""

    source_layer: int = -1
    """Block whose RMS-normed output is the source state s_t (negative counts
    from the end; -1 is the last block, i.e. the LM head input)."""

    inject_layers: str = "all"
    """Blocks that receive the memory: "all", or indices and ranges such as
    "0,2,8-11"."""

    residual_injection: bool = True
    """Add gamma_l * m_t to the residual stream before each injected block."""

    kv_feedback: bool = True
    """Mix W_K m_t and W_V m_t into each injected block's keys and values."""

    projection: str = setting("shared", choices=PROJECTIONS)
    """Feedback projections W_K, W_V: "shared" by all layers (computed once per
    pass) or "layerwise" (one pair per injected layer)."""

    gamma_init: float = 0.0
    """Initial value of the residual injection scalars gamma_l. 0: the injection starts off and is
    learned; at init s_{t-1} is token t-1's normed embedding, and a positive start can trap a run
    on a plateau (RESULTS.md, seed stability)."""

    reset_at_bos: bool = True
    """Zero the memory at every BOS token, so that memory never crosses packed
    documents (position 0 is always reset)."""

    num_subsets: int = setting(2, ge=1)
    """Interleaved: number S of disjoint position subsets {t : t mod S == i}."""

    kv_refresh: bool = False
    """Interleaved: before each subset pass, re-project the feedback part of the
    buffered K/V at positions not yet refined from the newest source states."""

    detach_buffer: bool = False
    """Interleaved/Jacobi: cut the gradient between passes, so that each pass
    can run its backward as soon as it ends (lower peak memory)."""

    pass0_weight: float = setting(1.0, ge=0)
    """Interleaved: loss weight w_0 of pass 0; loss = (w_0 L_0 + sum_i L_i) / (w_0 + S)."""

    jacobi_passes: int = setting(2, ge=1)
    """Jacobi: number K of full passes (the first one with zero memory)."""

    jacobi_weights: list[float] = field(default_factory=list)
    """Jacobi: loss weight of each pass (empty: equal weights)."""

    # ---- cheaper schedules: which optimizer steps pay for the refinement -------------

    refine_fraction: float = setting(1.0, gt=0, le=1)
    """Fraction p of optimizer steps that run the refinement passes, spread evenly (step s
    refines when floor((s + 1) p) > floor(s p)); the others run pass 0 alone. Cost per
    step on average: 1 + p (full - 1) baseline steps."""

    start_step: int = setting(0, ge=0)
    """Optimizer steps before this one run pass 0 alone (the baseline's cost); the
    configured schedule runs from it on."""

    pass0_backward: bool = True
    """Train pass 0 too. False: on refining steps pass 0 runs without autograd (no loss
    term, no gradient through the buffer), so an interleaved step costs about
    1/3 + 1 baseline steps instead of 2."""

    jacobi_mix: list[float] = field(default_factory=list)
    """Jacobi: probabilities of K = 1, 2, ..., jacobi_passes full passes, drawn per
    optimizer step from the seed (empty: always jacobi_passes). Expected cost per step:
    sum_K p_K K baseline steps."""

    gamma_warmup_steps: int = setting(0, ge=0)
    """Ramp the residual injection in: gamma_l * m_t enters as r * gamma_l * m_t with
    r = min(1, step / N) after `step` optimizer steps (0: off, r = 1). Training,
    evaluation, decoding and export all use the r of the model's step, so a run whose
    pathway disrupts the residual stream early can start from the plain backbone."""

    gate_warmup_steps: int = setting(0, ge=0)
    """The same ramp r = min(1, step / N) on the K/V feedback: W_K m_t and W_V m_t enter the
    keys and values (through the feedback gates) as r * W_K m_t and r * W_V m_t (0: off)."""

    warn_after_steps: int = setting(200, ge=0)
    """Early warning (console and TensorBoard lrt/pathway_warning): from this step on (or from
    the end of the warmups above, if later), warn once when the smoothed merged loss is not
    below pass 0's, i.e. the pathway does nothing or harm (0: off). See titan_lrt.guards."""

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # ---- the shape of a training step (one home for what each mode runs) -----------

    @property
    def pass_names(self) -> list[str]:
        """A name per forward pass of a step, pass 0 first: "pass0", then "subset0".."subset{S-1}"
        (interleaved) or "jacobi1".."jacobi{K-1}" (Jacobi)."""
        if self.mode == "interleaved":
            return ["pass0"] + [f"subset{i}" for i in range(self.num_subsets)]
        if self.mode == "jacobi":
            return ["pass0"] + [f"jacobi{k}" for k in range(1, self.jacobi_passes)]
        return ["pass0"]

    @property
    def num_passes(self) -> int:
        """Forward passes per training step: 1 (off), 1 + S (interleaved), K (Jacobi)."""
        return len(self.pass_names)

    def pass_positions(self, seq_len: int, passes: int | None = None) -> list[range]:
        """Per pass, the positions it computes: all of them for a full pass, P_i = {t : t mod S == i}
        for subset pass i; only the first `passes` passes when given (a step that runs fewer)."""
        if self.mode == "interleaved":
            spans = [range(seq_len)] + [range(i, seq_len, self.num_subsets) for i in range(self.num_subsets)]
        else:
            spans = [range(seq_len)] * self.num_passes
        return spans[:passes]

    @property
    def pass_shapes(self) -> int:
        """Distinct kinds of pass in a step (a compiled graph each): the zero-memory full pass, plus
        one per subset (interleaved) or the full pass with memory (Jacobi, K >= 2)."""
        if self.mode == "interleaved":
            return 1 + self.num_subsets
        return min(self.num_passes, 2)

    @property
    def refreshes_kv(self) -> bool:
        """Whether a step re-projects buffered K/V before subset passes (interleaved, kv_refresh, kv_feedback)."""
        return self.mode == "interleaved" and self.kv_refresh and self.kv_feedback

    def ramps(self, step: Optional[int]) -> tuple[float, float]:
        """(gamma ramp, feedback ramp) of a model after `step` optimizer steps (see
        gamma_warmup_steps, gate_warmup_steps); None (step unknown) means fully on."""
        return warmup_ramp(step, self.gamma_warmup_steps), warmup_ramp(step, self.gate_warmup_steps)

    @property
    def warning_start_step(self) -> Optional[int]:
        """First step the pathway warning checks (None: no check): warn_after_steps after start_step,
        or the end of the ramps when later (a pathway still ramping in is expected to help less)."""
        if not self.enabled or self.warn_after_steps == 0:
            return None
        return max(self.start_step + self.warn_after_steps, self.gamma_warmup_steps, self.gate_warmup_steps)

    def describe(self) -> str:
        """The schedule in a few words: "off", "interleaved S=4" or "jacobi K=2" and its options."""
        detail = {"interleaved": f" S={self.num_subsets}", "jacobi": f" K={self.jacobi_passes}"}.get(self.mode, "")
        if not self.enabled:
            return self.mode
        options = [f"refine_fraction={self.refine_fraction:g}"] if self.refine_fraction < 1 else []
        options += [f"start_step={self.start_step}"] if self.start_step else []
        options += ["pass0_backward=false"] if not self.pass0_backward else []
        options += [f"jacobi_mix={self.jacobi_mix}"] if self.mode == "jacobi" and self.jacobi_mix else []
        return self.mode + detail + (f" ({', '.join(options)})" if options else "")

    # ---- per-step choices of the cheaper schedules (one home: the trainer, the FLOPs
    # accounting and plan_matched all ask here) -----------------------------------------

    def refines_at(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) runs the refinement passes."""
        p = self.refine_fraction
        return self.enabled and step >= self.start_step and math.floor((step + 1) * p) > math.floor(step * p)

    def passes_at(self, step: int, seed: int) -> int:
        """Forward passes of optimizer step `step`: 1 (pass 0 alone) on steps that do not refine,
        else the schedule's (Jacobi with a mix: K drawn from jacobi_mix, deterministic from seed and step)."""
        if not self.refines_at(step):
            return 1
        if self.mode == "jacobi" and self.jacobi_mix:
            draw = random.Random(f"jacobi_mix:{seed}:{step}").random()
            cumulative = 0.0
            for k, p in enumerate(self.jacobi_mix, start=1):
                cumulative += p
                if draw < cumulative:
                    return k
            return len(self.jacobi_mix)
        return self.num_passes

    def trains_pass0(self, passes: int) -> bool:
        """Whether pass 0 runs with autograd in a step of `passes` passes (always when it runs alone)."""
        return self.pass0_backward or passes == 1


@dataclass
class ModelArgs:
    """Backbone sizes and knobs; every field has a default (the `debug` shape)."""

    vocab_size: int = 512
    """Tokenizer vocabulary; the embedding and head are padded to a multiple of 64."""

    n_layers: int = 2
    """Number of transformer blocks (the depth)."""

    dim: int = 64
    """Residual stream width."""

    n_heads: int = 4
    """Query heads; head_dim = dim / n_heads."""

    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention (0: same as n_heads)."""

    mlp_ratio: int = 4
    """MLP hidden width as a multiple of dim (ReLU^2 activation)."""

    rope_base: float = 100000.0
    """RoPE base frequency."""

    max_seq_len: int = 2048
    """Longest position the RoPE table covers (training and generation)."""

    logit_softcap: float = 15.0
    """Logits are capped as c * tanh(logits / c) in fp32 (0 disables)."""

    value_embeds: str = setting("none", choices=VALUE_EMBED_MODES)
    """Token-indexed value embeddings added to V through a gate: "none",
    "alternate" (every other layer, the last included) or "all"."""

    gate_channels: int = 32
    """Input channels of the V/K gates (the first C channels of the block input;
    0: all of dim)."""

    window_pattern: str = "L"
    """Attention windows tiled over layers: "L" full, "S" short (e.g. "SSSL");
    the last layer is always full."""

    short_window: int = 0
    """Width of an "S" window in tokens (0: max_seq_len // 2)."""

    attention_backend: str = setting("auto", choices=ATTENTION_BACKENDS)
    """Attention kernels: "sdpa" (fused SDPA; subset passes merge causal sub-blocks by
    log-sum-exp), "flex" (FlexAttention block masks; GPU only for training, it has
    no CPU backward) or "auto" (flex for subset passes and windows on CUDA, sdpa
    elsewhere)."""

    x0_init: float = 0.1
    """Initial b_l in x = a_l * x + b_l * x0 (a_l starts at 1)."""

    head_init_std: float = 0.001
    """Standard deviation of the LM head's initial weights (small init)."""

    bos_token_id: int = 0
    """Id of the document-start token (set from the tokenizer)."""

    lrt: LRTArgs = field(default_factory=LRTArgs)
    """The latent recurrent pathway and its training schedule."""

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    @property
    def source_layer_index(self) -> int:
        return self.source_layer_of(self.lrt.source_layer)

    def source_layer_of(self, index: int) -> int:
        return index % self.n_layers

    def injected_layers(self) -> list[int]:
        """Sorted block indices that receive the memory (empty when LRT is off)."""
        if not self.lrt.enabled:
            return []
        return parse_layer_set(self.lrt.inject_layers, self.n_layers)

    def has_value_embed(self, layer: int) -> bool:
        if self.value_embeds == "all":
            return True
        if self.value_embeds == "alternate":
            return layer % 2 == (self.n_layers - 1) % 2
        return False

    def window(self, layer: int) -> int:
        """Attention window of a layer in tokens (0: full causal)."""
        if layer == self.n_layers - 1:
            return 0
        char = self.window_pattern[layer % len(self.window_pattern)]
        if char == "L":
            return 0
        return self.short_window or self.max_seq_len // 2

    def replace(self, **changes) -> ModelArgs:
        lrt = changes.pop("lrt", None)
        new = dataclasses.replace(self, lrt=dataclasses.replace(lrt or self.lrt), **changes)
        return new

    def validate(self) -> None:
        """Fail with one clear message on a value its field does not allow or an inconsistent combination."""
        _check_fields(self, "model")
        _check_fields(self.lrt, "lrt")
        _check(self.dim % self.n_heads == 0, f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        _check(
            self.n_kv_heads >= 0 and self.n_heads % self.kv_heads == 0,
            f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}",
        )
        _check(
            self.window_pattern and set(self.window_pattern) <= {"S", "L"},
            f"model.window_pattern={self.window_pattern!r}: use only the letters S and L",
        )
        _check(
            0 <= self.gate_channels <= self.dim,
            f"model.gate_channels={self.gate_channels} must be in [0, dim={self.dim}]",
        )
        _check(
            0 <= self.bos_token_id < self.vocab_size, f"model.bos_token_id={self.bos_token_id} outside the vocabulary"
        )
        lrt = self.lrt
        _check(
            -self.n_layers <= lrt.source_layer < self.n_layers,
            f"lrt.source_layer={lrt.source_layer}: allowed -{self.n_layers}..{self.n_layers - 1}",
        )
        _check(
            not lrt.jacobi_weights or len(lrt.jacobi_weights) == lrt.jacobi_passes,
            f"lrt.jacobi_weights has {len(lrt.jacobi_weights)} entries, lrt.jacobi_passes={lrt.jacobi_passes}",
        )
        _check(
            not lrt.jacobi_mix or (lrt.mode == "jacobi" and len(lrt.jacobi_mix) == lrt.jacobi_passes),
            f"lrt.jacobi_mix={lrt.jacobi_mix}: needs lrt.mode='jacobi' and one probability per K = 1.."
            f"lrt.jacobi_passes={lrt.jacobi_passes}",
        )
        _check(
            all(p >= 0 and math.isfinite(p) for p in lrt.jacobi_mix)
            and (not lrt.jacobi_mix or abs(sum(lrt.jacobi_mix) - 1) < 1e-6),
            f"lrt.jacobi_mix={lrt.jacobi_mix}: probabilities must be >= 0 and sum to 1",
        )
        if lrt.enabled:
            _check(
                lrt.residual_injection or lrt.kv_feedback,
                "lrt: residual_injection and kv_feedback are both off, so the memory has no way in",
            )
            parse_layer_set(lrt.inject_layers, self.n_layers)


def warmup_ramp(step: Optional[int], steps: int) -> float:
    """r = min(1, step / steps): the one formula of the pathway's warmups (1 when steps = 0 or
    the step is unknown)."""
    if steps == 0 or step is None:
        return 1.0
    return min(1.0, step / steps)


def parse_layer_set(spec: str, n_layers: int) -> list[int]:
    """Parse "all" or comma-separated indices and ranges such as "0,2,5-7"."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        lo = int(match.group(1)) if match else -1
        hi = int(match.group(2) or lo) if match else -1
        if not match or not 0 <= lo <= hi < n_layers:
            raise ValueError(
                f'lrt.inject_layers={spec!r}: expected "all" or indices/ranges like "0,2,5-7" within 0..{n_layers - 1}'
            )
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def _check(ok, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_fields(args, section: str) -> None:
    """Each field's own allowed values (see titan_lrt.allowed)."""
    for f in dataclasses.fields(args):
        wrong = allowed.message(f"{section}.{f.name}", getattr(args, f.name), f.metadata)
        if wrong:
            raise ValueError(wrong)


def args_from_depth(depth: int, **overrides) -> ModelArgs:
    """nanochat sizing: dim = depth * 64 rounded up to a multiple of the 128 head dim."""
    head_dim = 128
    dim = -(-depth * 64 // head_dim) * head_dim
    base = dict(n_layers=depth, dim=dim, n_heads=dim // head_dim, vocab_size=32768, value_embeds="all")
    base.update(overrides)
    return ModelArgs(**base)


FLAVORS: dict[str, ModelArgs] = {
    "debug": ModelArgs(),
    "d4": args_from_depth(4),
    "d8": args_from_depth(8),
    "d12": args_from_depth(12),
    "d20": args_from_depth(20),
    "d24": args_from_depth(24),
}
"""Named presets. `debug` is a two-layer toy for tests; `dN` follow nanochat's
depth sizing (value embeddings on every layer, as the paper's LRT uses them);
`d20` is the paper's 1.3B setting."""
