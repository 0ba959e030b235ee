"""Interactive figures: turn a knob, see the idea change.

A chapter hands :func:`explore` a *view*, a function that takes the knobs'
values as keyword arguments and returns ``(figure, text)``: a matplotlib
figure and a few lines of numbers, both computed by the package's real
functions. ``explore`` puts one ipywidgets control per knob above an output
area, draws the view at the knobs' first values, and draws it again whenever
a knob moves.

The cell's saved output has three forms of the same thing, and each reader
takes the one it can show:

* JupyterLab with a running kernel shows the live widget (the
  ``application/vnd.jupyter.widget-view+json`` form);
* nbval compares the ``text/plain`` form, the numbers at the default values
  (it never compares widget views or images), so the notebooks stay strictly
  testable;
* the decks of ``make slides`` (nbconvert keeps no widget state) show the
  ``image/png`` form, the figure at the default values.

Controls are made with :func:`slider`, :func:`choice` and :func:`switch` so
that every chapter's knobs look and behave alike (a redraw only when the
knob is released, not on every pixel of a drag).
"""

from __future__ import annotations

import base64
import io
from typing import Callable

View = Callable[..., tuple]


def slider(label: str, values, value):
    """A slider over the listed ``values`` (numbers, in order), starting at ``value``."""
    import ipywidgets as widgets

    values = list(values)
    if value not in values:
        raise ValueError(f"slider {label!r}: the start value {value!r} is not one of {values}")
    return widgets.SelectionSlider(options=values, value=value, description=label, continuous_update=False,
                                   style={"description_width": "initial"},
                                   layout=widgets.Layout(width="360px"))


def choice(label: str, options, value):
    """A row of toggle buttons, one per option, starting at ``value``."""
    import ipywidgets as widgets

    options = list(options)
    if value not in options:
        raise ValueError(f"choice {label!r}: the start value {value!r} is not one of {options}")
    return widgets.ToggleButtons(options=options, value=value, description=label,
                                 style={"description_width": "initial", "button_width": "auto"})


def switch(label: str, value: bool):
    """An on/off checkbox."""
    import ipywidgets as widgets

    return widgets.Checkbox(value=bool(value), description=label, indent=False)


def figure_png(fig) -> str:
    """The figure as a base64 PNG, the form a notebook stores an image in."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=fig.dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def draw(view: View, values: dict) -> tuple:
    """Run the view at ``values``; a view must return ``(figure, text)``."""
    result = view(**values)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str)):
        raise TypeError(f"{getattr(view, '__name__', view)!r} must return (figure, text), got {type(result).__name__}")
    return result


def explore(view: View, **controls):
    """Show ``view`` with one control per keyword (``bits=slider("bits", range(2, 9), 4)``).

    Returns the widget (displayed already); ``widget.redraw()`` draws the view
    again at the controls' current values and returns its text, which is how
    the tests move a knob without a browser.

    The figure reaches the output area as a stored PNG (its ``outputs``
    trait), not through ``display`` inside ``with out:``: then it travels
    with the widget's state, and a kernel with no front end (nbval,
    nbconvert) sees no extra cell output."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    if not controls:
        raise ValueError("explore needs at least one control: explore(view, name=slider(...), ...)")
    out = widgets.Output()
    readout = widgets.HTML()

    def redraw(_change=None) -> str:
        fig, text = draw(view, {name: control.value for name, control in controls.items()})
        png = figure_png(fig)
        plt.close(fig)
        readout.value = "<pre style='margin: 0'>" + text.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"
        out.outputs = ({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": png, "text/plain": text}},)
        return text

    text = redraw()
    box = widgets.VBox([widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")),
                        readout, out])
    box.add_class("qlora-lab-explorer")
    box.redraw = redraw
    for control in controls.values():
        control.observe(redraw, names="value")
    if not hasattr(box, "_repr_mimebundle_"):
        # ipywidgets 7, which Colab ships (its front end does not show 8): the widget displays
        # itself, without the stored text and PNG forms; the live figure is the same
        display(box)
        return box
    bundle = box._repr_mimebundle_()
    bundle = dict(bundle[0] if isinstance(bundle, tuple) else bundle)
    bundle["text/plain"] = text
    bundle["image/png"] = out.outputs[0]["data"]["image/png"]
    display(bundle, raw=True)
    return box
