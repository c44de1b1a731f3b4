"""Seeing the gates: :mod:`~grulab.views.viz` (the HTML gate page), :mod:`~grulab.views.plots`
(the gate heatmap, the cat/mouse figure) and :mod:`~grulab.views.catmouse` (the demo).
"""
