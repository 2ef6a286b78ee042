"The on-disk cache: a fresh process reuses the ONNX export and the measured choice; any change misses; corrupt entries are rebuilt; concurrent writers are safe"
import os, subprocess, sys, warnings, pytest, torch
import fastinfer.engine as engine
from fastcore.test import test_eq as eq
from fastinfer.all import *
from fastinfer.cache import model_cache, cache_get, cache_flush

@pytest.fixture
def on(tmp_path, monkeypatch):
    monkeypatch.setenv('FASTINFER_CACHE', str(tmp_path/'cache'))
    return tmp_path/'cache'/'models'

def entries(d, name):
    cache_flush()  # the export is written in the background
    return sorted(f for f in d.glob(f'{name}-*')) if d.exists() else []

def counted(monkeypatch):
    "Count the ONNX exports and the probe's timed runs"
    n = dict(export=0, time=0)
    exp,tim = engine.onnx_export,engine._time
    def export(*a, **kw): n['export'] += 1; return exp(*a, **kw)
    def time_(*a, **kw): n['time'] += 1; return tim(*a, **kw)
    monkeypatch.setattr(engine, 'onnx_export', export); monkeypatch.setattr(engine, '_time', time_)
    return n

def test_hit_and_miss(single, on, monkeypatch):
    learn,files = single
    learn.fast_reset()
    n = counted(monkeypatch)
    ref = learn.fast_get_preds(files, bs=16)[0]
    assert n['export']==1 and n['time'] >= 2
    eq(len(entries(on, 'onnx')), 1); eq(len(entries(on, 'choice')), 1)
    # as a fresh process: nothing in memory, everything on disk
    learn.fast_reset(); n.update(export=0, time=0)
    eq(learn.fast_get_preds(files, bs=16)[0], ref)
    c = learn.fast_backend()[(None, 'cpu', 16)]
    assert c.get('cached') and n['time']==0 and n['export']==0
    p = learn.fast_pipes
    learn._fast_onnx(p.batch(p.collate([p.item(files[0])]*2), 'cpu')[:1])
    eq(n['export'], 0)  # whichever backend was chosen, the export comes from the disk
    # another batch size is another choice; changed weights miss both
    learn.fast_get_preds(files, bs=8); eq(len(entries(on, 'choice')), 2)
    w = next(learn.model.parameters())
    try:
        with torch.no_grad(): w.add_(1e-3)
        learn.fast_reset(); n.update(export=0, time=0)
        learn.fast_get_preds(files, bs=16)
        assert n['export']==1 and n['time'] >= 2
        eq(len(entries(on, 'onnx')), 2); eq(len(entries(on, 'choice')), 3)
    finally:
        with torch.no_grad(): w.sub_(1e-3)
        learn.fast_reset()

def test_corrupt_entry_rebuilt(single, on, monkeypatch):
    learn,files = single
    learn.fast_reset()
    ref = learn.fast_get_preds(files, bs=16, backend='onnxruntime')[0]
    f, = entries(on, 'onnx')
    f.write_bytes(f.read_bytes()[:100])  # cut short
    learn.fast_reset()
    n = counted(monkeypatch)
    with pytest.warns(UserWarning, match='is corrupt .*rebuilding it'): res = learn.fast_get_preds(files, bs=16, backend='onnxruntime')[0]
    eq(res, ref); eq(n['export'], 1)
    assert cache_get('onnx', f.name.split('-', 1)[1])  # rebuilt, and whole
    learn.fast_reset()

def test_off(single, tmp_path, monkeypatch):
    monkeypatch.setenv('FASTINFER_CACHE', '0')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))  # where the default folder would be, were '0' ignored
    learn,files = single
    learn.fast_reset()
    learn.fast_get_preds(files[:8], bs=8)
    assert model_cache() is None and not any(tmp_path.rglob('onnx-*'))
    learn.fast_reset()

