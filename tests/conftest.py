"Shared fixtures: one tiny learner per task kind, built once per test session"
import os, warnings, pytest
# the on-disk model cache is off in tests (here and in the servers and CLIs they start), so each test measures and exports
# for itself; tests/test_cache.py turns it on in a folder of its own
os.environ['FASTINFER_CACHE'] = '0'
from fastinfer.test_utils import KINDS, synth_learner

warnings.filterwarnings('ignore', message='.*insecure pickle.*')

@pytest.fixture(scope='session')
def root(tmp_path_factory): return tmp_path_factory.mktemp('fastinfer')

_cache = {}
def learner(kind, root):
    if kind not in _cache: _cache[kind] = synth_learner(kind, root/kind, n=44, epochs=1)
    return _cache[kind]

def as_saved(kind, learn):
    "`learn` with its model in the mode its `.pkl` saved it in: 'train' learners in training mode, which fastai's own calls undo"
    if kind=='train': learn.model.train()
    return learn

@pytest.fixture(scope='session', params=KINDS)
def _kind_learner(request, root): return (request.param,) + learner(request.param, root)

@pytest.fixture
def kind_learner(_kind_learner):
    kind,learn,files = _kind_learner
    as_saved(kind, learn)
    return _kind_learner

@pytest.fixture(scope='session')
def single(root): return learner('single', root)
