"""Interactive figures in JupyterLab: turn a knob, see the idea change (chapters 01 to 07).

Read it in this order:

1. :mod:`qlora_lab.explore.views`: one view per idea, ``(figure, text)`` at
   given knob values, computed by the chapters' own functions: the integer
   grid of chapter 01, a 4-bit code over the weights (02), the cost of the
   block constants (03), the best rank-r update (04) and a QLoRA step's
   memory on a GPU (06, 07).
2. :mod:`qlora_lab.explore.widgets`: :func:`explore` puts ipywidgets controls
   on a view, and saves the default figure and numbers with the widget, so
   that nbval compares them and the decks show them.

A chapter imports both: ``from qlora_lab.explore import views, widgets``.
"""
