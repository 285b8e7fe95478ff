"""A quiet console: libraries' output (native stderr, logging, warnings, progress bars) goes to
the run's run.log; a crash is one console line naming the error and the file holding its
traceback; `--verbose` lets everything through."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A stage that makes the noise real libraries make, then fails (or not: NOISY_OK=1).
NOISY = r'''
import logging, os, sys, warnings
from pathlib import Path

import typer

from lvr_cli.main import run_stage


def noisy(recipe, run):
    from transformers.utils import logging as hf_logging

    os.write(2, b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0] moov atom not found\n")  # FFmpeg, from C
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU.")
    hf_logging.get_logger("transformers.modeling_utils").warning("Some weights were not initialized")
    warnings.warn("a library's deprecation", FutureWarning)
    print(f"progress bars: {hf_logging.is_progress_bar_enabled()}")
    print("lvr: skipped video7.mp4", file=sys.stderr)  # lvr's own messages stay on the console
    if os.environ.get("NOISY_OK"):
        return {"failed": 0}
    raise ValueError("boom: the stage broke\nits second line")


try:
    run_stage("synth", noisy, Path(sys.argv[1]), sys.argv[2:])
except typer.Exit as e:
    sys.exit(e.exit_code)
os.write(2, b"after the stage\n")  # the terminal's stderr is back
'''


def noisy_stage(tmp_path, **env):
    out = tmp_path / "run"
    script = tmp_path / "noisy.py"
    script.write_text(NOISY)
    r = subprocess.run([sys.executable, str(script), "recipes/demo/synth.toml", f"output.dir={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "LVR_VERBOSE": "", **env})
    return r, out


def test_library_noise_goes_to_run_log_and_a_crash_is_one_console_line(tmp_path):
    r, out = noisy_stage(tmp_path)
    log = out / "run.log"
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["lvr: skipped video7.mp4",
                                     f"error: ValueError: boom: the stage broke (traceback in {log})"]
    assert r.stdout.splitlines() == ["progress bars: False"]
    text = log.read_text()
    for noise in ("moov atom not found", "WARNING DeepSpeed: Setting accelerator to CPU.",
                  "WARNING transformers.modeling_utils: Some weights were not initialized",
                  "FutureWarning: a library's deprecation", "Traceback (most recent call last):",
                  'raise ValueError("boom: the stage broke\\nits second line")',
                  "ValueError: boom: the stage broke\nits second line"):
        assert noise in text, noise


def test_a_stage_that_ends_well_restores_the_console(tmp_path):
    r, out = noisy_stage(tmp_path, NOISY_OK="1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["lvr: skipped video7.mp4", "after the stage"]
    assert "moov atom not found" in (out / "run.log").read_text()


def test_verbose_lets_the_libraries_print_and_keeps_the_traceback_in_the_log_too(tmp_path):
    r, out = noisy_stage(tmp_path, LVR_VERBOSE="1")
    assert r.returncode == 1
    assert "moov atom not found" in r.stderr and "Some weights were not initialized" in r.stderr
    assert "Traceback (most recent call last):" in r.stderr
    assert r.stderr.splitlines()[-1] == f"error: ValueError: boom: the stage broke (traceback in {out / 'run.log'})"
    assert "ValueError: boom" in (out / "run.log").read_text()
    assert "progress bars: True" in r.stdout


def test_verbose_is_an_option_of_lvr(tmp_path):
    r = subprocess.run([Path(sys.executable).with_name("lvr"), "--verbose", "validate", "recipes/demo/synth.toml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and '"stage": "synth"' in r.stdout


LAUNCHED = r"""
import os, signal, sys, time
rank = int(os.environ["RANK"])
if sys.argv[1] == "signal" and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # dies without a word, as the OOM killer does
if sys.argv[1] == "error" and rank == 0:
    print("error: ValueError: bad (traceback in run.log)", file=sys.stderr)  # what a failing lvr rank says
    sys.exit(3)
time.sleep(30)
"""


def test_the_launcher_adds_a_line_only_for_a_rank_that_died_silently(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(LAUNCHED)

    def launch(kind):
        return subprocess.run([sys.executable, "-m", "lvr_cli.torchrun", "--nproc_per_node=2", "--master_port=0",
                               str(script), kind], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "LVR_VERBOSE": ""})

    said = launch("error")
    assert (said.returncode, said.stderr.splitlines()) == (3, ["error: ValueError: bad (traceback in run.log)"])
    killed = launch("signal")
    assert killed.returncode == 1
    assert killed.stderr.splitlines() == ["error: rank 1 died of SIGKILL (out of memory or a crash in native code; "
                                          "lvr --verbose shows the launcher's report)"]
