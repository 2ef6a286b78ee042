"export_jit / export_program / load_jit: parity with fast_get_preds, refusals, spec validation, no fastai at load"
import json, subprocess, sys, warnings, pytest, torch
import numpy as np
from pathlib import Path
from PIL import Image
from fastcore.test import test_eq as eq, test_close as close
from fastinfer.all import *
from fastinfer.test_utils import KINDS, odd_items, synth_learner
import fastinfer.export as fexport
from fastinfer.jit import FORMAT, SPEC_FILE

def dp(learn, p, files):
    ref,res = learn.fast_get_preds(files)[0],p.get_preds(files)[0]
    scale = max(1., ref.abs().max().item()) if learn.export_spec()['task'] in ('regression','points') else 1.
    return (res-ref).abs().max().item()/scale

def test_jit_parity(kind_learner, tmp_path):
    kind,learn,files = kind_learner
    fn = learn.export_jit(tmp_path/f'{kind}.pt', example_items=files[:4])
    p = load_jit(fn)
    assert dp(learn, p, files) <= 1e-4
    probs,dec = p.get_preds(files, bs=16)
    ref = learn.fast_get_preds(files, with_decoded=True)
    if kind in ('single', 'bw', 'rrc', 'segmentation', 'multi'): eq(dec, ref[2])
    if kind=='points':
        full = learn.fast_get_preds(files[:3], fully_decoded=True)[-1]
        close(dec[:3], torch.stack([torch.as_tensor(f) for f in full]), eps=1e-2)
    lbl = p.predict(files[0])[0]
    if kind in ('single', 'bw', 'rrc', 'multi'): eq(lbl, learn.fast_predict(files[0])[0])

@pytest.mark.parametrize('kind', ['single', 'bw'])
def test_program_parity(kind, tmp_path, root):
    from conftest import learner
    learn,files = learner(kind, root)
    p = load_jit(learn.export_program(tmp_path/'m.pt2', example_items=files[:3]))
    assert dp(learn, p, files) <= 1e-4

def test_item_kinds(single, tmp_path):
    learn,files = single
    p = load_jit(learn.export_jit(tmp_path/'m.pt'))
    close(p.get_preds(odd_items(files))[0], p.get_preds(files[:6])[0], eps=1e-6)

def test_refuses_unknown_transform(tmp_path):
    from fastai.vision.all import Transform, TensorImage
    class Sharpen(Transform):
        def encodes(self, x:TensorImage): return x*1.01
    learn,files = synth_learner('single', tmp_path/'l', n=12)
    learn.dls.valid.after_batch.fs.append(Sharpen())
    learn.fast_reset()
    with pytest.raises(ValueError, match='does not reproduce Sharpen'): learn.export_jit(tmp_path/'m.pt')
    assert not (tmp_path/'m.pt').exists()

def test_check_failure_removes_file(single, tmp_path, monkeypatch):
    learn,files = single
    monkeypatch.setitem(fexport.TOL, 'fp32', -1.)
    with pytest.raises(ValueError, match='export check failed'): learn.export_jit(tmp_path/'m.pt')
    assert not (tmp_path/'m.pt').exists()

def test_bf16_export(single, tmp_path, monkeypatch):
    learn,files = single
    slow = lambda x: __import__('time').sleep(0.01)
    with pytest.raises(ValueError, match='not faster than fp32'): fexport._bench_ok(lambda x: x, slow, 0, 'bf16')
    monkeypatch.setattr(fexport, '_bench_ok', lambda *a: None)
    p = load_jit(learn.export_jit(tmp_path/'b.pt', precision='bf16'))
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
    with pytest.raises(ValueError, match='unknown fastinfer export format version 99'): load_jit(_save(tmp_path, {**spec, 'version': 99}))
    with pytest.raises(ValueError, match="no 'vocab' field"): load_jit(_save(tmp_path, {k:v for k,v in spec.items() if k!='vocab'}))
    with pytest.raises(ValueError, match="field 'task' is a int"): load_jit(_save(tmp_path, {**spec, 'task': 3}))
    with pytest.raises(ValueError, match='holds no fastinfer.json'): load_jit(_save(tmp_path, None))
    with pytest.raises(ValueError, match='not valid JSON'): load_jit(_save(tmp_path, '{oops'))
    (tmp_path/'junk.pt').write_bytes(b'not a model at all')
    with pytest.raises(ValueError, match='is not a fastinfer export'): load_jit(tmp_path/'junk.pt')
    with pytest.raises(FileNotFoundError): load_jit(tmp_path/'missing.pt')

def test_loads_without_fastai(single, tmp_path):
    learn,files = single
    fn = learn.export_jit(tmp_path/'m.pt')
    code = f"""
import sys
sys.modules['fastai'] = None  # any `import fastai` now fails
import fastinfer.jit as j
p = j.load_jit({str(fn)!r})
lbl = p.predict({str(files[0])!r})[0]
assert not [m for m,v in sys.modules.items() if m.startswith('fastai') and v is not None]
print(lbl)
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-2000:]
    eq(r.stdout.strip().splitlines()[-1], learn.fast_predict(files[0])[0])
