"""DAC (Doubly Abductive Counterfactual inference, CVPR 2024): edit any image with Stable Diffusion.

Abduction-1 fits a UNet LoRA U to the image and its prompt P; Abduction-2 fits a text-encoder LoRA Δ
so that the model with U reconstructs the image from the target prompt P′; the edit samples P′ with
Δ subtracted (adapter weight −β) and U annealed by γ(t) at every UNet call.

- :mod:`cfdeploy.dac.base_model`: the local diffusers folder of the base model, checked and hashed.
- :mod:`cfdeploy.dac.lora`: the adapters (PEFT), their per-call weights and their files.
- :mod:`cfdeploy.dac.abduct`: the two abductions, resumable, as the official scripts train them.
- :mod:`cfdeploy.dac.predict`: the edit, as the official ``inference_t.py`` samples it.
"""
