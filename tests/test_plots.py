"""One colour per norm in every plot, ties side by side, y-axes that hold the spread and say their range."""

from __future__ import annotations

from matplotlib.figure import Figure

from tasks.common.plots import NORM_COLOURS, norm_colour, series_style, set_value_axis


def test_a_norm_keeps_its_colour_whatever_the_other_rows() -> None:
    assert norm_colour("bgn") == norm_colour("bgn, method=dann") == NORM_COLOURS["bgn"]
    first, _ = series_style(["bn", "bgn"], "bgn", 0.1)
    second, _ = series_style(["bgn", "gn", "bn", "my_norm"], "bgn", 0.1)
    assert first["color"] == second["color"] == NORM_COLOURS["bgn"]
    assert norm_colour("my_norm") == norm_colour("my_norm, lr=0.1") not in NORM_COLOURS.values()


def test_series_sit_side_by_side_with_their_own_markers_and_styles() -> None:
    rows = ["bn", "bgn", "bgn, method=dann"]
    styles = [series_style(rows, r, 0.1) for r in rows]
    assert [round(offset, 6) for _, offset in styles] == [-0.1, 0.0, 0.1]  # ties no longer hide each other
    assert len({s["marker"] for s, _ in styles}) == 3
    assert styles[1][0]["linestyle"] != styles[2][0]["linestyle"]  # same norm, another setting


def test_value_axis_holds_the_spread_with_a_minimum_span_and_says_its_range() -> None:
    ax = Figure().add_subplot()
    set_value_axis(ax, [95.0, 95.2], [95.4, 95.5], "top-1 accuracy (%)", percent=True)
    lo, hi = ax.get_ylim()
    assert lo <= 95.0 and hi >= 95.5 and hi - lo >= 5.0  # a 0.5-point difference is not blown up
    assert ax.get_ylabel() == f"top-1 accuracy (%) [axis {lo:.3g}-{hi:.3g}]"
    set_value_axis(ax, [97.0], [99.9], "acc (%)", percent=True)
    assert ax.get_ylim()[1] == 100.0 and ax.get_ylim()[0] <= 97.0
