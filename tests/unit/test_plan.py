"""`lvr plan`: the memory formulas against hand-computed numbers and against what autograd
saves, the calibration against bench-mrsp's measured peaks, and the command line."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from lvr_cli.recipes import load_recipe
from stages import plan, plan_report, plan_model as pm

ROOT = Path(__file__).resolve().parents[2]
GiB = 2 ** 30

# Qwen2.5-VL-7B's sizes (published config.json); parameter counts as the meta-device build gives them
D7 = pm.Dims(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, v_hidden=1280,
             v_depth=32, v_intermediate=3420, patch=14, temporal_patch=2, merge=2, params_total=8_292_166_656,
             params_vision=676_550_144, largest_layer_params=544_997_376)
# the tiny bench model (stages/models/tiny.py, qwen2.5-vl-bench)
TINY = pm.Dims(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=1024, vocab=1028, v_hidden=96, v_depth=4,
               v_intermediate=192, patch=14, temporal_patch=2, merge=2, params_total=0, params_vision=0,
               largest_layer_params=0)


# -- formulas, by hand ----------------------------------------------------------------------------
def test_training_state_by_zero_stage():
    P, Pt, N = 1_000_000_000, 800_000_000, 8
    s0 = pm.training_state(P, Pt, 2, zero_stage=0, world=N)
    assert s0 == {"weights": 2e9, "gradients": 1.6e9, "optimizer": 9.6e9}  # 12 bytes: fp32 master + m + v
    s1 = pm.training_state(P, Pt, 2, zero_stage=1, world=N)
    assert (s1["weights"], s1["gradients"], s1["optimizer"]) == (2e9, 1.6e9, 1.2e9)
    assert s1["deepspeed reduce bucket"] == 2e9  # 5e8 elements of DeepSpeed's fp32 accumulator
    s2 = pm.training_state(P, Pt, 2, zero_stage=2, world=N)
    assert (s2["weights"], s2["gradients"], s2["optimizer"]) == (2e9, 2e8, 1.2e9)
    assert s2["deepspeed reduce bucket"] == 1e9  # in the gradients' dtype
    assert pm.training_state(P, 1000, 2, zero_stage=2, world=N, cpu=True)["deepspeed reduce bucket"] == 2000
    s3 = pm.training_state(P, Pt, 2, zero_stage=3, world=N, largest_layer=100_000_000)
    assert (s3["weights"], s3["gradients"], s3["optimizer"]) == (2.5e8, 2e8, 1.2e9)
    assert s3["zero-3 gathered layer + prefetch"] == (100_000_000 + 50_000_000) * 2
    # fp32 weights: Adam m + v only (8 bytes); no DeepSpeed: torch AdamW's m, v in the weights' dtype
    assert pm.training_state(P, Pt, 4, zero_stage=2, world=N)["optimizer"] == Pt * 8 / N
    assert pm.training_state(P, Pt, 2, zero_stage=None, world=N) == {"weights": 2e9, "gradients": 1.6e9,
                                                                       "optimizer": 3.2e9}
    # FSDP2 in bf16: fp32 shards of the language model (1/N each), the vision tower whole in bf16,
    # fp32 gradients and Adam m + v of the trained weights 1/N, a unit in use + one prefetched
    f = pm.training_state(P, Pt, 2, zero_stage="fsdp2", world=N, largest_layer=100_000_000, vision=200_000_000)
    assert f == {"weights": 200_000_000 * 2 + 800_000_000 * 4 / N, "gradients": Pt * 4 / N,
                 "optimizer": Pt * 8 / N, "fsdp2 gathered units": 2 * 100_000_000 * 2}
    assert pm.training_state(P, Pt, 4, zero_stage="fsdp2", world=N, vision=0)["weights"] == P * 4 / N


def test_activation_bytes_by_hand():
    # tiny, fp32: norms 2*(4+8)*256 = 6144; SDPA attention 4*(512 + 2*2*32) = 2560; MLP 16*1024 = 16384
    assert pm.layer_saved_per_token(TINY, 4, ulysses=False) == 6144 + 2560 + 16384
    assert pm.layer_saved_per_token(TINY, 4, ulysses=True) == 6144 + 5 * 4 * 256 + 16384
    assert pm.saved_per_token(TINY, 4, False, False) == 4 * 25088 + 8 * 256  # + final norm (4 + b) h
    assert pm.saved_per_token(TINY, 4, False, True) == 4 * 4 * 256 + 8 * 256  # layer inputs only
    # 7B, bf16: norms 2*(4+4)*3584, Ulysses attention 5*2*3584, MLP 8*18944 = 244,736 bytes per layer
    assert pm.layer_saved_per_token(D7, 2, ulysses=True) == 57344 + 35840 + 151552
    assert pm.recompute_per_token(D7, 2, True, checkpointing=False) == 0
    assert pm.nograd_per_token(TINY, 4) == (4 * 256 + 3 * 1024) * 4
    assert pm.backward_per_token(D7, 2) == 2 * 18944
    # a log-prob chunk of 1024 tokens over the 7B vocabulary: bf16 logits + fp32 copy + log-softmax
    assert pm.logits_bytes(D7, 2, 5000, 1024, backward=False) == 1024 * 152064 * 10
    assert pm.logits_bytes(D7, 2, 100, 1024, backward=True) == 100 * 152064 * 16


def test_kv_cache_embeddings_and_video_tokens_by_hand():
    per_token = 2 * 4 * 128 * 2 * 28  # 2 (K, V) x 4 KV heads x 128 dims x bf16 x 28 layers
    assert pm.kv_per_token(D7, 2) == per_token == 57344
    assert pm.kv_cache_bytes(D7, 2, G=8, P=1000, T=100, prompt_shared=True) == (1000 + 8 * 100) * per_token
    assert pm.kv_cache_bytes(D7, 2, G=8, P=1000, T=100, prompt_shared=False) == 8 * 1100 * per_token
    # 100352 pixels = 128 x 28 x 28: 128 LLM tokens per 2-frame patch, 64 per frame
    assert pm.video_tokens(D7, 512, 100352) == 32768
    assert pm.video_tokens(D7, 3, 100352) == 256  # an odd frame count pads to whole temporal patches
    assert pm.video_patches(D7, 2, 100352) == 512
    assert pm.embedding_bytes(D7, 2, 32768) == 32768 * 3584 * 2
    # shared-prompt attention: G copies of [prompt; response] K and V on this rank's heads
    assert pm.shared_kv_per_layer(D7, 2, G=8, P=1000, T=100, sp=4) == 2 * 8 * 1100 * 896 * 2
    assert pm.per_rank(1001, 4) == 251


def test_max_frames_is_the_largest_that_fits():
    s = plan.Scenario("x", 2, False, 4, 8, 2, D7.params_language, True, True, False, 8, 1, 8, 1024, 200, 100352,
                      True, True, True, 1024)
    budget = 77 * GiB
    f = plan.max_frames(D7, s, budget)
    assert f % 2 == 0 and f > 0
    assert plan.breakdown(D7, s, f).peak <= budget < plan.breakdown(D7, s, f + 2).peak
    assert plan.max_frames(D7, s, 1 * GiB) == 0  # the weights alone do not fit


# -- formulas against autograd ---------------------------------------------------------------------
def _saved_activation_bytes(adapter, fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while `fn` runs."""
    params = {p.untyped_storage().data_ptr() for p in adapter.model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_activations_match_what_autograd_holds():
    from stages.models.adapter import load_adapter
    from stages.mrsp.logprobs import TokenBatch, token_logprobs
    from stages.mrsp.ulysses import causal_attention, sp_attention

    a = load_adapter("tiny:qwen2.5-vl-bench", torch.float32)
    a.model.model.visual.requires_grad_(False)
    B, L = 2, 160
    ids = torch.randint(10, 900, (B, L), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, -16:] = True
    batch = TokenBatch(ids, torch.arange(L).view(1, 1, L).expand(3, B, L), [[], []], mask)
    sdpa = _saved_activation_bytes(a, lambda: token_logprobs(a, batch, None, 1024))
    assert sdpa == pytest.approx(pm.saved_per_token(TINY, 4, False, False) * B * L, rel=0.05)

    def ulysses_path():  # the attention SP and the shared layout run, on one process
        with sp_attention(a.model, None, causal_attention):
            a.hidden_states(ids, batch.position_ids)

    got = _saved_activation_bytes(a, ulysses_path)
    want = (pm.saved_per_token(TINY, 4, True, False) - 4 * 256) * B * L  # no log-probs: the final norm's y is not kept
    assert got == pytest.approx(want, rel=0.05)


def _safetensors_params(path: Path) -> int:
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def test_tiny_dims_and_params_come_from_the_built_model():
    from stages.models.adapter import resolve_model_path

    d, source = pm.load_dims("tiny:qwen2.5-vl-bench")
    assert "tiny model built locally" in source
    assert (d.hidden, d.layers, d.heads, d.kv_heads, d.intermediate, d.vocab) == (256, 4, 8, 2, 1024, 1028)
    assert (d.v_hidden, d.v_depth, d.v_intermediate, d.patch, d.merge) == (96, 4, 192, 14, 2)
    weights = Path(resolve_model_path("tiny:qwen2.5-vl-bench")) / "model.safetensors"
    assert d.params_total == _safetensors_params(weights)


def test_known_7b_table_matches_its_config():
    """The stored parameter counts are those of the published config built on the meta device."""
    config = pm.known_config("Qwen/Qwen2.5-VL-7B-Instruct")
    assert pm.count_params(config) == pm.KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"]["params"]
    assert pm.dims_of(config, pm.count_params(config)) == D7


# -- calibration against bench-mrsp ---------------------------------------------------------------------
def _calibration(name):
    recipe = load_recipe(ROOT / "recipes/demo/bench.toml")
    d, _ = pm.load_dims(recipe.model.path)
    return plan_report.calibration(d, recipe, json.loads((ROOT / "benchmarks" / name).read_text()))


def test_calibration_within_20_percent_of_bench_mrsp_with_exact_rss():
    """bench-mrsp (5 modes, 128/256/512 frames, SP 1 and 2) with glibc's mmap threshold fixed,
    so that the resident set follows live memory: every cell within 20%, no fitted constant."""
    rows = _calibration("plan-calibration.json")
    assert {(r["mode"], r["frames"]) for r in rows} == {(m, f) for m in ("vanilla", "peer", "mrsp-1", "mrsp",
                                                                        "mrsp-shared") for f in (128, 256, 512)}
    for r in rows:
        assert r["prompt_tokens"] == r["measured_prompt_tokens"]  # the sequence is the one the bench ran
        assert abs(r["error"]) < 0.20, r


def test_default_glibc_heap_overstates_live_memory():
    """The committed `make bench` run used glibc's default (dynamic) mmap threshold: freed
    activations stay in the heap, so its resident-set growth is live memory plus what the heap
    kept. The prediction is then a lower bound, far below in the SP modes (two questions per
    rank in turn); the README shows the table."""
    rows = _calibration("cpu-demo.json")
    assert len(rows) == 18  # 6 modes x 3 frame counts
    assert all(r["error"] < 0.0 for r in rows)
    assert max(abs(r["error"]) for r in rows if r["mode"] in ("mrsp", "mrsp-shared")) > 0.4


def test_calibration_predicts_for_cuda_when_the_bench_measured_cuda_memory():
    """A bench run on GPU measured CUDA's allocator peak: the calibration predicts for a CUDA
    device then (bf16 for `model.dtype = "auto"`, no decoded frames in host memory), as the
    JSON's `memory` says; its machine line names the GPU, not "cuda"."""
    recipe = load_recipe(ROOT / "recipes/demo/bench.toml")
    d, _ = pm.load_dims(recipe.model.path)
    cpu = json.loads((ROOT / "benchmarks" / "cpu-demo.json").read_text())
    cuda = {**cpu, "memory": "CUDA max_memory_allocated per rank (weights included)", "machine": "NVIDIA H200 x2"}
    on_cpu, on_cuda = plan_report.calibration(d, recipe, cpu), plan_report.calibration(d, recipe, cuda)
    assert len(on_cpu) == len(on_cuda) == 18
    for a, b in zip(on_cpu, on_cuda):
        assert (a["mode"], a["frames"]) == (b["mode"], b["frames"])
        assert 0 < b["predicted_gib"] < 0.6 * a["predicted_gib"], (a, b)


# -- the command line ----------------------------------------------------------------------------------
def test_plan_7b_rl_on_h100(lvr):
    r = lvr("plan", "recipes/qwen2_5_vl_7b/rl.toml", "--gpu", "h100-80g", "--model", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "published config of Qwen2.5-VL-7B-Instruct (lvr plan's known-model table)" in out
    assert "8.29 B parameters" in out and "7.62 B trainable" in out
    assert "512 frames x 64 tokens/frame = 32,768 video tokens" in out
    assert "2 over 8 ranks" in out and "<- recipe" in out
    assert "MR-SP (SP 4, shared prompt)" in out and "vanilla (SP 1)" in out
    line = next(x for x in out.splitlines() if x.startswith("largest frame count that fits on h100-80g"))
    mrsp, vanilla = (int(p.split(": ")[-1].split()[0].replace(",", "")) for p in line.split(", vanilla"))
    assert mrsp > 512 > vanilla > 0


def test_plan_bad_recipe_unknown_gpu_and_other_stage_exit_2(lvr, tmp_path):
    r = lvr("plan", "recipes/demo/bench.toml", "--gpu", "v100")
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: recipes/demo/bench.toml: --gpu v100: unknown; available: a100-80g, "
                                "h100-80g, h200, cpu-24g")
    bad = lvr("plan", "recipes/demo/bench.toml", "bench.framez=[8]")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: recipes/demo/bench.toml: bench.framez: unknown key"
    other = lvr("plan", "recipes/demo/synth.toml")
    assert other.returncode == 2 and "lvr plan plans sft, rl and bench-mrsp recipes, not synth" in other.stderr
    missing = lvr("plan", "recipes/qwen2_5_vl_7b/rl.toml")  # model.path is an SFT checkpoint not trained here
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "--model HUB_ID_OR_FOLDER" in missing.stderr and "Traceback" not in missing.stderr


def test_plan_bench_recipe_against_its_measurement(lvr):
    r = lvr("plan", "recipes/demo/bench.toml", "--gpu", "cpu-24g", "--against", "benchmarks/plan-calibration.json")
    assert r.returncode == 0, r.stderr
    assert "cpu-24g: CPU, 24 GiB RAM shared by the node's ranks" in r.stdout
    assert "512 frames x 2 tokens/frame = 1,024 video tokens" in r.stdout
    assert "predicted step growth vs measured peak per rank" in r.stdout
    worst = next(x for x in r.stdout.splitlines() if x.strip().startswith("worst error"))
    assert int(worst.split()[2].rstrip("%")) < 20 and "over 15 cells" in worst


def test_bench_step_on_gpu_holds_three_weight_copies_and_torch_adamw():
    """bench-mrsp keeps the policy, the reference and the initial weights it restores per mode,
    and a torch AdamW (bf16 m and v) created per mode: the 7B bench recipe's resident set."""
    recipe = load_recipe(ROOT / "recipes/qwen2_5_vl_7b/bench.toml")
    (s, _), *_ = plan.scenarios(D7, recipe, plan.GPUS["h100-80g"])
    bd = plan.breakdown(D7, s, 64)
    assert bd.resident == {"weights": D7.params_total * 2, "reference model (frozen)": D7.params_total * 2,
                           "initial weights (restored per mode)": D7.params_total * 2}
    assert bd.first_step == {"Adam state": D7.params_language * 4}
    assert bd.phases["update"]["gradients"] == D7.params_language * 2
