"""`lvr plan`: memory per rank of a recipe's steps, and the largest video that fits.

    lvr plan RECIPE [dotted.key=value ...] [--gpu h100-80g ...] [--model HUB_ID] [--against BENCH.json]

For an `sft`, `rl` or `bench-mrsp` recipe it adds up, per rank, the formulas of
`stages/plan_model.py`: parameters, gradients and optimizer state (by ZeRO stage), the
activations per token (with and without gradient checkpointing, at the recipe's SP size),
the rollout KV cache, the cached video embeddings and the transient peaks of each phase of a
step (vision encode, rollout, old/reference forwards, update), for MR-SP as the recipe sets it
and for the vanilla way (no SP, a re-encode per sequence, G separate prefills, G whole
sequences in the training forward); then the largest frame count each fits in a GPU.

The model's sizes come from its config (transformers' AutoConfig, read from a local folder,
the hub cache, or a `tiny:` build; never the network), its parameter counts from the model
built on the meta device. A hub id not cached here falls back to `KNOWN_MODELS`, the
published config, and the output says so. Video tokens per frame follow the patch grid:
`video.max_pixels` (or the bench's frame size) / (patch x merge)^2 per temporal patch.

What the numbers are: what the CUDA allocator would have allocated at the step's peak
(`torch.cuda.max_memory_allocated`), not counting the CUDA context, NCCL's buffers or the
allocator's fragmentation (`RESERVE_GIB` is kept free for them). On CPU, `lvr bench-mrsp`
measures the growth of the resident set above a step's start: weights are loaded before the
step, so `step_growth` (without weights) is what compares with it, and only with glibc's
mmap threshold fixed (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072, as bench-components
and a bench-mrsp run with a memory cap set it): with the default, dynamic threshold, glibc keeps freed activations in its heap and
the growth overstates live memory by 1.3-2.2x (see the README's planner section).

Departures from the real thing: every response is as long as the recipe allows; SFT targets
are `SFT_TARGET_TOKENS` long; the prompt's text is `PROMPT_TEXT_TOKENS` tokens; DeepSpeed's
buffers are its documented defaults, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from stages import plan_model as pm
from stages.plan_model import GIB, Dims

SFT_TARGET_TOKENS = 1024  # assumed length of a CoT target (reasoning + answer)
PROMPT_TEXT_TOKENS = 200  # assumed text around the video: chat template, question, options
BENCH_TEXT_TOKENS = 118  # the bench's fixed question: prompt_tokens - video_tokens in its JSON
MAX_FRAMES = 1 << 17


@dataclass(frozen=True)
class Gpu:
    name: str
    total_gib: float  # what torch reports as total capacity (about)
    cuda: bool = True

    @property
    def reserve_gib(self) -> float:
        """Kept free: CUDA context, NCCL buffers, allocator fragmentation (GPU); the interpreter
        and libraries of each process (CPU)."""
        return 2.0 if self.cuda else 0.5


GPUS = {
    "a100-80g": Gpu("NVIDIA A100 80GB", 79.1),
    "h100-80g": Gpu("NVIDIA H100 80GB", 79.1),
    "h200": Gpu("NVIDIA H200 141GB", 139.8),
    "cpu-24g": Gpu("CPU, 24 GiB RAM shared by the node's ranks", 24.0, cuda=False),
}


# -- one step's memory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One way of running one step, everything a count: what `breakdown` needs."""

    label: str
    b: int  # bytes of the model dtype
    cpu: bool
    sp: int
    world: int
    zero_stage: int | str | None  # None: torch AdamW without DeepSpeed; "fsdp2": train.engine = "fsdp2"
    trainable: int
    reference: bool  # a frozen reference model beside the policy
    checkpointing: bool
    vision_trains: bool
    questions: int  # held at once per rank (embeddings cached, videos decoded): rl a step's, sft a micro-batch's
    micro: int  # questions per training forward
    G: int  # rollouts per question (1: SFT, no rollouts)
    T: int  # response (or SFT target) tokens
    text_tokens: int
    pixels_per_frame: int
    reuse: bool  # embeddings encoded once per step and reused
    grouped: bool  # one prefill per prompt, its G rows decoded together
    shared: bool  # shared-prompt training forwards
    chunk: int
    bench: bool = False  # bench-mrsp: torch AdamW created for the mode, state allocated in its first step
    rollouts: bool = True  # rl and bench: rollout and old/reference phases


