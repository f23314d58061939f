"""cfdeploy: deploy CF-CLIP text-driven StyleGAN2 editors (exact models, export, fast edit CLI).

The package follows the data flow, files → models → bundle → backends → edit → outputs:

- ``checkpoints``, ``inputs``, ``tokenizer``: read the user's files (safely, strictly).
- ``models``: the networks in PyTorch, plus the official formulation as a parity reference.
- ``contracts``, ``exporter``, ``bundle``, ``refit``: ONNX bundles, the unit that is deployed.
- ``backends``: one registry of runtimes (torch, ONNX Runtime, TensorRT); ``trt`` builds engines.
- ``editing``, ``refine``: the edit itself, independent of the runtime.
- ``outputs``: staged, atomic, locked writes of what the edit makes.
- ``cli``: thin commands over all of it; ``bench``, ``inspection``, ``embedding``, ``demo`` serve them.

Features to come get a subpackage each that uses the registry, bundles and the edit pipeline
(photo inversion, serving, DAC, mapper training) rather than copying them.
"""

__version__ = "0.1.0"
