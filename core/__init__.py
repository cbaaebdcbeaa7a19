"""Layerscope core: what fine-tuning changed inside a transformer, layer by layer.

Every pipeline step lives in its own module and reads/writes a run folder
(see ``core.runfolder``). Nothing in this package imports streamlit.
"""

__version__ = "0.1.0"
