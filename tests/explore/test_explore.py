"""qlora_lab.explore: every view computes what the chapter's own functions compute, and a
widget redraws when a knob moves and saves the default numbers and figure with itself."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from qlora_lab.explore import views, widgets  # noqa: E402
from qlora_lab.memory.costs import GB, estimate, gpu_capacity_bytes  # noqa: E402
from qlora_lab.quant import double_quant, int8, nf4, zeropoint  # noqa: E402


def close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("scheme", ["absmax", "zero-point"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_grid_counts_the_levels_the_quantizer_uses(bits, scheme):
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for outlier in (1, 10):
        fig, text = views.int_grid(x, bits, scheme, outlier)
        close(fig)
        y = x.clone()
        y[-1] = outlier * x[:-1].abs().max()
        q = int8.absmax_quantize(y, bits)[0] if scheme == "absmax" else zeropoint.zeropoint_quantize(y, bits)[0]
        levels = 2 ** bits - 1 if scheme == "absmax" else 2 ** bits
        assert f"{torch.unique(q[:-1]).numel()} of {levels} levels" in text


def test_an_outlier_leaves_the_other_values_fewer_levels_and_more_error():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    used = []
    for outlier in (1, 60):
        fig, text = views.int_grid(x, 8, "absmax", outlier)
        close(fig)
        used.append(int(text.split(": ")[1].split(" of ")[0]))
    assert used[1] < used[0] / 4


def test_code_grid_nf4_error_is_quantize_4bit_round_trip():
    w = torch.randn(64 * 1000, generator=torch.Generator().manual_seed(1))
    for blocksize in (64, 4096):
        fig, text = views.code_grid(w, "NF4", blocksize)
        close(fig)
        packed, state = nf4.quantize_4bit(w, blocksize=blocksize)
        error = ((nf4.dequantize_4bit(packed, state) - w).norm() / w.norm()).item()
        assert f"relative error {error:.3f}" in text
        assert f"{4 + 32 / blocksize:.3f} bits per weight" in text


def test_code_grid_knows_its_types_and_refuses_others():
    w = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    errors = {}
    for name in views.CODES:
        fig, text = views.code_grid(w, name, 64)
        close(fig)
        errors[name] = float(text.split("relative error ")[1].split(",")[0])
    assert errors["NF4"] < errors["Int4"] and errors["NF4"] < errors["NF3"]
    with pytest.raises(ValueError, match="data_type must be one of"):
        views.code_grid(w, "NF5")


def test_constants_cost_is_the_papers_formula_and_the_storage_count():
    for double in (False, True):
        fig, text = views.constants_cost("llama-7b", 64, double, 256)
        close(fig)
        bits = double_quant.expected_bits_per_parameter(64, double, 256)
        assert f"{bits:.4f} bits per parameter" in text
    fig, text = views.constants_cost("llama-65b", 64, True, 256)
    close(fig)
    assert "4.1270 bits per parameter" in text
    weights_gb = estimate("llama-65b", "qlora").weights / GB  # the same bytes memory.estimate counts
    assert f"weights {weights_gb:.2f} GB" in text


def test_rank_view_misses_what_the_truncated_svd_misses():
    delta = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    for r in (1, 5, 30):
        fig, text = views.rank_view(delta, r)
        close(fig)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        missed = ((delta - best).norm() / delta.norm()).item()
        assert f"misses {missed:.1%}" in text
        assert f"{r * 70:,} trainable numbers" in text
    with pytest.raises(ValueError, match="r must be from 1 to 30"):
        views.rank_view(delta, 31)


@pytest.mark.parametrize("paged", [False, True])
def test_memory_budget_fits_exactly_when_the_estimate_does(paged):
    for gpu, model, seq_len in ((12, "llama-7b", 512), (12, "llama-13b", 512), (48, "llama-65b", 512),
                                (24, "llama-33b", 512), (80, "llama-65b", 8192)):
        fig, text = views.memory_budget(gpu, model, 1, seq_len, 64, paged)
        close(fig)
        e = estimate(model, "qlora", 64, seq_len, 1, True)
        needed = e.peak - e.optimizer if paged else e.peak
        assert text.endswith("without paging") != paged
        assert (": fits" in text) == (needed <= gpu_capacity_bytes(gpu)), (gpu, model, text)
        assert f"peak {e.peak / GB:.2f} GB" in text


def test_paging_lets_a_step_fit_that_would_not_fit_otherwise():
    """Somewhere between the card sizes a paged step fits where an unpaged one does not."""
    found = []
    for seq_len in (256, 512, 1024, 2048, 4096, 8192):
        texts = []
        for paged in (False, True):
            fig, text = views.memory_budget(12, "llama-13b", 1, seq_len, 64, paged)
            close(fig)
            texts.append(": fits" in text)
        found.append(tuple(texts))
    assert (False, True) in found


def test_explore_redraws_when_a_knob_moves_and_saves_the_default(capsys):
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    bits = widgets.slider("bits", range(2, 9), 8)
    box = widgets.explore(lambda bits: views.int_grid(x, bits, "absmax", 1), bits=bits)
    default = views.int_grid(x, 8, "absmax", 1)
    close(default[0])
    shown = capsys.readouterr().out
    assert default[1] in shown and "image/png" in shown  # the bundle nbval and the decks read
    first = box.children[1].value
    bits.value = 3
    assert box.children[1].value != first and "3-bit absmax" in box.children[1].value
    assert box.children[2].outputs[0]["data"]["text/plain"].startswith("3-bit absmax")
    assert box.redraw().startswith("3-bit absmax")


def test_explore_shows_itself_under_ipywidgets_7_as_on_colab(monkeypatch):
    """Colab ships ipywidgets 7, whose widgets have no ``_repr_mimebundle_``
    (tried by hand with 7.8.5): the widget is displayed as it is, and still redraws."""
    import ipywidgets
    import IPython.display

    shown = []
    monkeypatch.delattr(ipywidgets.Widget, "_repr_mimebundle_")
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **kwargs: shown.extend(objects))
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    bits = widgets.slider("bits", range(2, 9), 8)
    box = widgets.explore(lambda bits: views.int_grid(x, bits, "absmax", 1), bits=bits)
    assert shown == [box]
    bits.value = 4
    assert "4-bit absmax" in box.children[1].value


def test_explore_says_what_is_wrong():
    with pytest.raises(ValueError, match="at least one control"):
        widgets.explore(lambda: None)
    with pytest.raises(TypeError, match=r"must return \(figure, text\)"):
        widgets.explore(lambda r: 1.0, r=widgets.slider("r", [1, 2], 1))
    with pytest.raises(ValueError, match="is not one of"):
        widgets.slider("r", [1, 2], 3)
    with pytest.raises(ValueError, match="is not one of"):
        widgets.choice("scheme", ["absmax"], "zero-point")
    assert math.isclose(widgets.switch("dq", 1).value, 1)


def test_every_explorer_cell_saves_the_numbers_and_the_figure_and_no_widget_state():
    """A chapter's saved explorer output carries the three forms (widget, text for nbval, PNG for
    the decks), and the notebook stores no widget state: with state, nbconvert would draw the
    widget in the deck with JavaScript from the network instead of showing the saved figure."""
    import json
    from pathlib import Path

    notebooks = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    with_explorers = 0
    for path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        assert "widgets" not in nb["metadata"], f"{path.name} stores widget state; strip metadata.widgets"
        for cell in nb["cells"]:
            if cell["cell_type"] != "code" or "widgets.explore(" not in "".join(cell["source"]):
                continue
            with_explorers += 1
            data = [o["data"] for o in cell["outputs"] if o["output_type"] == "display_data"]
            assert len(data) == 1 and cell["outputs"] == [o for o in cell["outputs"] if o["output_type"] == "display_data"], (
                f"{path.name}: an explorer cell must show one output, the explorer")
            assert {"text/plain", "image/png", "application/vnd.jupyter.widget-view+json"} <= set(data[0]), (
                f"{path.name}: the explorer's output lacks a form: {sorted(data[0])}")
    assert with_explorers >= 5, f"only {with_explorers} explorer cells in the chapters"
