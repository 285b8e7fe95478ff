"""The sections only the benchmark stages read: `bench-mrsp`'s `[bench]`, `[rollout]` and
`[mrsp]`, `bench-components`' `[components]`, `[mrsp]` and `[launch]` (their recipes are in
`schema.py`, with the others)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lvr_cli.sections import NonNegInt, PosFloat, PosInt, Section


BenchMode = Literal["vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared", "mrsp-shared-2pass"]


class BenchSpec(Section):
    frames: list[PosInt] = [8, 16, 32]
    modes: list[BenchMode] = ["vanilla", "peer", "mrsp-1", "mrsp", "mrsp-shared", "mrsp-shared-2pass"]
    steps: PosInt = 2
    warmup_steps: NonNegInt = 1
    # a cell keeps taking timed steps (median reported) until they add up to this many seconds,
    # up to max_steps: fast cells get more samples, so a slow spell of the machine moves them less
    min_seconds: Annotated[float, Field(ge=0)] = 0.0
    max_steps: PosInt = 20
    # every rollout is this long (the bench's rollout.max_new_tokens); a list runs every
    # (mode, frames) cell at each length; a single int is read as a list of one
    response_tokens: Annotated[list[PosInt], Field(min_length=1)] = [16]
    frame_size: PosInt = 56
    # peak GiB per rank a step may reach: a cell past it is reported OOM, and each mode's
    # largest fitting frame count is searched (one step per probe, see stages/bench_search.py)
    memory_cap_gb: PosFloat | None = None
    search_resolution_frames: PosInt = 64  # the search stops when fitting and failing counts are this close
    max_frames: PosInt = 4096  # the search probes no more frames than this
    # start every step on a trimmed heap (its memory measured), not only a cell's first: what
    # revisions before this key did, for like-for-like timing against them (ab_revisions.py)
    trim_every_step: bool = False
    name: str = "bench"
    out_dir: str = "benchmarks"

    @field_validator("response_tokens", mode="before")
    @classmethod
    def _one_length_is_a_list(cls, v):
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _search(self):
        if self.max_steps < self.steps:
            raise ValueError(f"max_steps: give at least steps ({self.steps}), got {self.max_steps}")
        if len(set(self.response_tokens)) < len(self.response_tokens):
            raise ValueError(f"response_tokens: {self.response_tokens} repeats a length")
        if self.memory_cap_gb is None:
            return self
        if self.search_resolution_frames % 2:
            raise ValueError(f"search_resolution_frames: give an even number (a temporal patch is two frames), "
                             f"got {self.search_resolution_frames}")
        if self.max_frames % 2 or self.max_frames < max(self.frames):
            raise ValueError(f"max_frames: give an even number >= the largest of bench.frames ({max(self.frames)}), "
                             f"got {self.max_frames}")
        return self


class BenchRolloutSection(Section):  # the bench fixes the response length (bench.response_tokens)
    n: PosInt = 8
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0


class BenchMrspSection(Section):  # the bench runs every mode (bench.modes), not one
    sp_size: PosInt = 1
    logprob_chunk_tokens: PosInt = 1024


class ComponentsSpec(Section):
    frames: PosInt = 512
    frame_size: PosInt = 56  # pixels per side, a multiple of the patch factor
    response_tokens: PosInt = 64
    sp_sizes: list[PosInt] = [1, 2, 4]  # SP 1, the reference of the self-check, always runs
    repeats: PosInt = 3  # timed runs per phase after one warm-up
    backward: bool = False  # also time forward+backward
    checkpointing: bool = False  # also time forward+backward with gradient checkpointing (implies backward)
    tolerance: PosFloat = 1e-5  # max |log-prob(SP s) - log-prob(SP 1)|, float32 on CPU only
    threads: PosInt = 1  # torch threads per rank
    launch_timeout_s: PosFloat = 3600.0  # one SP size's launch
    name: str = "components"
    out_dir: str = "benchmarks"

    @model_validator(mode="after")
    def _frames(self):
        if self.frames < 2 or self.frames % 2:
            raise ValueError(f"frames: give an even number >= 2 (a temporal patch is two frames), got {self.frames}")
        return self


class ComponentsMrspSection(Section):  # the SP sizes are components.sp_sizes, one launch each
    logprob_chunk_tokens: PosInt = 1024


class ComponentsLaunchSection(Section):  # the stage launches each SP size itself
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: PosFloat = 600.0  # every collective
