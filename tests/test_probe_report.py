"""The probe report's plots and its pointer to the long lengths (mamba_eval/commands/probe_report.py),
on hand-made results: no model runs."""

from __future__ import annotations

import pytest

from mamba_eval.commands.probe import LONG_LENGTHS, _longer_run
from mamba_eval.commands.probe_report import figures, longer_run_lines
from mamba_eval.harness.probe_common import length_name, parse_lengths

LENGTHS = [256, 1024, 4096, 16384]


def _task(family: str, length: int, pairs: int | None, metrics: dict, seconds: float) -> dict:
    return {"task": f"t_{length}_{pairs}", "length": length, "pairs": pairs, "status": "ok", "metrics": metrics,
            "n_docs": 2, "context_tokens_min": length, "context_tokens_max": length, "data_seconds": 0.1,
            "eval_seconds": seconds, "peak_memory": {"kind": "process RSS, sampled every 10 ms",
                                                      "peak_bytes": length * (pairs or 1) * 1000}}


def _results(family: str, tasks: list[dict], lengths=LENGTHS, depths=None, longer=None) -> dict:
    return {"family": family, "tasks": tasks, "spec": {"lengths": lengths, "depths": depths}, "longer": longer}


def _mqar(pairs=(2, 4, 8)) -> dict:
    tasks = [_task("mqar", n, p, {"acc": 1 / (i + 1)}, seconds=(j + 1) * p)
             for i, n in enumerate(LENGTHS) for j, p in enumerate(pairs)]
    return _results("mqar", tasks)


@pytest.fixture
def figs():
    import matplotlib.pyplot as plt

    made = []

    def make(results):
        out = figures(results)
        for fig in out.values():
            fig.canvas.draw()  # tick labels are set when drawn
            made.append(fig)
        return out

    yield make
    for fig in made:
        plt.close(fig)


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _xticks(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text()]


def test_mqar_plot_labels_a_chance_line_per_pair_count(figs):
    pairs = (2, 4, 8)
    ax = figs(_mqar(pairs))["accuracy_vs_length.png"].axes[0]
    legend = _legend(ax)
    for p in pairs:
        assert f"{p} pairs" in legend
        chance = [line for line in ax.get_lines() if line.get_label().startswith(f"chance, {p} pairs")]
        assert len(chance) == 1 and chance[0].get_label() in legend
        assert set(chance[0].get_ydata()) == {1 / p}
        series = next(line for line in ax.get_lines() if line.get_label() == f"{p} pairs")
        assert chance[0].get_color() == series.get_color()


def test_passkey_plot_labels_its_chance_line(figs):
    from mamba_eval.harness.probe_passkey import PASSKEY_CANDIDATES

    depths = [0.0, 1.0]
    tasks = [_task("passkey", n, None, {"acc": 0.5, "acc_depth_0": 0.5, "acc_depth_100": 0.5}, 1.0) for n in LENGTHS]
    ax = figs(_results("passkey", tasks, depths=depths))["accuracy_vs_length.png"].axes[0]
    chance = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_label() in _legend(ax)
    assert set(chance[0].get_ydata()) == {1 / PASSKEY_CANDIDATES}


def test_length_axes_read_256_1K_4K_16K(figs):
    """Every length axis is labelled at the lengths run, in K, with no minor ticks."""
    out = figs(_mqar())
    axes = [out["accuracy_vs_length.png"].axes[0], *out["memory_time_vs_length.png"].axes]
    expected = [length_name(n).upper() for n in LENGTHS]
    for ax in axes:
        assert _xticks(ax) == expected
        assert ax.xaxis.get_minorticklocs().size == 0


def test_ppl_positions_axis_reads_powers_of_two(figs):
    metrics = {"loss": 3.0, "loss_0-256": 4.0, "loss_256-512": 3.5, "loss_512-1k": 3.2, "loss_1k-2k": 3.0}
    out = figs(_results("ppl", [_task("ppl", 2048, None, metrics, 1.0)], lengths=[2048]))
    labels = _xticks(out["loss_vs_position.png"].axes[0])
    assert {"256", "512", "1K"} <= set(labels)
    assert all(label[:-1].isdigit() if label.endswith(("K", "M")) else label.isdigit() for label in labels), labels


def test_memory_time_plot_says_it_shows_the_maximum_over_pair_counts(figs):
    fig = figs(_mqar((2, 4, 8)))["memory_time_vs_length.png"]
    title = fig.get_suptitle()
    assert "maximum" in title and "2, 4, 8" in title
    for ax in fig.axes:
        assert "max" in ax.get_ylabel() or "slowest" in ax.get_ylabel()
    memory = fig.axes[0].get_lines()[0].get_ydata()
    assert list(memory) == [max(t["peak_memory"]["peak_bytes"] for t in _mqar()["tasks"] if t["length"] == n) / 2 ** 30
                            for n in LENGTHS]
    # One task per length: no maximum to speak of.
    single = figs(_mqar((4,)))["memory_time_vs_length.png"]
    assert "maximum" not in single.get_suptitle()
    assert all("max" not in ax.get_ylabel() and "slowest" not in ax.get_ylabel() for ax in single.axes)


def test_time_axis_has_plain_number_labels(figs):
    ax = figs(_mqar())["memory_time_vs_length.png"].axes[1]
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(float(label) > 0 for label in labels)  # "2", "5", "10", not "$10^{1}$"


@pytest.mark.parametrize("family", sorted(LONG_LENGTHS))
def test_longer_run_names_the_flag_and_the_long_lengths(family):
    long = parse_lengths(LONG_LENGTHS[family])
    short = [min(long) // 4]
    longer = _longer_run(family, "mamba", {"pretrained": "some/model", "max_length": short[0]}, short)
    assert longer["lengths"] == long
    assert longer["command"].startswith("mamba-eval probe ")
    assert f"--lengths {','.join(map(length_name, long))}" in longer["command"]
    assert "pretrained=some/model" in longer["command"] and "max_length" not in longer["command"]
    assert ("--family" in longer["command"]) == (family != "mqar")
    lines = longer_run_lines({"longer": longer})
    assert "--lengths" in lines[0] and lines[-1].strip() == longer["command"]
    # Past the longest long length: nothing to suggest.
    assert _longer_run(family, "mamba", {}, [max(long)]) is None
    assert longer_run_lines({"longer": None}) == []
