"""The MR-SP runtime: one object that sft, rl, filter, eval and bench-mrsp share.

It turns a LongVideo-Reason record into model inputs (frames -> patches -> prompt ids and
whole-sequence positions), and runs the three things a stage asks of a video model:

- `embed(sample)`: the video embedding, encoded with the frames sharded over the SP group
  and cached for the step (`EmbeddingCache`), or re-encoded on every call in vanilla mode;
- `generate(samples, n, sampling)`: G rollouts per prompt through the rollout engine, one
  prefill per group (MR-SP), or one encode and one prefill per rollout (vanilla);
- `logprobs(samples, responses)`: response-token log-probs (and entropies) of teacher-forced
  forwards, sequence-parallel over the SP group with the cached embedding (MR-SP), or one
  unsharded forward with a freshly encoded video per sequence (vanilla).

How the work is done is set by four switches, so `bench-mrsp` can compare the ways the
paper and today's frameworks do it with the same code (`Mode`):

| mode        | rollout encode / prefill | training forwards encode | SP forward | training forwards run the prompt |
|-------------|--------------------------|--------------------------|------------|----------------------------------|
| vanilla     | per rollout              | per sequence             | no         | per sequence                     |
| peer        | per prompt               | per sequence             | yes        | per sequence                     |
| mrsp        | cached, once per step    | cached (reused)          | yes        | per sequence                     |
| mrsp-shared | cached, once per step    | cached (reused)          | yes        | once per group (`shared.py`)     |

`train_forward_tokens` counts the prompt + response tokens the training forwards ran
through the language model, `train_forward_tokens_unshared` what they would have run with
every sequence on its own (padding excluded in both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stages.data.records import format_problem, split_problem
from stages.data.video import load_video
from stages.data.video_index import find_video
from stages.models.adapter import VideoEmbedding, VLAdapter
from stages.models.patchify import patchify
from stages.mrsp.cache import EmbeddingCache
from stages.mrsp.dist import Grid, all_gather_objects
from stages.mrsp.logprobs import TokenBatch, token_logprobs
from stages.mrsp.rollout import HFEngine, Rollout, RolloutPrompt, Sampling
from stages.mrsp.shared import PromptGroup, shared_logprobs
from stages.mrsp.vision import encode_sharded

THINK_INSTRUCTION = ("Think about the question step by step inside <think> </think> tags, then give the "
                     "letter of the correct option inside <answer> </answer> tags.")
PLAIN_INSTRUCTION = "Answer with the letter of the correct option inside <answer> </answer> tags."


@dataclass(frozen=True)
class Mode:
    """How the runtime does its work (see the module docstring's table)."""

    reuse_embeddings: bool = True  # one encode per video per step, shared by rollouts and forwards
    group_rollouts: bool = True  # one encode + prefill per prompt, G rows decoded together
    sequence_parallel: bool = True  # SP forward over the grid's SP group
    shared_prompt: bool = True  # training forwards run a group's prompt once (needs reuse_embeddings)

    @classmethod
    def named(cls, name: str) -> "Mode":
        return {"vanilla": cls(False, False, False, False), "peer": cls(False, True, True, False),
                "mrsp": cls(True, True, True, False), "mrsp-shared": cls(True, True, True, True)}[name]


@dataclass
class VideoInput:
    """One video sampled and patchified for a model."""

    key: str  # path + frame sampling: the embedding cache key
    pixels: torch.Tensor | None  # None once released (Runtime.release_pixels)
    grid_thw: torch.Tensor  # [1, 3]
    timestamps_s: list[float]
    seconds_per_grid: float


@dataclass
class Sample:
    """One question on one video, ready for the model."""

    key: str
    record: dict
    video: VideoInput
    prompt: RolloutPrompt  # ids + positions; its `videos` are filled by `Runtime.embed`


def question_messages(record: dict, system: str | None, think: bool) -> list[dict]:
    """Return the chat of one multiple-choice record: the video, the question and its options."""
    question, options = split_problem(record["problem"]) if "problem" in record else (record["question"], {})
    if record.get("options") and not options:
        options = record["options"]
    text = format_problem(question, options) if options else question
    text += "\n" + (THINK_INSTRUCTION if think else PLAIN_INSTRUCTION)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]})
    return messages


def prepare_video(adapter: VLAdapter, path: str | Path, max_frames: int, max_pixels: int,
                  fps: float | None) -> VideoInput:
    """Decode, sample, resize and patchify one video (raises `VideoDecodeError`)."""
    spec = adapter.patch_spec
    tp = spec.temporal_patch_size
    video = load_video(path, max_frames=max(max_frames, tp), factor=spec.factor, max_pixels=max_pixels, fps=fps)
    frames, times = video.frames, list(video.timestamps_s)
    if frames.shape[0] % tp:  # the temporal patch needs whole pairs: repeat the last frame
        extra = tp - frames.shape[0] % tp
        frames = torch.cat([frames, frames[-1:].expand(extra, -1, -1, -1)])
        times += [times[-1]] * extra
    pixels, grid = patchify(frames, spec)
    key = f"{video.key}|{spec.factor}|{max_pixels}"
    return VideoInput(key, pixels, grid, times, adapter.second_per_grid(video.fps_sampled))


