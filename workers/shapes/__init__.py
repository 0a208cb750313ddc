"""`shapes-sd`: a small Stable Diffusion model trained on a world of coloured shapes.

It ships with farm so that a first `farm run` draws what the prompt asks for, and so
tests can check meaning (colour, layout, inpainting), not just that pixels came out.
`world` draws the training images and captions, `analysis` reads them back with plain
image analysis, `train` reproduces the weights, `quality` measures them.
"""

from pathlib import Path

from farm.spec import SHAPES_SD

NAME = SHAPES_SD
#: The trained weights, a diffusers folder inside the package (fp16 safetensors).
MODEL_DIR = Path(__file__).parent / "model"
