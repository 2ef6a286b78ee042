"export_onnx / export_jit / export_program / runtime.load: parity with fast_get_preds, refusals, spec validation, no fastai (or torch) at load"
import json, subprocess, sys, warnings, pytest, torch
import numpy as np
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.test_utils import KINDS, odd_items, synth_learner, unet_synth
import fastinfer.export as fexport
from fastinfer.runtime import FORMAT, SPEC_FILE

def dp(learn, p, files):
    "max |Δp| of export `p` against `fast_get_preds`, relative to the output's scale where it exceeds 1"
    return max_dp(torch.from_numpy(p.get_preds(files)[0]), learn.fast_get_preds(files, backend='torch')[0])

def check_export(kind, learn, files, p):
    assert dp(learn, p, files) <= 1e-4, (kind, p.backend)
    probs,dec = p.get_preds(files, bs=16)
    ref = learn.fast_get_preds(files, with_decoded=True)
    if kind in ('single', 'bw', 'rrc', 'segmentation', 'multi', 'presize'): eq(dec, ref[2].numpy())
    if kind=='points':
        full = learn.fast_get_preds(files[:3], fully_decoded=True)[-1]
        close(dec[:3], np.stack([np.asarray(f) for f in full]), eps=1e-2)
    lbl = p.predict(files[0])[0]
    if kind in ('single', 'bw', 'rrc', 'multi', 'presize'): eq(lbl, learn.fast_predict(files[0])[0])

@pytest.mark.parametrize('fmt', ['onnx', 'pt', 'pt2'])
def test_export_parity(kind_learner, fmt, tmp_path):
    "every learner kind (presizing and grayscale included), to ONNX, TorchScript and torch.export, agrees with fast_get_preds"
    kind,learn,files = kind_learner
    f = {'onnx': learn.export_onnx, 'pt': learn.export_jit, 'pt2': learn.export_program}[fmt]
    check_export(kind, learn, files, load(f(tmp_path/f'{kind}.{fmt}', example_items=files[:4])))

def test_export_default_examples(root, tmp_path):
    "with no example items, probe images are made in the learner's mode (L for a grayscale learner)"
    from conftest import learner
    for kind in ('bw', 'presize'):
        learn,files = learner(kind, root)
        check_export(kind, learn, files, load(learn.export_onnx(tmp_path/f'{kind}.onnx')))

def test_unet(tmp_path):
    "a `unet_learner` segmentation model, to ONNX, TorchScript and torch.export"
    learn,files = unet_synth(tmp_path/'u')
    for fn in (learn.export_onnx(tmp_path/'u.onnx'), learn.export_jit(tmp_path/'u.pt'), learn.export_program(tmp_path/'u.pt2')):
        check_export('segmentation', learn, files, load(fn))

def test_program_batch_sizes(single, tmp_path):
    "an export_program file has a dynamic batch axis, also when exported from one example item: any batch size gives the learner's rows"
    learn,files = single
    p = load(learn.export_program(tmp_path/'m.pt2', example_items=files[:1]))
    ref = learn.fast_get_preds(files[:9], backend='torch')[0].numpy()
    for bs in (1, 4, 9): close(p.get_preds(files[:9], bs=bs)[0], ref, eps=1e-4)

def test_program_refusal(single, tmp_path, monkeypatch):
    "where torch.export cannot capture the traced graph, export_program says which formats to use and writes nothing"
    learn,files = single
    def fail(*args, **kwargs): raise RuntimeError('an op torch.export does not support')
    monkeypatch.setattr(torch.export, 'export', fail)
    with pytest.raises(ValueError, match='cannot export_program: .*an op torch.export does not support.*use export_onnx or export_jit'):
        learn.export_program(tmp_path/'m.pt2')
    assert not (tmp_path/'m.pt2').exists()

def test_item_kinds(single, tmp_path):
    learn,files = single
    p = load(learn.export_onnx(tmp_path/'m.onnx'))
    close(p.get_preds(odd_items(files))[0], p.get_preds(files[:6])[0], eps=1e-6)

