"""Data stages split over shards (`data.shard = "i/N"`, or the launch's ranks) and merged back:
the rule, the schema, caption and filter shards merged equal one unsharded run, refusals."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stages.caption as caption
from lvr_cli.main import app
from lvr_cli.recipes import RecipeError, load_recipe
from lvr_cli.schema import CaptionRecipe, FilterRecipe
from lvr_cli.rundir import RunDir
from stages import filter as filt
from stages import shards
from stages.shards import Shard, Share, shard_dir, shard_of
from tests.unit.test_caption import FakeVLM, videos  # noqa: F401 (fixture)
from tests.unit.test_filter import data, make_recipe, parity_accuracy, uninterrupted  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
# fields of a summary that measure time, not what was made
TIMING = ("seconds", "items_per_s")


def merge_cli(*args):
    r = CliRunner().invoke(app, ["merge", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


def content(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def same_summary(merged: dict, unsharded: dict) -> None:
    assert merged.pop("shards") >= 2
    for key in TIMING:
        merged.pop(key, None), unsharded.pop(key, None)
    assert merged == unsharded


# -- the rule --------------------------------------------------------------------------------------
def test_every_unit_has_exactly_one_shard_fixed_by_its_name():
    units = [f"videos/clip_{i:03d}.mp4" for i in range(200)]
    for n in (1, 2, 3, 7):
        owners = [[i for i in range(n) if Share(f"{i}/{n}").owns(u)] for u in units]
        assert all(len(o) == 1 for o in owners)
        assert min(sum(o == [i] for o in owners) for i in range(n)) > 200 / n / 2  # no shard starved
    # sha256's first 8 bytes mod N: a unit's shard depends on its name only, not on what else is listed
    assert shard_of("a.mp4", 4) == int.from_bytes(hashlib.sha256(b"a.mp4").digest()[:8], "big") % 4
    assert Share(None).owns("anything") and shard_dir(Path("runs/x"), "1/4") == Path("runs/x/shard-1-of-4")
    assert shard_dir(Path("runs/x"), None) == Path("runs/x")


def test_shards_of_one_split_may_differ_in_where_they_write_and_their_process_count():
    recipe = {"stage": "filter", "data": {"input": "qa.jsonl", "shard": "1/4"}, "launch": {"nproc_per_node": 8},
              "output": {"dir": "runs/x", "overwrite": True}, "filter": {"samples": 10}}
    assert shards.without_shard(recipe) == {"stage": "filter", "data": {"input": "qa.jsonl"}, "output": {},
                                            "filter": {"samples": 10}}


@pytest.mark.parametrize("text,why", [("2/2", "got '2/2'"), ("1", "got '1'"), ("-1/2", "got '-1/2'"),
                                      ("a/b", "got 'a/b'"), ("0/0", "got '0/0'")])
def test_bad_shards_are_refused_in_one_line(text, why):
    with pytest.raises(ValueError, match=rf"^shard: expected 'i/N' with 0 <= i < N \(e.g. '0/4'\), {why}$"):
        Shard.parse(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes/demo/caption.toml", [f'data.shard="{text}"'])
    assert str(e.value).endswith(f"data.shard: expected 'i/N' with 0 <= i < N (e.g. '0/4'), {why}")
    assert "\n" not in str(e.value)


def test_only_data_stages_take_a_shard_and_a_shard_is_not_pushed():
    assert load_recipe(ROOT / "recipes/demo/filter.toml", ["data.shard=2/3"]).data.shard == "2/3"
    assert load_recipe(ROOT / "recipes/demo/generate_qa.toml", ["data.shard=0/1"]).data.shard == "0/1"
    with pytest.raises(RecipeError, match="data.shard: unknown key$"):
        load_recipe(ROOT / "recipes/demo/sft.toml", ["data.shard=0/2"])
    with pytest.raises(RecipeError, match=r"hub.push: a shard is part of a dataset: `lvr merge` the shards"):
        load_recipe(ROOT / "recipes/demo/caption.toml", ["data.shard=0/2", "hub.push=true", 'hub.repo_id="a/b"'])


def test_the_launch_gives_caption_and_generate_qa_one_shard_per_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
              "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(k, "")  # recorded, so the test's end restores each
        monkeypatch.delenv(k)
    cap = load_recipe(ROOT / "recipes/demo/caption.toml")
    assert shards.launch_shard(cap) is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert shards.launch_shard(cap) == "3/4" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"  # its node-local GPU
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win over srun's
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert shards.launch_shard(cap) == "1/2" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert shards.launch_shard(load_recipe(ROOT / "recipes/demo/caption.toml", ["data.shard=0/3"])) is None
    assert shards.launch_shard(load_recipe(ROOT / "recipes/demo/filter.toml")) is None  # filter: DP in one run
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert shards.launch_shard(cap) is None


# -- caption: 2 shards merged == 1 run --------------------------------------------------------------
def caption_recipe(listing: Path, out: Path, shard: str | None = None) -> CaptionRecipe:
    return CaptionRecipe.model_validate({
        "data": {"input": str(listing), "shard": shard}, "output": {"dir": str(out)},
        "caption": {"clip_seconds": 3.0, "frames_per_clip": 4, "min_last_clip_s": 0.5},
        "video": {"max_pixels": 56 * 56}})


def run_caption(r: CaptionRecipe) -> dict:
    run = RunDir(shard_dir(Path(r.output.dir), r.data.shard), r).open()  # as `lvr caption` places it
    return run.finish(caption.run(r, run))


class OddVLM(FakeVLM):
    """Captions holding U+2028, which JSON writes as it is and `str.splitlines` would split on."""

    def generate(self, requests):
        return [r if not r.ok else type(r)(r.key, r.text + "\u2028and after") for r in super().generate(requests)]


@pytest.fixture(scope="module")
def caption_runs(videos, tmp_path_factory):  # noqa: F811
    """A JSONL list of 5 videos (one corrupt) and a bad line, captioned once whole and once in 2 shards."""
    root = tmp_path_factory.mktemp("caption_shards")
    names = ["synth-s0-0000.mp4", "synth-s0-0001.mp4", "short.mp4", "broken.mp4", "synth-s0-0002.mp4"]
    lines = [json.dumps({"video": f"videos/{n}"}) for n in names]
    lines.insert(2, json.dumps({"what": "no video here"}))
    listing = videos / "list.jsonl"
    listing.write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption, "make_backend", lambda cfg: OddVLM(fail={"videos/short.mp4#0"}))
        whole = run_caption(caption_recipe(listing, root / "whole"))
        parts = [run_caption(caption_recipe(listing, root / "split", f"{i}/2")) for i in range(2)]
    return listing, root, whole, parts


def test_caption_shards_merged_equal_one_run(caption_runs):
    listing, root, whole, parts = caption_runs
    units = [f"videos/{n}" for n in ("synth-s0-0000.mp4", "synth-s0-0001.mp4", "short.mp4", "broken.mp4",
                                     "synth-s0-0002.mp4")]
    assert [p["videos"] for p in parts] == [sum(shard_of(u, 2) == i for u in units) for i in range(2)]
    assert all(p["videos"] for p in parts), "the test data should give both shards work"
    info = json.loads((root / "split" / "shard-1-of-2" / "shard.json").read_text())
    assert info["shard"] == "1/2" and info["units"] == 5 and info["mine"] == parts[1]["videos"]

    code, out, err = merge_cli(root / "merged", root / "split" / "shard-1-of-2", root / "split" / "shard-0-of-2")
    # the bad line, short.mp4's clip and broken.mp4, as in the whole run: exit 1 without --allow-failures
    assert whole["failed"] == 3 and code == 1 and "3 input(s) failed" in err, err
    for name in ("captions.jsonl", "errors.jsonl"):
        assert content(root / "merged" / name) == content(root / "whole" / name), name
    assert "\u2028".encode() in content(root / "merged" / "captions.jsonl")
    errors = [json.loads(x)["key"] for x in (root / "merged" / "errors.jsonl").read_text().splitlines()]
    assert errors == [f"{listing}:3", "videos/short.mp4", "videos/broken.mp4"]  # input order
    same_summary(json.loads((root / "merged" / "summary.json").read_text()),
                 json.loads((root / "whole" / "summary.json").read_text()))
    merged_recipe = json.loads((root / "merged" / "recipe.json").read_text())
    assert merged_recipe["data"]["shard"] is None and merged_recipe["output"]["dir"] == str(root / "merged")
    assert json.loads((root / "merged" / "env.json").read_text())["merged_from"][0].endswith("shard-0-of-2")

    # a merge is a finished unsharded run: --retry-failed redoes its failed inputs and nothing else
    r = CaptionRecipe.model_validate(merged_recipe)
    backend = FakeVLM()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption, "make_backend", lambda cfg: backend)
        run = RunDir(root / "merged", r).open(retry_failed=True)
        summary = run.finish(caption.run(r, run))
    assert summary["captioned"] == 1 and summary["failed"] == 2  # the bad line and broken.mp4 stand
    assert {k.split("#")[0] for k in backend.keys} == {"videos/short.mp4"}


def test_merge_by_recipe_finds_the_shards_and_refuses_another_recipe(caption_runs, tmp_path):
    listing, root, whole, _ = caption_runs
    toml = tmp_path / "caption.toml"
    toml.write_text(f'stage = "caption"\n[data]\ninput = "{listing}"\n[output]\ndir = "{root / "split"}"\n'
                    '[caption]\nclip_seconds = 3.0\nframes_per_clip = 4\nmin_last_clip_s = 0.5\n'
                    '[video]\nmax_pixels = 3136\n')
    for _ in range(2):  # merging again over an earlier merge rewrites it the same
        code, out, err = merge_cli(toml, "--allow-failures")
        assert code == 0, err
        assert content(root / "split" / "captions.jsonl") == content(root / "whole" / "captions.jsonl")
    assert json.loads((root / "split" / "recipe.json").read_text())["output"]["dir"] == str(root / "split")
    code, _, err = merge_cli(toml, "caption.frames_per_clip=5")
    assert code == 2 and err.strip() == (f"error: {root / 'split' / 'shard-0-of-2'}: ran a different recipe than "
                                         f"{toml} (caption.frames_per_clip: 5 vs 4)")


def copy_shard(src: Path, dst: Path, **recipe_changes) -> Path:
    shutil.copytree(src, dst)
    recipe = json.loads((dst / "recipe.json").read_text())
    for dotted, value in recipe_changes.items():
        section, key = dotted.split("__")
        recipe[section][key] = value
    (dst / "recipe.json").write_text(json.dumps(recipe))
    return dst


def test_merge_refuses_an_incomplete_duplicated_mixed_or_unfinished_set(caption_runs, tmp_path):
    listing, root, _, _ = caption_runs
    s0, s1 = root / "split" / "shard-0-of-2", root / "split" / "shard-1-of-2"
    out = tmp_path / "out"

    def refused(*dirs) -> str:
        code, stdout, err = merge_cli(out, *dirs)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        return err.strip().removeprefix("error: ")

    assert refused(s0) == "missing shard(s) 1/2 of 2 (have 0/2)"
    again = copy_shard(s0, tmp_path / "again")
    assert refused(s0, again, s1) == f"shard 0/2 given twice: {s0} and {again}"
    third = copy_shard(s1, tmp_path / "third", data__shard="1/3")
    assert refused(s0, third) == f"shards of different splits: 0/2 ({s0}) and 1/3 ({third})"
    other = copy_shard(s1, tmp_path / "other", caption__frames_per_clip=8)
    assert refused(s0, other) == f"{other}: a different recipe than {s0} (caption.frames_per_clip: 4 vs 8)"
    unfinished = copy_shard(s1, tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    assert refused(s0, unfinished) == (f"{unfinished}: shard 1/2 is unfinished (no summary.json): rerun it with "
                                       "data.shard=1/2 to resume it, then merge")
    assert refused(tmp_path) == f"{tmp_path}: not a shard's run directory (no recipe.json with data.shard)"
    code, _, err = merge_cli(s0, s0, s1)
    assert code == 2 and "is shard 0/2's directory" in err
    code, _, err = merge_cli(root / "whole", s0, s1)  # an unsharded run is not overwritten
    assert code == 2 and "holds a run that is not a merge of shards" in err
    assert not out.exists()

    moved = tmp_path / "list.jsonl"  # the input changed since the shards listed it
    listing.rename(moved)
    try:
        listing.write_text(moved.read_text() + json.dumps({"video": "videos/new.mp4"}) + "\n")
        assert refused(s0, s1) == (f"{s0}: data.input lists other inputs now (6) than when shard 0/2 ran (5); "
                                   "merge where and when the shards ran")
    finally:
        moved.replace(listing)


# -- filter: 3 shards merged == 1 run ---------------------------------------------------------------
def test_filter_shards_merged_equal_one_run(data, uninterrupted, tmp_path, monkeypatch):  # noqa: F811
    parity_accuracy(monkeypatch)
    whole_summary, whole = uninterrupted
    parts = []
    for i in range(3):
        body = make_recipe(data, tmp_path / "split").model_dump()
        r = FilterRecipe.model_validate(body | {"data": body["data"] | {"shard": f"{i}/3"}})
        run = RunDir(shard_dir(tmp_path / "split", r.data.shard), r).open()
        parts.append(run.finish(filt.run(r, run)))
    assert sum(bool(p["scored"]) for p in parts) >= 2, "the test data should give two shards questions"
    # each video's questions in one shard: encoded once there, as in the whole run
    assert sum(p["vision_encodes"] for p in parts) == whole_summary["vision_encodes"]

    dirs = [tmp_path / "split" / f"shard-{i}-of-3" for i in (2, 0, 1)]
    code, _, err = merge_cli(tmp_path / "merged", *dirs, "--allow-failures")
    assert code == 0, err
    for name in ("scores.jsonl", "samples.jsonl", "rl.jsonl", "sft.jsonl", "errors.jsonl", "filter_stats.json"):
        assert content(tmp_path / "merged" / name) == content(whole.path / name), name
    assert (tmp_path / "merged" / "pass_rates.png").read_bytes()[:4] == b"\x89PNG"
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    same_summary(merged, json.loads((whole.path / "summary.json").read_text()))
