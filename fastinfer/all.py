"Everything a fastai user needs: `from fastinfer.all import *` patches `Learner` with the fast_* and export methods"
from .core import *
from .engine import *
from .preds import *
from .export import *
from .jit import load_jit, JitPredictor