def test_traces_any_tensor_transform(tmp_path):
    "a batch transform fastinfer has never seen is traced, not refused; one that cannot be traced is refused by name"
    from fastai.vision.all import Transform, TensorImage
    class Sharpen(Transform):
        def encodes(self, x:TensorImage): return x*1.01
    class ToList(Transform):
        def encodes(self, x:TensorImage): return x.tolist()
    learn,files = synth_learner('single', tmp_path/'l', n=12)
    learn.dls.valid.after_batch.fs.append(Sharpen())
    learn.fast_reset()
    check_export('single', learn, files, load(learn.export_onnx(tmp_path/'s.onnx')))
    learn.dls.valid.after_batch.fs.append(ToList())
    learn.fast_reset()
    for f,fn in ((learn.export_onnx, 'm.onnx'), (learn.export_program, 'm.pt2')):
        with pytest.raises(ValueError, match='cannot export: the batch transform ToList .* cannot be traced'): f(tmp_path/fn)
        assert not (tmp_path/fn).exists()

def test_check_failure_removes_file(single, tmp_path, monkeypatch):
    learn,files = single
    monkeypatch.setitem(fexport.TOL, 'fp32', -1.)
    for f,fn in ((learn.export_jit, 'm.pt'), (learn.export_onnx, 'm.onnx'), (learn.export_program, 'm.pt2')):
        with pytest.raises(ValueError, match='export check failed'): f(tmp_path/fn)
        assert not (tmp_path/fn).exists()

def test_bf16_export(single, tmp_path, monkeypatch):
    learn,files = single
    slow = lambda x: __import__('time').sleep(0.01)
    with pytest.raises(ValueError, match='not faster than fp32'): fexport._bench_ok(lambda x: x, slow, 0, 'bf16')
    monkeypatch.setattr(fexport, '_bench_ok', lambda *a: None)
    p = load(learn.export_jit(tmp_path/'b.pt', precision='bf16'))
    eq(p.spec['precision'], 'bf16')
    assert dp(learn, p, files) <= 5e-2
    with pytest.raises(ValueError, match='fp16 needs CUDA'): learn.export_jit(tmp_path/'h.pt', precision='fp16')

def _save(tmp_path, spec, name='x.pt'):
    m = torch.jit.script(torch.nn.Identity())
    fn = tmp_path/name
    torch.jit.save(m, str(fn), _extra_files={} if spec is None else {SPEC_FILE: spec if isinstance(spec, str) else json.dumps(spec)})
    return fn

def test_load_validates(single, tmp_path):
    learn,files = single
    spec = learn.export_spec()
    with pytest.raises(ValueError, match='unknown fastinfer export format version 99'): load(_save(tmp_path, {**spec, 'version': 99}))
    with pytest.raises(ValueError, match="no 'vocab' field"): load(_save(tmp_path, {k:v for k,v in spec.items() if k!='vocab'}))
    with pytest.raises(ValueError, match="field 'task' is a int"): load(_save(tmp_path, {**spec, 'task': 3}))
    with pytest.raises(ValueError, match='holds no fastinfer.json'): load(_save(tmp_path, None))
    with pytest.raises(ValueError, match='not valid JSON'): load(_save(tmp_path, '{oops'))
    (tmp_path/'junk.pt').write_bytes(b'not a model at all')
    with pytest.raises(ValueError, match='is not a fastinfer export'): load(tmp_path/'junk.pt')
    with pytest.raises(FileNotFoundError): load(tmp_path/'missing.pt')

def test_loads_without_fastai(single, tmp_path):
    learn,files = single
    fn = learn.export_jit(tmp_path/'m.pt')
    code = f"""
import sys
sys.modules['fastai'] = None  # any `import fastai` now fails
import fastinfer.jit as j
p = j.load({str(fn)!r})
lbl = p.predict({str(files[0])!r})[0]
assert not [m for m,v in sys.modules.items() if m.startswith('fastai') and v is not None]
print(lbl)
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-2000:]
    eq(r.stdout.strip().splitlines()[-1], learn.fast_predict(files[0])[0])

def test_export_skips_onnx_import():
    "the ONNX export of a fresh process does not import `onnx` (0.5 s), and gives torch's own bytes; a custom-domain model still gets torch's step"
    code = """
