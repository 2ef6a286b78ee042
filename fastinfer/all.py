"Everything a fastai user needs: `from fastinfer.all import *` patches `Learner` with the fast_*, export, quantize and TTA methods"
from .core import *
from .engine import *
from .tabular import *
from .preds import *
from .export import *
from .quant import *
from .tta import *
from .runtime import load, Predictor
from .jit import load_jit