def test_two_processes_at_once(single, on, tmp_path):
    "Two fresh processes on one empty cache at once: both answer as fastai does, and leave whole entries"
    learn,files = single
    pkl = tmp_path/'cache-single.pkl'  # not `learn.path`: a reloaded learner's is the working directory
    learn.export(pkl)
    code = f"""
import warnings, numpy as np
warnings.simplefilter('error', UserWarning)  # a corrupt entry would warn
warnings.filterwarnings('ignore', message='.*(insecure pickle|dropped|load_learner).*')
from fastai.learner import load_learner
import fastinfer
learn = load_learner({str(pkl)!r})
files = {[str(f) for f in files]!r}
np.save(__import__('sys').argv[1], learn.fast_get_preds(files, bs=16)[0].numpy())
print(bool(next(iter(learn.fast_backend().values())).get('cached')))
"""
    run = lambda i: subprocess.Popen([sys.executable, '-c', code, str(on.parent/f'p{i}.npy')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = [run(i) for i in range(2)]
    for p in ps: assert p.wait(300)==0, p.stderr.read()[-3000:]
    # a third process finds what they left: the keys are the same in every process
    p = run(2)
    assert p.wait(300)==0, p.stderr.read()[-3000:]
    eq(p.stdout.read().split()[-1], 'True')
    import numpy as np
    ref = learn.fast_get_preds(files, bs=16, backend='torch')[0].numpy()
    for i in range(3): assert np.abs(np.load(on.parent/f'p{i}.npy') - ref).max() <= 1e-5
    for f in entries(on, 'onnx') + entries(on, 'choice'): assert cache_get(f.name.split('-')[0], f.name.split('-', 1)[1])
    assert not list(on.glob('.*'))  # no temporary file left behind

def test_openvino_blobs_for_int8_only(single, on):
    "OpenVINO's compiled blob is kept for an int8 graph, slow to compile, and not for fp32; a garbled blob is caught by its checksum"
    pytest.importorskip('openvino')
    import numpy as np
    from fastinfer.runtime import rt_model
    learn,files = single
    p = learn.fast_pipes
    xb = p.batch(p.collate([p.item(files[0])]*2), 'cpu')[:1]
    rt_model(learn._fast_onnx(xb)[0], 1, 'openvino')
    eq(entries(on, 'openvino'), [])
    ql = learn.quantize(files[:16], n_batches=1, bs=16)
    x = xb[0].numpy()
    ref = rt_model(ql.model.onnx, 1, 'openvino')(x)
    f, = entries(on, 'openvino')
    eq(rt_model(ql.model.onnx, 1, 'openvino')(x), ref)  # built from the blob
    b = bytearray(f.read_bytes()); b[len(b)//2:len(b)//2+4096] = bytes(4096); f.write_bytes(bytes(b))
    with pytest.warns(UserWarning, match='cached openvino .* is corrupt'): eq(rt_model(ql.model.onnx, 1, 'openvino')(x), ref)

def test_int8_choice_cached(single, on, monkeypatch):
    "a quantized learner's choice between its own ONNX Runtime session and OpenVINO is kept on disk too, per int8 graph"
    pytest.importorskip('openvino')
    learn,files = single
    ql = learn.quantize(files[:16], n_batches=1, bs=16)
    n = counted(monkeypatch)
    ref = ql.fast_get_preds(files, bs=16)[0]
    eq(n['time'], 2); eq(len(entries(on, 'choice')), 1)
    ql.fast_reset(); n.update(time=0)
    eq(ql.fast_get_preds(files, bs=16)[0], ref)
    assert ql.fast_backend()[('int8', 'cpu', 16)].get('cached') and n['time']==0
    ql2 = learn.quantize(files[16:32], n_batches=1, bs=16)  # calibrated on other items: another graph, another entry
    ql2.fast_get_preds(files, bs=16)
    eq(n['time'], 2); eq(len(entries(on, 'choice')), 2)