@dataclass
class Breakdown:
    """Bytes per rank: `resident` before the step starts (weights, optimizer state), `step`
    held from its start to its end (embeddings, decoded pixels), and per phase what is held at
    that phase's peak on top of both. `first_step`: what the first optimizer step allocates
    and every later step starts with (bench-mrsp's torch AdamW state, created per mode)."""

    resident: dict[str, float] = field(default_factory=dict)
    step: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    first_step: dict[str, float] = field(default_factory=dict)
    tokens_per_rank: int = 0  # in one training forward

    def phase_total(self, name: str) -> float:
        return sum(self.phases[name].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def step_growth(self) -> float:
        """What the first step adds above its start: what CPU resident-set growth measures
        (the optimizer's state appears at the end of its update, after the activations went)."""
        phases = [self.phase_total(p) + (sum(self.first_step.values()) if p == "optimizer step" else 0)
                  for p in self.phases]
        return sum(self.step.values()) + max(phases)

    @property
    def peak(self) -> float:
        """Everything at the peak of a step after the first: the total that must fit."""
        return (sum(self.resident.values()) + sum(self.first_step.values()) + sum(self.step.values())
                + self.phase_total(self.peak_phase))


def shape(d: Dims, s: Scenario, frames: int) -> tuple[int, int, int]:
    """(video tokens, vision patches, prompt tokens) of one question at `frames` frames."""
    video = pm.video_tokens(d, frames, s.pixels_per_frame)
    return video, video * d.merge ** 2, video + s.text_tokens


def breakdown(d: Dims, s: Scenario, frames: int) -> Breakdown:
    """Memory per rank of one step of `s` on videos of `frames` frames."""
    b, sp, G, T = s.b, s.sp, s.G, s.T
    video, patches, P = shape(d, s, frames)
    emb = pm.embedding_bytes(d, b, video)
    out = Breakdown()
    state = pm.training_state(d.params_total, s.trainable, b, zero_stage=s.zero_stage, world=s.world,
                              largest_layer=d.largest_layer_params, cpu=s.cpu, vision=d.params_vision)
    out.resident["weights"] = state.pop("weights")
    sharded = s.zero_stage == "fsdp2"
    if s.reference:  # sharded like the policy under fsdp2 (in the model dtype: never trained)
        out.resident["reference model (frozen)"] = (d.params_vision + d.params_language / s.world if sharded
                                                     else d.params_total) * b
    # fsdp2: phases without gradients run on gathered weights (the policy's, or the reference's)
    gathered = {"gathered language model (fsdp2)": d.params_language * b} if sharded else {}
    grads = state.pop("gradients")
    if s.bench:  # torch AdamW made for the mode: its state appears at the first step's end
        out.resident["initial weights (restored per mode)"] = d.params_total * b
        out.first_step["Adam state"] = state["optimizer"]
        out.phases["optimizer step"] = {"gradients": grads, "Adam temporaries": s.trainable * b}
    else:
        out.resident.update({"gradients": grads, **state})
    if s.reuse:
        out.step["cached video embeddings"] = s.questions * emb
    if s.cpu:  # decoded, patchified fp32 pixels share the RAM
        pixels = math.ceil(frames / d.temporal_patch) * d.temporal_patch * d.channels * s.pixels_per_frame * 4
        # rl releases a video's frames once its embedding is cached (MR-SP, frozen tower): one at a time
        released = s.rollouts and not s.bench and s.reuse and not s.vision_trains
        out.step["decoded pixels"] = (1 if released else s.questions) * pixels
        out.phases["video decode"] = {"patchify copies": 2 * pixels}
    slice_patches = -(-patches // sp)
    encode = pm.vision_nograd_bytes(d, b, slice_patches) + (2 * emb if sp > 1 else 0)  # + gather buffers
    if s.reuse:
        out.phases["vision encode"] = {"vision tower (no grad)": encode}
    kv = pm.kv_per_token(d, b)
    if s.rollouts:
        alone = pm.vision_nograd_bytes(d, b, patches)  # a rollout engine encodes its prompt's video alone
        if s.grouped:
            prefill = pm.nograd_per_token(d, b) * P + kv * P
            decode = pm.kv_cache_bytes(d, b, G, P, T, True)  # the prompt's K/V once, each row's own tokens
            rollout = {"prefill (no grad) + KV": prefill} if prefill > decode else {"KV cache, prompt + G rows": decode}
        else:  # vanilla: every rollout encodes and prefills on its own
            rollout = {"prefill (no grad) + KV, 1 row": pm.nograd_per_token(d, b) * P + kv * (P + T)}
        if not s.reuse:
            rollout["video embedding"] = emb
            if alone > sum(rollout.values()):
                rollout = {"vision tower (no grad)": alone}
        out.phases["rollout"] = {**rollout, **gathered}
    # training forwards: tokens on this rank in one forward, and how many sequences it holds
    rows = s.micro * G
    tokens = pm.per_rank(s.micro * (P + G * T), sp) if s.shared else rows * pm.per_rank(P + T, sp)
    out.tokens_per_rank = tokens
    ulysses = sp > 1 or s.shared
    scored = pm.per_rank(rows * T, sp)
    shared_kv = s.micro * (pm.shared_kv_per_layer(d, b, G, P, T, sp)
                           + (pm.shared_masks_per_layer(G, P, T) if s.cpu else 0)) if s.shared else 0
    if s.rollouts:
        if s.reuse:
            fwd = {"forward (no grad)": pm.nograd_per_token(d, b) * tokens,
                   "log-prob chunk": pm.logits_bytes(d, b, scored, s.chunk, False)}
            if shared_kv:
                fwd["shared-prompt K/V (a layer)"] = shared_kv
        else:  # a re-encode per sequence, then its forward
            seq = pm.per_rank(P + T, sp)
            fwd = {"1 sequence (no grad)": pm.nograd_per_token(d, b) * seq + emb
                   + pm.logits_bytes(d, b, pm.per_rank(T, sp), s.chunk, False)}
            if encode > sum(fwd.values()):
                fwd = {"vision tower (no grad)": encode}
        out.phases["old/ref forward"] = {**fwd, **gathered}
    layers_held = 1 if s.checkpointing else d.layers
    backward = pm.backward_per_token(d, b) + pm.recompute_per_token(d, b, ulysses, s.checkpointing)
    update = {"activations": pm.saved_per_token(d, b, ulysses, s.checkpointing) * tokens,
              "backward buffers": backward * tokens,
              "log-prob chunk (backward)": pm.logits_bytes(d, b, scored, s.chunk, True)}
    if shared_kv:
        update["shared-prompt K/V"] = shared_kv * layers_held
    if s.vision_trains:  # the update re-encodes with gradients: once per video, or per sequence
        update["vision activations"] = pm.vision_saved_bytes(d, b, slice_patches) * (s.micro if s.reuse else rows)
    if not s.reuse:  # the last sequence's re-encode beside the saved activations (all G: a bound)
        update["re-encode (no grad) + embedding"] = encode + emb
    if s.bench:
        update["gradients"] = grads
    out.phases["update"] = update
    return out


def max_frames(d: Dims, s: Scenario, budget: float) -> int:
    """The largest frame count (a multiple of the temporal patch) whose peak fits `budget`
    bytes; 0 when not even one temporal patch does."""
    tp = d.temporal_patch
    if breakdown(d, s, tp).peak > budget:
        return 0
    lo, hi = 1, MAX_FRAMES // tp  # in temporal patches: lo fits
    if breakdown(d, s, hi * tp).peak <= budget:
        return hi * tp
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if breakdown(d, s, mid * tp).peak <= budget else (lo, mid)
    return lo * tp


def budget_bytes(gpu: Gpu, nproc_per_node: int) -> float:
    """Bytes one rank may use: the GPU's memory less the reserve, or a CPU node's RAM shared by its ranks."""
    if gpu.cuda:
        return (gpu.total_gib - gpu.reserve_gib) * GIB
    return (gpu.total_gib / nproc_per_node - gpu.reserve_gib) * GIB


# -- recipes -> scenarios --------------------------------------------------------------------------
def dtype_bytes(name: str, gpu: Gpu) -> int:
    if name == "auto":
        return 2 if gpu.cuda else 4
    return 4 if name == "float32" else 2


def trainable_params(d: Dims, recipe) -> int:
    """What trains: the language model (less frozen layers, or only LoRA adapters), and the
    vision tower unless frozen."""
    layer = (d.params_language - 2 * d.vocab * d.hidden) // d.layers  # embedding and LM head aside
    if recipe.lora.enabled:
        r, h, kvd, i = recipe.lora.r, d.hidden, d.kv_heads * d.head_dim, d.intermediate
        sizes = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_layer = sum(r * (a + c) for name, (a, c) in sizes.items() if name in recipe.lora.target_modules)
        return per_layer * d.layers
    n = d.params_language - recipe.model.freeze_llm_layers * layer
    return n + (0 if recipe.model.freeze_vision else d.params_vision)


def scenarios(d: Dims, recipe, gpu: Gpu) -> list[tuple[Scenario, int]]:
    """(MR-SP as the recipe sets it, the vanilla way), each with the frame count the recipe
    asks for; for a bench recipe every mode it runs."""
    b = dtype_bytes(recipe.model.dtype, gpu)
    world = recipe.world_size()
    sp = recipe.mrsp.sp_size
    factor = d.patch * d.merge
    if recipe.stage == "bench-mrsp":
        bench = recipe.bench
        side = bench.frame_size // factor * factor
        base = Scenario("", b, not gpu.cuda, sp, world, None, d.params_language, True, False, False,
                        sp, 1, recipe.rollout.n, max(bench.response_tokens), BENCH_TEXT_TOKENS, side * side,
                        True, True, False, recipe.mrsp.logprob_chunk_tokens, bench=True)
        frames = max(bench.frames)
        return [(bench_scenario(base, m), frames) for m in bench.modes]
    dp = max(1, world // sp)
    per_rank_q = recipe.train.global_batch // dp
    zero = "fsdp2" if recipe.train.engine == "fsdp2" else recipe.deepspeed.zero_stage if recipe.deepspeed.enabled else None
    rl = recipe.stage == "rl"
    mrsp = Scenario(
        f"MR-SP (SP {sp}" + (", shared prompt)" if rl and recipe.mrsp.shared_prompt else ")"), b, not gpu.cuda, sp,
        world, zero, trainable_params(d, recipe), rl and recipe.algo.kl_coef > 0,
        recipe.train.gradient_checkpointing, not recipe.model.freeze_vision,
        per_rank_q if rl else recipe.train.micro_batch_per_rank,  # sft decodes a micro-batch at a time
        recipe.train.micro_batch_per_rank, recipe.rollout.n if rl else 1,
        recipe.rollout.max_new_tokens if rl else SFT_TARGET_TOKENS, PROMPT_TEXT_TOKENS,
        recipe.video.max_pixels // factor ** 2 * factor ** 2, True, True, rl and recipe.mrsp.shared_prompt,
        recipe.mrsp.logprob_chunk_tokens, rollouts=rl)
    vanilla = replace(mrsp, label="vanilla (SP 1)", sp=1, reuse=False, grouped=False, shared=False)
    return [(mrsp, recipe.video.max_frames), (vanilla, recipe.video.max_frames)]


def bench_scenario(base: Scenario, mode: str) -> Scenario:
    """A bench-mrsp mode (`stages/bench_mrsp.py`): an SP group handles SP questions in turn."""
    one = dict(sp=1, questions=1)
    flags = {"vanilla": dict(one, reuse=False, grouped=False), "peer": dict(reuse=False),
             "mrsp-1": dict(one), "mrsp": {}, "mrsp-shared": dict(shared=True),
             "mrsp-shared-2pass": dict(shared=True)}[mode]  # the extra old pass runs without gradients
    return replace(base, label=mode, **flags)
