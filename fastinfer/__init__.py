__version__ = "0.1.0"

# `import fastinfer` gives fastai's `Learner` its fast_* methods without importing fastai (or torch) itself:
# `fastinfer.runtime` must stay importable where only numpy, Pillow and onnxruntime are installed.
import sys as _sys

_METHODS = ('fast_get_preds', 'fast_predict', 'fast_iter_preds', 'fast_tta', 'fast_prepare', 'fast_backend', 'fast_select',
            'export_onnx', 'export_jit', 'export_program', 'export_spec', 'quantize')

def _stub(name):
    "A placeholder for `Learner.<name>` that imports `fastinfer.all` (which patches in the real method) on first call"
    def f(self, *args, **kwargs):
        import fastinfer.all
        return getattr(self, name)(*args, **kwargs)
    f.__name__ = f.__qualname__ = name
    return f

def _add_stubs(Learner):
    for n in _METHODS:
        if n not in Learner.__dict__: setattr(Learner, n, _stub(n))

class _PatchOnImport:
    "Import hook: once `fastai.learner` has loaded, give its `Learner` the placeholders (importing fastai's modules from here would be circular)"
    def find_spec(self, name, path=None, target=None):
        if name!='fastai.learner': return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None: return spec
        exec_module = spec.loader.exec_module
        def run(module):
            exec_module(module)
            _sys.meta_path[:] = [f for f in _sys.meta_path if not isinstance(f, _PatchOnImport)]
            _add_stubs(module.Learner)
        spec.loader.exec_module = run
        return spec

if 'fastai.learner' in _sys.modules: _add_stubs(_sys.modules['fastai.learner'].Learner)
elif not any(isinstance(f, _PatchOnImport) for f in _sys.meta_path): _sys.meta_path.insert(0, _PatchOnImport())
