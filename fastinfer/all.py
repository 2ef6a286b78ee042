"Everything a fastai user needs: `from fastinfer.all import *` patches `Learner` with the fast_* methods"
from .core import *
from .preds import *
from .engine import *