import sys, torch, torchvision
import fastinfer.engine as engine
from fastinfer.engine import onnx_export
from torch.onnx._internal.torchscript_exporter import onnx_proto_utils as opu, registration
m,x = torchvision.models.resnet18(num_classes=3).eval(),torch.randn(2, 3, 64, 64)
ours = onnx_export(m, (x,))[0]
assert 'onnx' not in sys.modules
step = opu._add_onnxscript_fn
opu._add_onnxscript_fn,engine._skip_onnx_import = step.orig,lambda: None
assert onnx_export(m, (x,))[0]==ours
assert 'onnx' in sys.modules
# a node in a custom domain that has functions registered: torch's step runs (here it parses the bytes, and fails on garbage)
registration.registry.all_functions = lambda: {'aten::relu', 'mydomain::op'}
assert step(b'no such domain', {})==b'no such domain'
assert step(b'mydomain as a name, not a domain', {})==b'mydomain as a name, not a domain'
try: step(b'garbage :\\x08mydomain', {}); print('not called')
except Exception as e: print('called', type(e).__name__)
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-2000:]
    eq(r.stdout.split()[:1], ['called'])

def test_learner_export_keeps_no_state(tmp_path):
    "fastai's `learn.export()` after fastinfer calls saves none of fastinfer's in-memory state (engines, ONNX export, pipelines, choices)"
    learn,files = synth_learner('single', tmp_path/'l', n=16)
    learn.export(tmp_path/'before.pkl')
    ref = learn.fast_get_preds(files, bs=8)[0]
    for be in ('onnxruntime', 'torch'): learn.fast_get_preds(files[:4], bs=4, backend=be)
    learn.fast_predict(files[0])
    learn.export(tmp_path/'after.pkl')
    # the same file but for two empty `Transient`s (learner and model): 57 kB, where the engines and pipelines had made it 81
    assert (tmp_path/'after.pkl').stat().st_size - (tmp_path/'before.pkl').stat().st_size < 100
    l2 = reload_learner(tmp_path/'after.pkl')
    assert not any(k.startswith('_fi') and v for k,v in l2.__dict__.items()), [k for k in l2.__dict__ if k.startswith('_fi')]
    assert not any(k.startswith('_fi') and v for k,v in l2.model.__dict__.items())
    close(l2.fast_get_preds(files, bs=8)[0], ref, eps=1e-5)

def test_openvino_models_freed_in_any_order(single, tmp_path):
    "OpenVINO models made and freed in the order they were made leave the process able to run a Python signal handler"
    # with a `Core` per model, OpenVINO's CPU plugin left the thread's alternate signal stack on freed memory: SIGSEGV, no traceback
    learn,files = single
    fn = learn.export_onnx(tmp_path/'m.onnx', example_items=files[:2])
    code = f"""
import gc, os, signal
from fastinfer.runtime import rt_model
a = rt_model({str(fn)!r}, backend='openvino'); b = rt_model({str(fn)!r}, backend='openvino')
del a; gc.collect(); del b; gc.collect()
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
print('handled', len(got))
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    eq((r.returncode, r.stdout.split()[-2:]), (0, ['handled', '1']))

@pytest.mark.parametrize('native', [True, False])
def test_runtime_bf16(single, tmp_path, monkeypatch, native):
    "`load(onnx, precision='bf16')` (`fastinfer predict|serve --precision bf16`) runs OpenVINO bf16 where bf16 is native, else warns and runs fp32"
    import fastinfer.runtime as rt
    # OpenVINO is asked for bf16 only where the CPU has it: the fallback is tested everywhere, the bf16 run where it is real
    if native and not (has_openvino() and rt.native_bf16()): pytest.skip('this CPU has no native bf16')
    monkeypatch.setattr(rt, 'native_bf16', lambda: native)
    learn,files = single
    fn = learn.export_onnx(tmp_path/'m.onnx', example_items=files[:2])
    ref = load(fn).get_preds(files)[0]
    if native:
        p = load(fn, precision='bf16')
        eq((p.model.name, p.model.precision), ('openvino', 'bf16'))
        assert 0 < np.abs(p.get_preds(files)[0] - ref).max() <= 2e-2  # bf16's rounding, not fp32's answers
    else:
        with pytest.warns(UserWarning, match="precision='bf16' runs fp32: this CPU has no native bf16"): p = load(fn, precision='bf16')
        close(p.get_preds(files)[0], ref, eps=1e-5)
    # the default engine follows the precision; ONNX Runtime named with bf16 is refused on every CPU (it failed only where bf16 is native)
    with pytest.raises(ValueError, match="leave backend out, or pass backend='openvino'"): load(fn, backend='onnxruntime', precision='bf16')
