"""Plots: units on the axes, accuracy in % on its own axis, legends outside the data, the bench's
frame-count ticks and OOM marks (and its memory-cap panel), the filter histogram on [0, 1]."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stages.plots import CURVES, draw_metrics  # noqa: E402


def outside(fig, legend, axes) -> bool:
    """Whether `legend` covers none of `axes` (data areas) once drawn."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = legend.get_window_extent(r)
    return all(not box.overlaps(ax.get_window_extent(r)) for ax in axes)


def test_rl_curves_put_accuracy_in_percent_on_its_own_axis():
    rows = [{"step": 1, "reward/total": 0.75, "reward/format": 1.0, "reward/accuracy": 0.25, "eval_accuracy": 0.5},
            {"step": 2, "reward/total": 1.25, "reward/format": 1.0, "reward/accuracy": 0.75}]
    _, keys, title = CURVES["rl"]
    fig = draw_metrics(rows, keys, title)
    reward_ax, acc_ax = fig.axes
    assert reward_ax.get_ylabel() == "reward per response" and reward_ax.get_xlabel() == "training step"
    assert [l.get_label() for l in reward_ax.get_lines()] == ["reward/total", "reward/format"]
    assert acc_ax.get_ylabel() == "accuracy (%)" and acc_ax.get_ylim() == (0, 100)
    lines = {l.get_label(): list(l.get_ydata()) for l in acc_ax.get_lines()}
    assert lines == {"reward/accuracy (%)": [25.0, 75.0], "eval_accuracy (%)": [50.0]}
    assert outside(fig, fig.legends[0], fig.axes)
    plt.close(fig)


def test_sft_curves_label_the_loss_unit():
    fig = draw_metrics([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.5}], *CURVES["sft"][1:])
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "loss (nats per target token)"
    assert outside(fig, fig.legends[0], fig.axes)
    plt.close(fig)


def test_bench_plot_ticks_are_the_frame_counts_and_ooms_are_marked(tmp_path, monkeypatch):
    from stages import bench_report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    res = [{"mode": m, "frames": f, "oom": (m, f) in {("vanilla", 256), ("vanilla", 512), ("peer", 512)},
            "seconds_per_step": f / 64} for m in ("vanilla", "peer", "mrsp") for f in (64, 128, 256, 512)]
    bench_report.plot(res, ["vanilla", "peer", "mrsp"], tmp_path / "b.png", "CPU")
    (fig,) = figures
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [64, 128, 256, 512] and [t.get_text() for t in ax.get_xticklabels()] == \
        ["64", "128", "256", "512"]
    assert ax.get_xlabel() == "frames per video" and ax.get_ylabel() == "seconds per RL step (s)"
    marked = sorted(tuple(p) for c in ax.collections for p in c.get_offsets())
    assert marked == [(256, 1.0), (512, 1.0), (512, 1.0)]  # x at the frames, at the top edge of the axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["vanilla", "peer", "mrsp", "out of memory"]
    assert outside(fig, fig.legends[0], [ax])
    assert (tmp_path / "b.png").stat().st_size > 0


def test_bench_cap_panel_marks_the_first_failing_count_and_the_cap(tmp_path, monkeypatch):
    from stages import bench_report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    res = [{"mode": m, "frames": 512, "response_tokens": 32, "oom": False, "seconds_per_step": 1.0,
            "peak_memory_gb": {"vanilla": 0.9, "mrsp": 0.5}[m]} for m in ("vanilla", "mrsp")]
    searches = [{"mode": "vanilla", "response_tokens": 32, "largest_fitting_frames": 704, "oom_at_frames": 768,
                 "probes": [{"frames": 1024, "fits": False, "peak_memory_gb": 1.3},
                            {"frames": 768, "fits": False, "peak_memory_gb": 1.26},
                            {"frames": 640, "fits": True, "peak_memory_gb": 1.1},
                            {"frames": 704, "fits": True, "peak_memory_gb": 1.2}]},
                {"mode": "mrsp", "response_tokens": 32, "largest_fitting_frames": 2048, "oom_at_frames": None,
                 "probes": [{"frames": 1024, "fits": True, "peak_memory_gb": 0.8},
                            {"frames": 2048, "fits": True, "peak_memory_gb": 1.2}]}]
    bench_report.plot(res, ["vanilla", "mrsp"], tmp_path / "c.png", "CPU", searches, 1.25)
    (fig,) = figures
    _, mem = fig.axes
    assert mem.get_xlabel() == "frames per video" and mem.get_ylabel() == "peak memory per rank (GiB)"
    vanilla, mrsp, cap = mem.get_lines()
    assert list(vanilla.get_xdata()) == [512, 640, 704] and list(vanilla.get_ydata()) == [0.9, 1.1, 1.2]
    assert list(mrsp.get_xdata()) == [512, 1024, 2048]  # fitting probes only, in frame order
    assert list(cap.get_ydata()) == [1.25, 1.25]
    assert [tuple(p) for c in mem.collections for p in c.get_offsets()] == [(768, 1.0)]  # one x: vanilla's OOM
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["vanilla", "mrsp", "memory cap", "out of memory"]
    assert outside(fig, fig.legends[0], fig.axes)


def test_bench_plot_of_one_frame_count_puts_response_tokens_on_x(tmp_path, monkeypatch):
    from stages import bench_report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    res = [{"mode": m, "frames": 512, "response_tokens": t, "oom": False, "seconds_per_step": t / 32 * (m == "vanilla")
            + 1} for m in ("vanilla", "mrsp-shared") for t in (32, 128, 512)]
    bench_report.plot(res, ["vanilla", "mrsp-shared"], tmp_path / "r.png", "CPU")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_xlabel() == "response tokens per rollout" and list(ax.get_xticks()) == [32, 128, 512]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[32, 128, 512]] * 2
    assert list(ax.get_lines()[0].get_ydata()) == [2.0, 5.0, 17.0]


def test_filter_histogram_axis_is_zero_to_one(tmp_path, monkeypatch):
    from stages.filter import plot_pass_rates

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_pass_rates([0.0, 0.25, 0.5, 0.5, 1.0], SimpleNamespace(samples=4, band_low=0.0, band_high=1.0),
                    tmp_path / "p.png")
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_xlim() == (0.0, 1.0) and list(ax.get_xticks()) == [0, 0.25, 0.5, 0.75, 1.0]
    assert [p.get_height() for p in ax.patches[1:]] == [1, 1, 2, 0, 1]  # after the band's span
    assert ax.get_xlabel() == "pass rate (fraction of 4 samples correct)"
    assert outside(fig, fig.legends[0], [ax])
