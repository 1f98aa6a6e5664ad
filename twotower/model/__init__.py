"""The two-tower model: two_tower.py (the model: the context tower's passes and the denoiser's),
denoiser.py (the kinds of denoiser), inference.py (merge, quantise, compile), checkpoint.py
(save / load, `load_model`), protocol.py (what the decoders call), and the parts: cache.py,
layout.py, masks.py, adaln.py, lora.py."""