class Runtime:
    """Model inputs, embeddings, rollouts and log-probs for one model on one process grid.

    `chunk_tokens`: log-probs are computed this many tokens at a time; `video`: how videos
    are sampled (`max_frames`, `max_pixels`, `fps`: the recipe's `[video]`), None when the
    stage brings its samples prepared (`sample_of`); `prompt`: the system prompt and the
    think instruction (the recipe's `[prompt]`)."""

    def __init__(self, adapter: VLAdapter, grid: Grid, mode: Mode, *, chunk_tokens: int, video, prompt):
        self.adapter = adapter
        self.grid = grid
        self.mode = mode
        self.chunk_tokens = chunk_tokens
        self.video = video
        self.system, self.think = prompt.system, prompt.think
        self.cache = EmbeddingCache(enabled=mode.reuse_embeddings)
        self.engine = HFEngine(adapter)
        self.pad_id = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
        self.eos_id = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.train_forward_tokens = self.train_forward_tokens_unshared = 0
        self.alone_encodes = 0  # of `vision_encodes`: on this rank alone, not with the SP group
        # A trainable vision tower (set by the stage that trains it): another model (the frozen
        # reference) no longer shares the policy's video embedding and encodes with its own
        # tower (`embed`), and cached embeddings go stale at each optimizer step.
        self.vision_trains = False

    def optimizer_stepped(self) -> None:
        """After an optimizer step: a trained vision tower changed, so cached embeddings are stale."""
        if self.vision_trains:
            self.cache.vision_changed()

    @property
    def sp_grid(self) -> Grid:
        """The grid the SP forward and the sharded encode run on (a single process without SP)."""
        return self.grid if self.mode.sequence_parallel else Grid()

    # -- inputs ------------------------------------------------------------------------------
    def sample(self, record: dict, video_dir: str | Path | None = None, key: str | None = None,
               max_frames: int | None = None) -> Sample:
        """Return the model inputs of `record` (its first video, found under `video_dir` by
        `find_video`); raise `VideoDecodeError`, or `AmbiguousVideoError` (a ValueError)."""
        if self.video is None:
            raise ValueError("this runtime has no [video] settings: samples come prepared (sample_of)")
        ref = record["videos"] if "videos" in record else record["video"]
        path = Path(ref[0] if isinstance(ref, list) else ref)  # the release writes one path, not a list
        if video_dir is not None:  # as released: a name may sit in any sub-folder of video_dir
            path = find_video(video_dir, path)
        video = prepare_video(self.adapter, path, max_frames or self.video.max_frames, self.video.max_pixels,
                              self.video.fps)
        return self.sample_of(record, video, key or str(record.get("problem_id", record.get("question_id", path))))

    def sample_of(self, record: dict, video: VideoInput, key: str) -> Sample:
        """Return the model inputs of `record` asked about an already prepared `video`."""
        messages = question_messages(record, self.system, self.think)
        ids = self.adapter.prompt_ids(messages, [(video.grid_thw, video.timestamps_s)])
        prompt = RolloutPrompt.build(self.adapter, key, ids, [], [video.seconds_per_grid], grids=[video.grid_thw])
        return Sample(key, record, video, prompt)

    def response_text(self, token_ids: list[int]) -> str:
        """A response as rewards and answer extraction read it: decoded, without its stop token."""
        stops = (self.eos_id, self.adapter.tokenizer.eos_token_id)
        ids = token_ids[:-1] if token_ids and token_ids[-1] in stops else token_ids
        return self.adapter.tokenizer.decode(ids, skip_special_tokens=False)

    def target_ids(self, text: str) -> list[int]:
        """Token ids of an assistant reply `text`, ending with the end-of-turn token."""
        return self.adapter.tokenizer.encode(text, add_special_tokens=False) + [self.eos_id]

    # -- vision ---------------------------------------------------------------------------------
    def embed(self, sample: Sample, grad: bool = False, alone: bool = False,
              model: VLAdapter | None = None) -> VideoEmbedding:
        """The video embedding of `sample`: from the step's cache, or encoded (sharded over the
        SP group; on this rank only with `alone`) and counted in `cache.vision_encodes`.
        `model`: another model (the frozen reference). It shares the policy's embedding unless
        the policy's vision tower trains (`vision_trains`); then it encodes with its own tower."""
        v = sample.video
        own = model is not None and model is not self.adapter and self.vision_trains
        tower = model if own else self.adapter

        def encode() -> VideoEmbedding:
            if v.pixels is None:
                raise RuntimeError(f"{v.key}: its pixels were released after its embedding (release_pixels), "
                                   "and the embedding is no longer cached")
            self.alone_encodes += alone
            with torch.set_grad_enabled(grad and not own):
                return encode_sharded(tower, v.pixels, v.grid_thw, Grid() if alone else self.sp_grid)

        return self.cache.get(f"{v.key}|model {id(tower)}" if own else v.key, encode, grad=grad and not own)

    def embed_for_step(self, sample: Sample) -> None:
        """Encode `sample`'s video into the step's cache (sharded over the SP group), where the
        cache serves its later uses; nothing in vanilla mode, which encodes at every use."""
        if self.mode.reuse_embeddings:
            with torch.no_grad():
                self.embed(sample)

    def new_step(self) -> None:
        self.cache.new_step()

    def release_pixels(self, sample: Sample) -> bool:
        """Drop `sample`'s decoded pixels once its embedding is cached, when the step's cached
        embedding serves every later use (MR-SP with a frozen tower): the frames of a step's
        videos then need not stay in memory beside their embeddings. Returns whether it did."""
        if not self.mode.reuse_embeddings or self.vision_trains:
            return False  # vanilla re-encodes per sequence; a trained tower re-encodes in the update
        sample.video.pixels = None
        return True

    # -- rollouts -------------------------------------------------------------------------------
    def generate(self, samples: list[Sample], n: int, sampling: Sampling, first_index: int = 0
                 ) -> list[list[Rollout]]:
        """`n` rollouts of every sample (outer: samples). MR-SP/peer: one encode and one prefill
        per prompt, the rows of all this rank's prompts decoded as one batch; vanilla: every
        rollout encodes the video and prefills on its own.

        MR-SP over an SP group deals the prompts out to the group's ranks (sample i to rank
        i mod sp) and all-gathers the rollouts, so the group prefills and decodes each prompt
        once rather than once per rank. Every sample is embedded first, by all ranks
        together (the sharded encode is a collective); a sample's seed depends on its index
        only (`first_index` + its place in `samples`: a data-parallel rank passes where its
        share starts), so the rollouts are those of one process."""
        group = self.sp_grid.sp_group
        if group is None or not self.mode.group_rollouts or len(samples) < 2:
            return self._generate(samples, n, sampling, range(first_index, first_index + len(samples)))
        for s in samples:
            self.embed_for_step(s)
        sp = self.sp_grid.sp_size
        mine = range(self.sp_grid.sp_rank, len(samples), sp)
        parts = all_gather_objects(self._generate([samples[i] for i in mine], n, sampling,
                                                  [first_index + i for i in mine], alone=True), group)
        return [parts[i % sp][i // sp] for i in range(len(samples))]  # rank r holds samples r, r + sp, ...

    def _generate(self, samples: list[Sample], n: int, sampling: Sampling, indices,
                  alone: bool = False) -> list[list[Rollout]]:
        """`generate` on this rank; `indices`: the samples' places in the step (their seeds).
        `alone`: the other ranks of the SP group are busy with other samples, so a video not
        in the cache is encoded on this rank (the peer way: the rollout engine encodes its
        own prompts' videos)."""
        if self.mode.group_rollouts:  # every prompt prefilled once, all groups decoded as one batch
            with torch.no_grad():
                for s in samples:
                    s.prompt.videos = [self.embed(s, alone=alone)]
            out = self.engine.generate([s.prompt for s in samples], n,
                                       [self._seeded(sampling, i) for i in indices]) if samples else []
            for s in samples:
                s.prompt.videos = []
            return out
        out = []
        for i, s in zip(indices, samples):
            group = []
            for r in range(n):
                with torch.no_grad():
                    s.prompt.videos = [self.embed(s)]
                group += self.engine.generate([s.prompt], 1, self._seeded(sampling, i * 100_003 + r))[0]
            out.append(group)
        for s in samples:
            s.prompt.videos = []
        return out

    @staticmethod
    def _seeded(sampling: Sampling, index: int) -> Sampling:
        if sampling.seed is None:
            return sampling
        return Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                        sampling.seed * 7_919 + index, sampling.stop_token_ids)

    # -- teacher-forced forwards -----------------------------------------------------------------
    def rows(self, sample: Sample, responses: list[list[int]]) -> list[tuple]:
        """`(ids, positions, score_mask)` of prompt + each response; response positions continue
        the prompt's as the model's own `get_rope_index` gives them (`index + rope_delta`)."""
        p = sample.prompt
        L = p.input_ids.shape[0]
        rows = []
        for resp in responses:
            r = torch.tensor(resp, dtype=torch.long)
            ids = torch.cat([p.input_ids, r])
            tail = (torch.arange(L, L + len(resp)) + p.rope_delta).expand(3, -1)
            pos = torch.cat([p.position_ids, tail], dim=1)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[L:] = True
            rows.append((ids, pos, mask))
        return rows

    def logprobs(self, sample: Sample, responses: list[list[int]], entropy: bool = False,
                 grad_vision: bool = False, model: VLAdapter | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per response: log-probs `[T_r]` of its tokens (and entropies) under the current
        weights; gradients flow when grad mode is on (`group_logprobs` for one sample)."""
        lps, ents = self.group_logprobs([sample], [responses], entropy, grad_vision, model)
        return lps[0], (ents[0] if entropy else None)

    def group_logprobs(self, samples: list[Sample], responses: list[list[list[int]]], entropy: bool = False,
                       grad_vision: bool = False, model: VLAdapter | None = None
                       ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
        """Per sample, per response: log-probs `[T_r]` (and entropies) of teacher-forced forwards.
        MR-SP with shared prompts: one SP forward over all the samples' groups, each prompt
        run once (`shared.py`); MR-SP: one SP forward per sample over its group's rows, with
        the cached embedding; otherwise one forward per sequence, each re-encoding.
        `model`: another model (the frozen reference) to run instead; it shares the policy's video
        embedding unless the policy's vision tower trains (`vision_trains`)."""
        model = model or self.adapter
        rows = [self.rows(s, resp) for s, resp in zip(samples, responses)]
        self.train_forward_tokens_unshared += sum(len(i) for r in rows for i, _, _ in r)
        if self.mode.reuse_embeddings and self.mode.shared_prompt and any(len(r) > 1 for r in responses):
            groups = [PromptGroup(s.prompt.input_ids.shape[0], [(i, p) for i, p, _ in r],
                                  [self.embed(s, grad_vision, model=model)]) for s, r in zip(samples, rows)]
            self.train_forward_tokens += sum(g.shared_tokens for g in groups)
            return shared_logprobs(model, groups, self.sp_grid, self.chunk_tokens, entropy)
        self.train_forward_tokens += sum(len(i) for r in rows for i, _, _ in r)
        lps, ents = [], []
        for s, r, resp in zip(samples, rows, responses):
            lp, en = self._unshared_logprobs(s, r, [len(x) for x in resp], entropy, grad_vision, model)
            lps.append(lp)
            ents.append(en)
        return lps, (ents if entropy else None)

    def lm_forwards(self, responses: list[list[list[int]]]) -> int:
        """How many language-model forwards `group_logprobs` runs for samples with these responses."""
        if self.mode.reuse_embeddings and self.mode.shared_prompt and any(len(r) > 1 for r in responses):
            return 1
        return len(responses) if self.mode.reuse_embeddings else sum(len(r) for r in responses)

    def _unshared_logprobs(self, sample: Sample, rows: list[tuple], lengths: list[int], entropy: bool,
                           grad_vision: bool, model: VLAdapter) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.mode.reuse_embeddings:
            emb = self.embed(sample, grad_vision, model=model)
            batch = TokenBatch.from_rows([(i, p, [emb], m) for i, p, m in rows], self.pad_id)
            logp, ent = token_logprobs(model, batch, self.sp_grid, self.chunk_tokens, entropy)
            return self._split(logp, batch.score_mask, lengths), (
                self._split(ent, batch.score_mask, lengths) if entropy else [])
        logps, ents = [], []
        for (i, p, m), T in zip(rows, lengths):
            emb = self.embed(sample, grad_vision, model=model)
            batch = TokenBatch.from_rows([(i, p, [emb], m)], self.pad_id)
            lp, en = token_logprobs(model, batch, self.sp_grid, self.chunk_tokens, entropy)
            logps += self._split(lp, batch.score_mask, [T])
            if entropy:
                ents += self._split(en, batch.score_mask, [T])
        return logps, ents

    @staticmethod
    def _split(values: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        return [values[b][mask[b]][:T] for b, T in enumerate(lengths)]

    def counters(self) -> dict:
        e = self.engine
        return {**self.cache.counters(), "vision_encodes_alone": self.alone_encodes,
                "prefills": e.prefills, "prefill_tokens": e.prefill_tokens,
                "decode_steps": e.decode_steps, "train_forward_tokens": self.train_forward_tokens,
                "train_forward_tokens_unshared": self.train_forward_tokens_unshared}

    def reset_counters(self) -> None:
        self.cache.reset_counters()
        self.engine.reset_counters()
        self.train_forward_tokens = self.train_forward_tokens_unshared = self.alone_encodes = 0
